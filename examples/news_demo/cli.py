"""The demo's command line: `python -m examples.news_demo`, `make demo`, and `preftune demo` in a clone.

Bad input is one sentence on stderr and exit status 2, as in preftune's own CLI.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from preftune.errors import PreftuneError

PROG = "python -m examples.news_demo"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one sentence, exit 2, like preftune's CLI
        raise PreftuneError(f"{message} (see `{self.prog} --help`)")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, allow_abbrev=False,
                description="The news-summary demo on a CPU: SFT model → DPO with preftune → judged before/after.")
    p.add_argument("--output-dir", default=None,
                   help="Folder for the demo's files (default runs/demo; with --on-policy runs/demo-onpolicy).")
    p.add_argument("--on-policy", action="store_true",
                   help="The second story: pairs sampled from the SFT model and scored by the graded judge "
                        "(preftune pairs), DPO on them against the hand-made pairs, and equal numbers of small-gap "
                        "and large-gap pairs (examples/news_demo/onpolicy.py).")
    p.add_argument("--pairs-judge", metavar="MODULE:FUNCTION",
                   help="With --on-policy: the pointwise score(prompt, answer) -> float that scores the sampled "
                        "summaries (default examples/news_demo/judge.py:score).")
    p.add_argument("--from-scratch", action="store_true", help="Also build the tiny base model (tokenizer, SFT).")
    p.add_argument("--eval-articles", type=int, default=200, help="Held-out articles to generate and judge.")
    p.add_argument("--judge", metavar="MODULE:FUNCTION",
                   help="Your own pointwise judge, judge(article, summary) -> a JudgeResult or a mapping with "
                        "factual, concise and good (see examples/news_demo/judge.py); its good verdicts also "
                        "give the pairwise win rate of DPO over SFT.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="A shortened run (fewer articles and steps).")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace an earlier demo in --output-dir (only what its demo_manifest.json lists).")
    return p


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """Run the demo with command-line flags; 0 when it finished, 2 with one sentence on bad input."""
    try:
        args = build_parser(prog).parse_args(argv)
        common = dict(from_scratch=args.from_scratch, n_eval=args.eval_articles, judge=args.judge, seed=args.seed,
                      quick=args.quick, overwrite=args.overwrite)
        # Imported here so that --help and flag errors do not wait for torch.
        if args.on_policy:
            from examples.news_demo.onpolicy import run_onpolicy_demo

            run_onpolicy_demo(output_dir=args.output_dir or "runs/demo-onpolicy", pairs_judge=args.pairs_judge,
                              **common)
        else:
            if args.pairs_judge:
                raise PreftuneError("--pairs-judge scores the sampled summaries of the on-policy story; pass it "
                                    "with --on-policy.")
            from examples.news_demo.pipeline import run_demo

            run_demo(output_dir=args.output_dir or "runs/demo", **common)
    except PreftuneError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
