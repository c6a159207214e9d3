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
from pathlib import Path
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
            # text fields (a prompt template like "{question}") are taken as typed: YAML would read a mapping
            p.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar="V",
                           type=str if f.metadata.get("text") else _value,
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
    p.add_argument("--model", help="Also measure the model's own preference on the pairs (and use its tokenizer).")
    p.add_argument("--tokenizer", help="A model folder or hub name whose tokenizer (and chat template) to use, "
                   "without loading the model.")
    p.add_argument("--show", type=int, default=0, metavar="N",
                   help="Print the first N examples exactly as training sees them (with a tokenizer: the "
                   "token pieces at the prompt/answer boundary and at the end of each answer).")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--max-prompt-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--format", default="auto")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--chosen-field", default="chosen")
    p.add_argument("--rejected-field", default="rejected")
    p.add_argument("--prompt-template", help="Build the prompt from several fields, e.g. '{system}\\n\\n{question}'.")
    p.add_argument("--output", help="Write the audit as JSON here (a PNG and HTML report are written beside it).")

    # The demo is not in the package (its weights would ship in every wheel): the verb runs the copy in a
    # clone, examples/news_demo, and hands it every flag (its own --help included), so it keeps no flags here.
    sub.add_parser("demo", add_help=False, help="The news-summary demo from a clone of the repository (what "
                   "`make demo` runs): SFT model → DPO → judged before/after. Flags: `preftune demo --help`.")
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
    if args.command == "demo":
        return _run_demo(extra)
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
    raise AssertionError(args.command)


def _demo_checkout() -> Path | None:
    """The repository folder holding examples/news_demo: this preftune's own source checkout (an editable
    install, or PYTHONPATH) first, so the demo matches the library, else the current directory."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd().resolve()):
        if (root / "examples" / "news_demo" / "__main__.py").is_file():
            return root
    return None


def _run_demo(argv: Sequence[str]) -> int:
    root = _demo_checkout()
    if root is None:
        raise PreftuneError("the demo is not part of the installed package; run `make demo` (or `preftune demo`) "
                            "in a clone of the preftune repository.")
    sys.path.insert(0, str(root))
    try:
        import examples.news_demo.cli as demo_cli
    except ImportError as e:
        raise PreftuneError(f"cannot import the demo from {root / 'examples'} ({e}); run "
                            f"`python -m examples.news_demo` in {root}.") from None
    # An `examples` package imported earlier from elsewhere would shadow the checkout's.
    if not Path(demo_cli.__file__).resolve().is_relative_to(root):
        raise PreftuneError(f"another `examples` package ({demo_cli.__file__}) shadows {root / 'examples'}; "
                            f"run `python -m examples.news_demo` in {root}.")
    return demo_cli.main(argv, prog="preftune demo")


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
