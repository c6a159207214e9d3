"""`preftune` command line: parse → config → call the Python API. Nothing else lives here.

Bad input of any kind is one sentence on stderr and exit status 2 (no traceback). A training run stopped by
SIGTERM/SIGINT before final/ was written exits with status 75 (EX_TEMPFAIL, "try again": schedulers that requeue
on it can rerun the same command with --resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from preftune.command_options import (
    EvalOptions,
    GenerateOptions,
    InspectOptions,
    PlanOptions,
    PushOptions,
    ReportOptions,
)
from preftune.config import TrainConfig, flag_value, read_yaml
from preftune.errors import PreftuneError
from preftune.launch import shutdown
from preftune.onpolicy.config import PairsConfig
from preftune.onpolicy.iterate_config import IterateConfig
from preftune.options import options_of
from preftune.version import __version__

EXIT_USAGE = 2
EXIT_RESUMABLE = 75  # sysexits.h EX_TEMPFAIL: stopped by a signal, checkpointed, continue with --resume

# Each command: its options class (the flags and --help come from its fields) and its one-line description.
COMMANDS: dict[str, tuple[type, str]] = {
    "train": (TrainConfig, "Preference fine-tuning (DPO family) of a model on prompt/chosen/rejected pairs."),
    "sft": (TrainConfig, "Supervised fine-tuning on prompt/completion data (or the chosen side of pairs)."),
    "inspect": (InspectOptions, "Audit a preference data file before training."),
    "plan": (PlanOptions, "Memory per GPU under DDP, FSDP2 and ZeRO, and the smallest setup that fits."),
    "generate": (GenerateOptions, "Sample answers from a model (JSONL out)."),
    "eval": (EvalOptions, "Held-out preference accuracy, reward margins, KL to the reference, answer lengths and a "
             "judged win rate of a model against its reference."),
    "report": (ReportOptions, "HTML page and PNGs of a run's curves (works while it runs)."),
    "push": (PushOptions, "Upload a run's final model (and model card) to the Hugging Face Hub."),
    "pairs": (PairsConfig, "On-policy preference pairs: K answers per prompt from the model, scored by a judge, a "
              "clearly better and a clearly worse one kept (JSONL that train reads)."),
    "iterate": (IterateConfig, "Rounds of iterative DPO: on-policy pairs from the round's model, DPO from it, a "
                "judged held-out evaluation; a table of rounds, collapse caught and rolled back."),
}
CONFIG_FILES = (TrainConfig, PairsConfig, IterateConfig)  # the commands that also read a YAML file of their options


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: keep them to one sentence, exit 2
        raise PreftuneError(f"{message} (see `{self.prog} --help`)")


def _value(cls: type, name: str):
    """The flag's parser: text options as typed, the rest read as (bounded) YAML; see config.flag_value."""
    parse = functools.partial(flag_value, cls, name)
    parse.__name__ = name  # argparse names the type in its messages
    return parse


def add_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per option of `cls` (`--batch-size` for batch_size), its help and default from the schema. Flags
    not given are left out of the namespace, so a YAML file or the options class supplies their defaults."""
    for name, kind, opt in options_of(cls):
        flag = "--" + name.replace("_", "-")
        kw: dict[str, Any] = {"type": _value(cls, name), "help": opt.help}
        kw.update({k: v for k, v in opt.flag.items() if k in ("nargs", "action", "metavar")})
        if opt.flag.get("positional"):
            p.add_argument(name, **{"metavar": name.upper(), **kw})
            continue
        kw.setdefault("metavar", "V")
        if opt.default is dataclasses.MISSING:
            kw["required"] = True
        elif kind == "bool" or opt.flag.get("const"):
            kw.update(nargs="?", const=True, help=opt.help + f" (default {opt.default}; '{flag}' alone means true)")
        elif opt.default is not None and "default" not in opt.help:
            kw["help"] = opt.help + f" (default {opt.default!r})"
        p.add_argument(flag, dest=name, default=argparse.SUPPRESS, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="preftune", allow_abbrev=False,
                     description="Preference fine-tuning (DPO and its family) for causal language models.")
    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    for name, (cls, what) in COMMANDS.items():
        description = what + (" Flags override the YAML file; both use the same key names." if cls in CONFIG_FILES
                              else "")
        p = sub.add_parser(name, help=what, description=description, allow_abbrev=False)
        if cls in CONFIG_FILES:
            p.add_argument("config", nargs="?", help="YAML config file (optional).")
        add_flags(p, cls)
    # The demo is not in the package (its weights would ship in every wheel): the verb runs the copy in a
    # clone, examples/news_demo, and hands it every flag (its own --help included), so it keeps no flags here.
    sub.add_parser("demo", add_help=False, help="The news-summary demo from a clone of the repository (what "
                   "`make demo` runs): SFT model → DPO → judged before/after. Flags: `preftune demo --help`.")
    return parser


def options_from_args(args: argparse.Namespace) -> Any:
    """The command's options, checked, from the flags given (and, for train/sft, the YAML file under them)."""
    cls = COMMANDS[args.command][0]
    given = {name: getattr(args, name) for name, _, _ in options_of(cls) if hasattr(args, name)}
    if cls not in CONFIG_FILES:
        return cls(**given)
    values: dict[str, Any] = read_yaml(args.config, cls) if args.config else {}
    values.update(given)
    return cls.from_dict(values, where=args.config or "flags")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return options_from_args(args)


def _unknown_flags(command: str, extra: Sequence[str]) -> None:
    flags = ["--" + n.replace("_", "-") for n, _, _ in options_of(COMMANDS[command][0])]
    for tok in extra:
        if tok.startswith("--"):
            name = tok.split("=", 1)[0]
            hint = difflib.get_close_matches(name.replace("_", "-"), flags, n=1, cutoff=0.5)
            extra_hint = f"; did you mean {hint[0]}?" if hint else f"; see `preftune {command} --help` for the valid flags."
            raise PreftuneError(f"unknown flag {name} for `preftune {command}`{extra_hint}")
    raise PreftuneError(f"unexpected argument {extra[0]!r}; see `preftune {command} --help`.")


def _run(argv: Sequence[str] | None, callbacks: Sequence[Any]) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "demo":
        return _run_demo(extra)
    if extra:
        _unknown_flags(args.command, extra)
    opts = options_from_args(args)  # every value checked before anything is loaded
    # Each command's module is imported when it runs: they bring in torch and transformers, which `--help` and a
    # refused flag need not wait for.
    if args.command in ("train", "sft"):
        from preftune import recipe

        result = (recipe.train if args.command == "train" else recipe.sft)(opts, callbacks=list(callbacks))
        # One line per job, not per process.
        if os.environ.get("RANK", "0") != "0":
            return EXIT_RESUMABLE if result.interrupted else 0
        if result.interrupted:
            kept = "final/ is written but not evaluated" if result.final_dir.is_dir() else "a checkpoint is saved"
            print(f"preftune: stopped by a signal after step {result.steps} ({kept}); resumable: run the same "
                  f"command with --resume (exit status {EXIT_RESUMABLE})", file=sys.stderr)
            return EXIT_RESUMABLE
        print(f"done: {result.steps} steps; model in {result.final_dir}; metrics in {result.output_dir / 'metrics.jsonl'}")
        return 0
    if args.command == "inspect":
        from preftune.audit_unpaired import run_inspect  # pairs go on to preftune.audit

        return run_inspect(opts)
    if args.command == "plan":
        from preftune.memory_plan import run_plan

        return run_plan(opts)
    if args.command == "pairs":
        from preftune.onpolicy.pairs import make_pairs

        make_pairs(opts)
        return 0
    if args.command == "iterate":
        from preftune.onpolicy.iterate_run import iterate

        result = iterate(opts, callbacks=list(callbacks))
        if result.interrupted:
            print(f"preftune: stopped during a round's training; resumable: run the same command with --resume "
                  f"(exit status {EXIT_RESUMABLE})", file=sys.stderr)
            return EXIT_RESUMABLE
        return 0
    return _run_eval_command(args.command, opts)


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


# ----------------------------------------------------------------------------- generate, eval, report, push

def _run_eval_command(command: str, opts: Any) -> int:
    # As in _run: each command's module (torch, transformers, matplotlib, huggingface_hub) is imported when it runs.
    if command == "generate":
        from preftune.data.prompts import read_prompts
        from preftune.generate import run_generate

        prompts = opts.prompt or read_prompts(opts.data, opts.prompt_field)
        run_generate(opts.model, prompts=prompts, output=opts.output, base_model=opts.base_model, dtype=opts.dtype,
                     device=opts.device, batch_size=opts.batch_size, max_new_tokens=opts.max_new_tokens,
                     temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k, seed=opts.seed, chat=opts.chat)
        if opts.output:
            print(f"wrote {len(prompts)} completion(s) to {opts.output}", file=sys.stderr)
        return 0
    if command == "eval":
        from preftune.evaluate import format_eval, run_eval

        values = opts.to_dict()
        for key in ("max_length", "max_prompt_length"):  # unset: the run's own, else evaluate()'s default
            if values[key] is None:
                del values[key]
        print(format_eval(run_eval(values.pop("model"), values.pop("data"), **values)))
        return 0
    if command == "report":
        from preftune.outputs.report import write_report

        report = write_report(opts.run_dir, opts.output_dir)
        for problem in report.problems:
            print(f"problem: {problem}")
        print(f"report: {report.html} ({len(report.pngs)} figures)")
        return 0
    from preftune.hub import push_run

    url = push_run(opts.run_dir, opts.repo, private=not opts.public, commit_message=opts.commit_message)
    print(f"pushed to {opts.repo}: {url}")
    return 0


def main(argv: Sequence[str] | None = None, callbacks: Sequence[Any] = ()) -> int:
    """The `preftune` command with arguments `argv` (default: the process's); returns the exit status. `callbacks`
    (preftune.callbacks.Callback objects) join a train/sft run's own: how a script watches a CLI run."""
    try:
        code = _run(argv, callbacks)
    except PreftuneError as e:
        print(f"preftune: error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt as e:  # runtime.Stopped: a signal during setup, nothing lost, resumable
        print(f"preftune: {e or 'interrupted'}", file=sys.stderr)
        code = EXIT_RESUMABLE if type(e).__name__ == "Stopped" else 130
    if "torch" in sys.modules:  # no process group without torch, and `--help` need not import it
        shutdown(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
