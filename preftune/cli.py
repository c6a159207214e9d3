"""`preftune` command line: parse → config → call the Python API. Nothing else lives here.

Bad input of any kind is one sentence on stderr and exit status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from preftune.config import TrainConfig, read_yaml
from preftune.errors import PreftuneError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: keep them to one sentence, exit 2
        raise PreftuneError(f"{message} (see `{self.prog} --help`)")


def _value(text: str) -> Any:
    """A flag's value read as YAML, so `--beta 0.1`, `--lora true`, `--loss [sigmoid, sft]` all work."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool) or f.name == "resume":
            p.add_argument(flag, dest=f.name, nargs="?", const=True, default=argparse.SUPPRESS, type=_value,
                           help=f.metadata["help"] + f" (default {f.default}; '{flag}' alone means true)",
                           metavar="V")
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            p.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, type=_value, metavar="V",
                           help=f.metadata["help"] + f" (default {default!r})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="preftune", allow_abbrev=False,
                     description="Preference fine-tuning (DPO and its family) for causal language models.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    for name, what in (("train", "Preference fine-tuning (DPO family) of a model on prompt/chosen/rejected pairs."),
                       ("sft", "Supervised fine-tuning on prompt/completion data (or the chosen side of pairs).")):
        p = sub.add_parser(name, help=what, description=what + " Flags override the YAML file; both use the "
                           "same key names.", allow_abbrev=False)
        p.add_argument("config", nargs="?", help="YAML config file (optional).")
        _add_config_flags(p)

    p = sub.add_parser("inspect", help="Audit a preference data file before training.", allow_abbrev=False)
    p.add_argument("data", nargs="+", help="Data file(s), glob or dataset folder.")
    p.add_argument("--model", help="Also measure the model's own preference on the pairs.")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--max-prompt-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--format", default="auto")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--chosen-field", default="chosen")
    p.add_argument("--rejected-field", default="rejected")
    p.add_argument("--output", help="Write the audit as JSON here (a PNG and HTML report are written beside it).")

    p = sub.add_parser("plan", help="Memory per GPU under DDP, FSDP2 and ZeRO, and the smallest setup that fits.",
                       allow_abbrev=False)
    p.add_argument("--model", required=True, help="Model folder, its config.json, or a hub name in the local cache.")
    p.add_argument("--gpus", type=int, default=8, help="GPUs to show the table for (default 8).")
    p.add_argument("--gpu-memory", default="80GB", help="Memory of one GPU (default 80GB).")
    p.add_argument("--lora", action="store_true", help="Recommend for LoRA instead of full fine-tuning.")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024, help="max_length of the run (default 1024).")
    p.add_argument("--batch-size", type=int, default=4, help="Pairs per micro-batch per GPU (default 4).")

    p = sub.add_parser("demo", help="The whole story on a CPU: SFT model → DPO → judged before/after.",
                       allow_abbrev=False)
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--from-scratch", action="store_true", help="Also build the tiny base model (tokenizer, SFT).")
    p.add_argument("--eval-articles", type=int, default=200, help="Held-out articles to generate and judge.")
    p.add_argument("--judge", help="Your own judge as module:function.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="A shortened run (fewer articles and steps).")
    p.add_argument("--overwrite", action="store_true", help="Replace an earlier demo in --output-dir.")
    return parser


def _version() -> str:
    from preftune import __version__

    return f"preftune {__version__}"


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = read_yaml(args.config) if args.config else {}
    names = set(TrainConfig.field_names())
    values.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig.from_dict(values, where=args.config or "flags")


def _unknown_flags(extra: Sequence[str]) -> None:
    flags = ["--" + n.replace("_", "-") for n in TrainConfig.field_names()]
    for tok in extra:
        if tok.startswith("--"):
            name = tok.split("=", 1)[0]
            hint = difflib.get_close_matches(name.replace("_", "-"), flags, n=1, cutoff=0.5)
            extra_hint = f"; did you mean {hint[0]}?" if hint else "; see --help for the valid flags."
            raise PreftuneError(f"unknown flag {name}{extra_hint}")
    raise PreftuneError(f"unexpected argument {extra[0]!r}; see --help.")


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if extra:
        _unknown_flags(extra)

    if args.command in ("train", "sft"):
        from preftune import recipe

        cfg = config_from_args(args)
        result = (recipe.train if args.command == "train" else recipe.sft)(cfg)
        # One line per job, not per process; a stopped run has already said how to resume it.
        if os.environ.get("RANK", "0") == "0" and not result.interrupted:
            print(f"done: {result.steps} steps; model in {result.final_dir}; metrics in {result.output_dir / 'metrics.jsonl'}")
        return 0
    if args.command == "inspect":
        from preftune.audit import run_inspect

        return run_inspect(args)
    if args.command == "plan":
        from preftune.plan import run_plan

        return run_plan(args)
    if args.command == "demo":
        from preftune.demo.pipeline import run_demo

        run_demo(output_dir=args.output_dir, from_scratch=args.from_scratch, n_eval=args.eval_articles,
                 judge=args.judge, seed=args.seed, quick=args.quick, overwrite=args.overwrite)
        return 0
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except PreftuneError as e:
        print(f"preftune: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
