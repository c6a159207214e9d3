"""final/README.md: a Hugging Face model card (YAML header + markdown) describing how the model was made.

Header: base_model (when the starting model is a hub id; a local folder cannot be referenced on the Hub, so
it is named in the text instead), library_name (transformers, or peft for adapters), tags (preftune, the task,
the loss names, lora), pipeline_tag. Body: base model, data (files, rows, sha256, one fingerprint over them),
loss, β and the key hyper-parameters, the final train/eval metrics, the preftune and library versions, and the
command that reproduces the run (the resolved config is embedded as YAML).

    from preftune.outputs.model_card import write_model_card_for_run
    write_model_card_for_run("runs/dpo")          # from the run's files (config.yaml, metrics.jsonl, ...)
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from preftune.callbacks import Callback
from preftune.config import read_yaml
from preftune.errors import PreftuneError
from preftune.outputs.files import replace_text, write_failure
from preftune.outputs.report import run_metric_rows
from preftune.version import __version__

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HYPER_PARAMETERS = ("loss", "loss_weights", "beta", "label_smoothing", "sft_weight", "learning_rate", "lr_scheduler",
                    "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm", "batch_size",
                    "gradient_accumulation_steps", "num_epochs", "max_steps", "max_length", "max_prompt_length",
                    "reference", "reference_model", "lora", "lora_r", "lora_alpha", "lora_target_modules", "dtype",
                    "mixed_precision", "seed")


def hub_base_model(model: str) -> str | None:
    """`model` when it names a hub repository; for a local folder, the hub id it was saved from when its
    config.json records one; else None."""
    path = Path(str(model)).expanduser()
    if not path.exists():
        return model if _HUB_ID.match(str(model)) else None
    try:
        origin = json.loads((path / "config.json").read_text(encoding="utf-8")).get("_name_or_path", "")
    except (OSError, ValueError):
        return None
    return origin if isinstance(origin, str) and _HUB_ID.match(origin) and not Path(origin).exists() else None


def file_facts(sources: Any) -> list[dict[str, Any]]:
    """path, bytes, rows (lines, for JSON lines files) and sha256 of each local data file in `sources`."""
    items = sources if isinstance(sources, (list, tuple)) else [sources]
    facts = []
    for item in items:
        p = Path(str(item)).expanduser()
        if not p.is_file():
            facts.append({"path": str(item)})
            continue
        h, rows = hashlib.sha256(), 0
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
                rows += block.count(b"\n")
        fact: dict[str, Any] = {"path": str(item), "bytes": p.stat().st_size, "sha256": h.hexdigest()}
        if p.suffix.lower() in (".jsonl", ".ndjson"):
            fact["rows"] = rows
        facts.append(fact)
    return facts


def _data_info(config: dict, data_info: dict | None) -> dict[str, Any]:
    if data_info:
        return dict(data_info)
    files = file_facts(config.get("data")) + (file_facts(config["eval_data"]) if config.get("eval_data") else [])
    hashes = [f["sha256"] for f in files if "sha256" in f]
    info: dict[str, Any] = {"files": files}
    if hashes:
        info["fingerprint"] = hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]
    return info


def _versions() -> dict[str, str]:
    out = {"preftune": __version__}
    for name in ("torch", "transformers", "peft", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def launch_command() -> str | None:
    """The command line this process was started with, when it was the preftune CLI."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if prog in ("preftune", "__main__.py", "cli.py"):
        return "preftune " + shlex.join(sys.argv[1:])
    return None


def _table(rows: list[tuple[str, Any]], head: str = "setting") -> str:
    def cell(v: Any) -> str:
        text = f"{v:.6g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    return f"| {head} | value |\n|---|---|\n" + "".join(f"| {k} | {cell(v)} |\n" for k, v in rows)


def card_text(config: dict[str, Any], *, task: str = "dpo", train_metrics: dict | None = None,
              eval_metrics: dict | None = None, data_info: dict | None = None, data_summary: str = "",
              adapter: bool = False, command: str | None = None, versions: dict | None = None) -> str:
    """The model card (YAML header + markdown) for a run with resolved `config` (TrainConfig.to_dict())."""
    from huggingface_hub import ModelCardData

    versions = versions or _versions()
    model = str(config.get("model", ""))
    base = hub_base_model(model)
    losses = config.get("loss", "sigmoid")
    losses = [s.strip() for s in re.split(r"[+,]", losses)] if isinstance(losses, str) else [str(x) for x in losses]
    tags = ["preftune", task] + (["lora"] if adapter else [])
    header = ModelCardData(base_model=base, library_name="peft" if adapter else "transformers", tags=tags,
                           pipeline_tag="text-generation").to_yaml()
    what = (f"preference fine-tuning (loss {' + '.join(losses)}, β = {config.get('beta')})" if task == "dpo"
            else "supervised fine-tuning")
    info = _data_info(config, data_info)
    out = [f"---\n{header}\n---\n", f"# {Path(str(config.get('output_dir') or 'model')).name}\n",
           f"`{model}` fine-tuned by {what} with preftune {versions.get('preftune', '?')}"
           + (" as LoRA adapters." if adapter else "."), "", "## Training data", ""]
    files = info.get("files") or []
    if files and all(isinstance(f, dict) for f in files):
        out.append("| file | rows | sha256 |\n|---|---|---|")
        out += [f"| {f.get('path')} | {f.get('rows', '')} | {f.get('sha256', '')} |" for f in files] + [""]
    out += [f"- {k}: {v}" for k, v in info.items() if k != "files" or not all(isinstance(f, dict) for f in files)]
    if data_summary.strip():
        out += ["", "```text", data_summary.strip(), "```"]
    out += ["", "## Training procedure", "", _table([("task", task)] + [(k, config[k]) for k in HYPER_PARAMETERS
                                                                         if k in config])]
    for title, metrics in (("Final training metrics", train_metrics), ("Final evaluation metrics", eval_metrics)):
        if metrics:
            out += [f"### {title}", "", _table([(k, v) for k, v in metrics.items() if k != "split"], "metric")]
    out += ["## Reproduce", ""]
    if command:
        out += ["Launched as:", "", f"```bash\n{command}\n```", ""]
    verb = "train" if task == "dpo" else "sft"
    out += ["Save the resolved config below as `config.yaml` and run:", "",
            f"```bash\npip install preftune=={versions.get('preftune', '')}\npreftune {verb} config.yaml\n```", "",
            "```yaml", yaml.safe_dump(config, sort_keys=False).strip(), "```", "", "## Use", "", "```python"]
    if adapter:
        out += ["from peft import AutoPeftModelForCausalLM", "model = AutoPeftModelForCausalLM.from_pretrained(PATH)"]
    else:
        out += ["from transformers import AutoModelForCausalLM", "model = AutoModelForCausalLM.from_pretrained(PATH)"]
    out += ["```", "", "Or sample from it: `preftune generate --model PATH --prompt \"...\"`.", "",
            "## Framework versions", ""] + [f"- {k} {v}" for k, v in versions.items()]
    return "\n".join(out) + "\n"


def write_model_card(final_dir: str | Path, config: dict[str, Any], **kwargs: Any) -> Path:
    """Write final_dir/README.md (see `card_text` for the keyword arguments) atomically and never through a link
    (a link planted at README.md, dangling or not, is refused); `adapter` defaults to whether the folder holds
    LoRA adapters."""
    folder = Path(final_dir)
    kwargs.setdefault("adapter", (folder / "adapter_config.json").is_file())
    path = folder / "README.md"
    try:
        replace_text(path, card_text(config, **kwargs), fix="put a README.md of your own there")
    except OSError as e:
        failure = write_failure(e, folder)
        raise PreftuneError(f"cannot write the model card {path} ({failure[0] if failure else e.strerror or e})."
                            ) from None
    return path


def write_model_card_for_run(run_dir: str | Path) -> Path:
    """The card of a finished run from its files: config.yaml, the last metrics.jsonl rows, data_summary.txt."""
    run = Path(run_dir).expanduser()
    final = run / "final"
    if not (run / "config.yaml").is_file() or not final.is_dir():
        raise PreftuneError(f"{run} is not a finished preftune run (it needs config.yaml and final/).")
    config = read_yaml(run / "config.yaml")  # bounded like any config (a YAML alias bomb is refused)
    rows = []
    if (run / "metrics.jsonl").is_file():
        rows = run_metric_rows(run)
    last = {s: next((r for r in reversed(rows) if r.get("split") == s), None) for s in ("train", "eval")}
    task = "dpo" if any("rewards/margins" in r for r in rows) or not rows else "sft"
    summary = ((run / "data_summary.txt").read_bytes()[:200_000].decode("utf-8", errors="replace")
               if (run / "data_summary.txt").is_file() else "")
    return write_model_card(final, config, task=task, train_metrics=last["train"], eval_metrics=last["eval"],
                            data_summary=summary)


class ModelCardCallback(Callback):
    """Training callback: writes final/README.md when training ends with a final model (main process only).
    Install it before HubCallback so the card is pushed."""

    def on_train_end(self, state) -> None:
        if not state.is_main_process or state.final_dir is None:  # (final/ is whole even when a signal came after)
            return
        cfg = state.config.to_dict() if hasattr(state.config, "to_dict") else dict(state.config)
        write_model_card(state.final_dir, cfg, task=state.task, train_metrics=state.train_metrics,
                         eval_metrics=state.eval_metrics, data_info=getattr(state, "data_info", None) or None,
                         data_summary=state.data_summary or "", command=launch_command())
