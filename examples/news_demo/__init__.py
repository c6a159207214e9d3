"""The news-summary demo: a tiny SFT model, DPO with preftune, and a judged before/after (`make demo`).

Modules: `news` (synthetic articles, good and bad summaries), `judge` (the default fact-checking judge),
`base` (builds the committed SFT base in `assets/base`), `pipeline` (the demo itself), `cli` (its flags).
"""
