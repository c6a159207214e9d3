"""Checkpoints and the final model folder, written atomically.

A checkpoint is written to a temporary folder and renamed into place, so a crash or a full disk in the
middle of a write leaves the previous checkpoint whole. It holds the trainable weights (all of them, or
the adapters), the optimizer and scheduler, the RNG states, the step (which, with the seed, fixes the
data position because batch order is a pure function of seed and epoch), the reward shift and a link to
the reference cache it used.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from preftune.errors import PreftuneError
from preftune.outputs.manifest import write_manifest

CHECKPOINTS = "checkpoints"


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters lists a tied weight once, so safetensors never sees shared storage.
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    # Only tensors and plain values, so torch.load(weights_only=True) can read it back (no pickle of objects).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, *, model: torch.nn.Module, optimizer, scheduler,
                    trainer_state: dict[str, Any], reference_cache: Path | None, keep: int,
                    copies: tuple[Path, ...] = ()) -> Path:
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(_trainable(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        for f in copies:  # metrics so far and the resolved config: small, and a resume restores them
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        if reference_cache is not None and reference_cache.is_file():
            try:
                os.link(reference_cache, tmp / reference_cache.name)
            except OSError:
                shutil.copy2(reference_cache, tmp / reference_cache.name)
        write_manifest(tmp)  # last: a folder without its manifest was never finished
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise PreftuneError(f"the disk filled while writing the checkpoint for step {step}; the previous "
                                "checkpoint is intact; free space and resume with --resume.") from None
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and (p / "trainer_state.json").is_file())


def find_checkpoint(run_dir: Path, resume: Any) -> Path | None:
    """`resume`: True/"latest" → newest checkpoint in the run folder; a path → that checkpoint."""
    if resume in (None, False, "", "false", "False"):
        return None
    if resume in (True, "true", "True", "latest"):
        found = list_checkpoints(run_dir)
        if not found:
            raise PreftuneError(f"--resume found no checkpoint in {run_dir / CHECKPOINTS}; run without --resume "
                                "to start fresh (with --overwrite if the folder is not empty).")
        return found[-1]
    path = Path(str(resume))
    if not (path / "trainer_state.json").is_file():
        raise PreftuneError(f"{path} is not a preftune checkpoint (no trainer_state.json); pass a folder from "
                            f"{run_dir / CHECKPOINTS} or --resume alone for the latest.")
    return path


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer, scheduler) -> dict[str, Any]:
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in params if params[n].requires_grad and n not in weights]
    if missing:
        raise PreftuneError(f"checkpoint {path} does not match this model ({len(missing)} trainable weights "
                            f"missing, e.g. {missing[0]}); resume with the same model and LoRA settings.")
    with torch.no_grad():
        for name, t in weights.items():
            params[name].copy_(t)
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return json.loads((path / "trainer_state.json").read_text())


def save_final(run_dir: Path, model: torch.nn.Module, tokenizer, *, merge_lora: bool) -> Path:
    """final/: a folder AutoModelForCausalLM/AutoTokenizer (or PEFT, for adapters) load directly."""
    final = run_dir / "final"
    tmp = run_dir / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    to_save = model
    if merge_lora and hasattr(model, "merge_and_unload"):
        import copy

        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
