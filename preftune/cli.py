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

from preftune.config import TrainConfig, flag_value, read_yaml
from preftune.errors import PreftuneError

EXIT_USAGE = 2
EXIT_RESUMABLE = 75  # sysexits.h EX_TEMPFAIL: stopped by a signal, checkpointed, continue with --resume


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: keep them to one sentence, exit 2
        raise PreftuneError(f"{message} (see `{self.prog} --help`)")


def _value(name: str):
    """The flag's parser: text fields as typed, the rest read as (bounded) YAML; see config.flag_value."""
    parse = functools.partial(flag_value, name)
    parse.__name__ = name  # argparse names the type in its messages
    return parse


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool) or f.name == "resume":
            p.add_argument(flag, dest=f.name, nargs="?", const=True, default=argparse.SUPPRESS, type=_value(f.name),
                           help=f.metadata["help"] + f" (default {f.default}; '{flag}' alone means true)",
                           metavar="V")
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            p.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, type=_value(f.name), metavar="V",
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

    p = sub.add_parser("plan", help="Memory per GPU under DDP, FSDP2 and ZeRO, and the smallest setup that fits.",
                       allow_abbrev=False)
    p.add_argument("--model", required=True, help="Model folder, its config.json, or a hub name in the local cache.")
    p.add_argument("--gpus", type=int, default=8, help="GPUs to show the table for (default 8).")
    p.add_argument("--gpu-memory", default="80GB", help="Memory of one GPU (default 80GB).")
    p.add_argument("--lora", action="store_true", help="Recommend for LoRA instead of full fine-tuning.")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024, help="max_length of the run (default 1024).")
    p.add_argument("--batch-size", type=int, default=4, help="Pairs per micro-batch per GPU (default 4).")

    # The demo is not in the package (its weights would ship in every wheel): the verb runs the copy in a
    # clone, examples/news_demo, and hands it every flag (its own --help included), so it keeps no flags here.
    sub.add_parser("demo", add_help=False, help="The news-summary demo from a clone of the repository (what "
                   "`make demo` runs): SFT model → DPO → judged before/after. Flags: `preftune demo --help`.")
    _add_eval_commands(sub)
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
        # One line per job, not per process.
        if os.environ.get("RANK", "0") != "0":
            return EXIT_RESUMABLE if result.interrupted else 0
        if result.interrupted:
            print(f"preftune: stopped after step {result.steps} before final/ was written; resumable: run the same "
                  f"command with --resume (exit status {EXIT_RESUMABLE})", file=sys.stderr)
            return EXIT_RESUMABLE
        print(f"done: {result.steps} steps; model in {result.final_dir}; metrics in {result.output_dir / 'metrics.jsonl'}")
        return 0
    if args.command == "inspect":
        from preftune.audit import run_inspect

        return run_inspect(args)
    if args.command == "plan":
        from preftune.plan import run_plan

        return run_plan(args)
    if args.command in EVAL_COMMANDS:
        return _run_eval_command(args)
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


# ----------------------------------------------------------------------------- generate, eval, report, push

EVAL_COMMANDS = ("generate", "eval", "report", "push")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Model folder, hub name or LoRA adapter folder (e.g. RUN/final).")
    p.add_argument("--base-model", help="Base model for a LoRA adapter folder (default: the one it names).")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when present).")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding (default).")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def _add_eval_commands(sub) -> None:
    p = sub.add_parser("generate", help="Sample answers from a model (JSONL out).", allow_abbrev=False)
    _add_model_flags(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="A prompt (repeat for several).")
    src.add_argument("--data", help="Prompts from a .jsonl/.json file (its prompt field) or a .txt file (one a line).")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--top-k", type=int, default=0, help="0 = off.")
    p.add_argument("--chat", action="store_true", help="Wrap string prompts in the tokenizer's chat template.")
    p.add_argument("--output", help="JSONL file to write (default: stdout).")

    p = sub.add_parser("eval", help="Held-out preference accuracy, reward margins, KL to the reference, answer "
                       "lengths and a judged win rate of a model against its reference.", allow_abbrev=False)
    _add_model_flags(p)
    p.add_argument("--data", nargs="+", required=True, help="Held-out preference data (any format train reads).")
    p.add_argument("--reference", help="Reference model (default: the run's starting model for RUN/final, the base "
                   "for a LoRA adapter folder).")
    p.add_argument("--beta", type=float, help="β of the implicit reward (default: the run's, else 0.1).")
    p.add_argument("--judge", help="A pairwise judge as module:function or file.py:function (see the README).")
    p.add_argument("--generate", type=int, default=32, help="Prompts both models answer (lengths, judge; 0 = none).")
    p.add_argument("--kl-samples", type=int, default=32, help="Prompts the model samples for the KL estimate (0 = none).")
    p.add_argument("--max-length", type=int)
    p.add_argument("--max-prompt-length", type=int)
    p.add_argument("--format", default="auto")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--chosen-field", default="chosen")
    p.add_argument("--rejected-field", default="rejected")
    p.add_argument("--output", help="Write the JSON here (default: RUN/eval.json for a run's final/ folder).")

    p = sub.add_parser("report", help="HTML page and PNGs of a run's curves (works while it runs).", allow_abbrev=False)
    p.add_argument("run_dir", help="The run folder (a training run's output_dir).")
    p.add_argument("--output-dir", help="Where to write (default: RUN_DIR/report).")

    p = sub.add_parser("push", help="Upload a run's final model (and model card) to the Hugging Face Hub.",
                       allow_abbrev=False)
    p.add_argument("run_dir", help="A finished run folder (its final/ is uploaded) or a model folder.")
    p.add_argument("repo", help="Hub repository, e.g. user/my-model (created if absent).")
    p.add_argument("--public", action="store_true", help="Create the repository as public (default: private).")
    p.add_argument("--commit-message")


def _run_eval_command(args: argparse.Namespace) -> int:
    if args.command == "generate":
        from preftune.generate import read_prompts, run_generate

        prompts = args.prompt or read_prompts(args.data, args.prompt_field)
        run_generate(args.model, prompts=prompts, output=args.output, base_model=args.base_model, dtype=args.dtype,
                     device=args.device, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, chat=args.chat)
        if args.output:
            print(f"wrote {len(prompts)} completion(s) to {args.output}", file=sys.stderr)
        return 0
    if args.command == "eval":
        from preftune.evaluate import format_eval, run_eval

        lengths = {k: getattr(args, k) for k in ("max_length", "max_prompt_length") if getattr(args, k) is not None}
        result = run_eval(args.model, args.data, reference=args.reference, base_model=args.base_model, beta=args.beta,
                          output=args.output, dtype=args.dtype, device=args.device, format=args.format,
                          prompt_field=args.prompt_field, chosen_field=args.chosen_field,
                          rejected_field=args.rejected_field, judge=args.judge, generate=args.generate,
                          kl_samples=args.kl_samples, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                          batch_size=args.batch_size, **lengths)
        print(format_eval(result))
        return 0
    if args.command == "report":
        from preftune.outputs.report import write_report

        report = write_report(args.run_dir, args.output_dir)
        for problem in report.problems:
            print(f"problem: {problem}")
        print(f"report: {report.html} ({len(report.pngs)} figures)")
        return 0
    from preftune.hub import push_run

    url = push_run(args.run_dir, args.repo, private=not args.public, commit_message=args.commit_message)
    print(f"pushed to {args.repo}: {url}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _run(argv)
    except PreftuneError as e:
        print(f"preftune: error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        code = 130
    if "torch" in sys.modules:  # no process group without torch, and `--help` need not import it
        from preftune.distributed import shutdown

        shutdown(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
