"""Examples built on preftune. Not part of the installed package: run them from the repository root
(e.g. `python -m examples.news_demo`), where this folder is importable."""
