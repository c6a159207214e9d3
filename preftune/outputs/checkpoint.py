"""Checkpoints and the final model folder, written atomically.

A checkpoint is written to a temporary folder and renamed into place, so a crash or a full disk in the
middle of a write leaves the previous checkpoint whole. It holds the trainable weights (all of them, or
the adapters), the optimizer and scheduler, the RNG states, the step (which, with the seed, fixes the
data position because batch order is a pure function of seed and epoch), the reward shift and a link to
the reference cache it used.

    step-NNNNNNN/
      state/              trainable weights + optimizer: torch.distributed.checkpoint (DCP), each process
                          writing its own shards under FSDP2; a DeepSpeed engine's own checkpoint under ZeRO
      scheduler.pt        the learning-rate schedule (weights_only-loadable)
      rng/rank-NNNNN.pt   each process's RNG states
      trainer_state.json  the step, reward shift, launch shape; written last
      metrics.jsonl, config.yaml, the reference cache (hard link)

Every process calls `save_checkpoint` and `load_checkpoint` (they synchronise through torch.distributed when
it is initialised). DCP keys tensors by parameter name whatever the wrapper (DDP, FSDP2, activation
checkpointing), and reshards on load, so a checkpoint from one launch shape loads into another (one process,
DDP, FSDP2 with any number of processes); a DeepSpeed checkpoint resumes under the same DeepSpeed setup
(DeepSpeed's own "universal checkpoint" conversion is the way across shapes). `final/` is consolidated:
`save_final` takes the gathered state dict of a sharded run and writes what a one-process run writes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preftune.errors import PreftuneError
from preftune.outputs.manifest import (
    CHECKPOINTS,
    MANIFEST,
    damage,
    list_checkpoints,
    step_folders,
    write_manifest,
)


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def _all_ok(ok: bool) -> bool:
    """True when `ok` holds on every process (a failed write anywhere fails the checkpoint everywhere)."""
    if _rank_world()[1] == 1:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([int(ok)])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _is_deepspeed(model: Any) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def _dcp_state(model: torch.nn.Module, optimizer) -> tuple[dict[str, Any], Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # accelerate wraps the optimizer; DCP's helpers want the torch optimizer underneath.
    optim = getattr(optimizer, "optimizer", optimizer)
    with _quiet():
        msd, osd = get_state_dict(model, optim, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": msd, "optimizer": osd}, optim


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        # "assuming the intent is to save in a single process": yes, that is the one-process case.
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
        yield


def _write_state(folder: Path, model: torch.nn.Module, optimizer, scheduler) -> None:
    """The sharded part of a checkpoint, written by every process."""
    rank, _ = _rank_world()
    if _is_deepspeed(model):
        # What accelerate's save_state does for a DeepSpeed engine: its own (ZeRO-partitioned) checkpoint.
        # Frozen weights (a LoRA run's base) are not saved: they come from the model folder again on resume.
        model.save_checkpoint(str(folder / "state"), tag="engine", save_latest=False, exclude_frozen_parameters=True)
    else:
        import torch.distributed.checkpoint as dcp

        state, _ = _dcp_state(model, optimizer)
        with _quiet():
            dcp.save(state, checkpoint_id=str(folder / "state"))
    (folder / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), folder / "rng" / f"rank-{rank:05d}.pt")
    if rank == 0:
        torch.save({"scheduler": scheduler.state_dict()}, folder / "scheduler.pt")


def _disk_full(e: BaseException) -> bool:
    """ENOSPC anywhere in `e` (DCP wraps each process's failure in a CheckpointException)."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    failures = [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
    return any(isinstance(x, BaseException) and x is not e and _disk_full(x)
               for x in [*failures, e.__cause__, e.__context__])


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
    """Write checkpoint `step` (every process calls this; see the module docstring). `model` is the policy
    as the engine prepared it, `optimizer` likewise."""
    rank, _ = _rank_world()
    root = run_dir / CHECKPOINTS
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    error: BaseException | None = None
    try:
        _write_state(tmp, model, optimizer, scheduler)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # every process must reach the agreement below (DCP raises BaseExceptions)
        error = e
    ok = _all_ok(error is None)
    if ok and rank == 0:
        try:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
            for f in copies:  # metrics so far and the resolved config: small, and a resume restores them
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
            if reference_cache is not None and reference_cache.is_file():
                try:
                    os.link(reference_cache, tmp / reference_cache.name)
                except OSError:
                    shutil.copy2(reference_cache, tmp / reference_cache.name)
            # Last, once every process has written its shards: a folder without its manifest was never finished.
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:
            error = e
    ok = _all_ok(ok and error is None)
    if not ok:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is None:
            raise PreftuneError(f"another process failed to write the checkpoint for step {step} (its error is "
                                "above); the previous checkpoint is intact.")
        # A full disk, a quota, a read-only folder: the caller's RunDir.saving turns it into one sentence.
        raise error
    if rank == 0:
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    return final


def pick_checkpoint(run_dir: Path, resume: Any, say: Callable[[str], None] = print) -> Path | None:
    """The checkpoint `resume` (TrainConfig.resume, its spellings already read there) asks for, verified against
    its manifest: true → the newest intact one in the run folder (damaged newer ones are named in one
    line); "auto" → the same, or None (start afresh) when the folder has no checkpoint at all; a path → that
    checkpoint if intact, else refused; false/None → None."""
    if not resume:
        return None
    root = run_dir / CHECKPOINTS
    if resume is True or resume == "auto":
        candidates = step_folders(root)
        if not candidates:
            if resume == "auto":
                return None
            raise PreftuneError(f"--resume found no checkpoint in {root}; run without --resume to start fresh (with "
                                "--overwrite if the folder is not empty).")
        damaged: list[str] = []
        for c in reversed(candidates):
            why = damage(c)
            if why is None:
                if damaged:
                    say(f"resuming from {c.name}, the newest intact checkpoint: {'; '.join(damaged)}")
                return c
            damaged.append(f"{c.name} is damaged ({why})")
        raise PreftuneError(f"no intact checkpoint in {root}: {'; '.join(damaged)}; run without --resume to start "
                            "again (with --overwrite), or restore a checkpoint from a backup.")
    path = Path(str(resume)).expanduser()
    if not (path / MANIFEST).exists() and not (path / "trainer_state.json").exists():
        raise PreftuneError(f"{path} is not a preftune checkpoint (no trainer_state.json); pass a folder from "
                            f"{root} or --resume alone for the latest.")
    why = damage(path)
    if why is None:
        return path
    intact = next((c for c in reversed(step_folders(path.parent)) if c != path and damage(c) is None), None)
    if intact is not None:
        raise PreftuneError(f"checkpoint {path} is damaged ({why}); resume from {intact} instead (--resume "
                            f"{intact}), or start again without --resume.")
    raise PreftuneError(f"checkpoint {path} is damaged ({why}) and no checkpoint beside it is intact; start again "
                        "without --resume, or restore the checkpoint from a backup.")


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Restore weights, optimizer, schedule and RNG from `path` into the prepared `model`/`optimizer` (every
    process calls this); returns trainer_state.json. Anything that cannot be read is one sentence."""
    try:
        return _load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    except PreftuneError:
        raise
    except Exception as e:
        # Files as saved (the manifest matched) of another layout or version, or a pickle weights_only refuses.
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PreftuneError(f"checkpoint {path} could not be loaded ({first}); resume from another checkpoint "
                            "(--resume PATH) or start again without --resume.") from None


def _load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer, scheduler) -> dict[str, Any]:
    if not (path / "state").is_dir():
        raise PreftuneError(f"checkpoint {path} has no state/ folder: it was written by an older preftune or is "
                            "incomplete; start a fresh run or pass another checkpoint.")
    if _is_deepspeed(model):
        loaded, _ = model.load_checkpoint(str(path / "state"), tag="engine", load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise PreftuneError(f"checkpoint {path} holds no DeepSpeed state (it was written by another "
                                "engine); resume under the launch that wrote it.")
    else:
        _load_dcp(path, model, optimizer)
    state = torch.load(path / "scheduler.pt", weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    rank, _ = _rank_world()
    rng = path / "rng" / f"rank-{rank:05d}.pt"
    # A process the saving run did not have keeps its fresh seed: RNG only drives dropout (off by default);
    # the data order is a pure function of seed and epoch.
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())


# What a DCP .metadata file may name (torch pickles it); anything else is refused unread, since unpickling a
# planted file could run code. Tensors themselves are read with torch.load(weights_only=True) by DCP.
_METADATA_CLASSES = {
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict", "slice"},
}


def _safe_reader(folder: Path):
    """torch.distributed.checkpoint's file reader with a restricted unpickler for the metadata."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            allowed = module == "torch.distributed.checkpoint.metadata" or name in _METADATA_CLASSES.get(module, ())
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                allowed = True
            if not allowed:
                raise PreftuneError(f"the checkpoint metadata in {folder} names {module}.{name}, which no checkpoint "
                                    "holds; it was not read (unpickling it could run code): resume from another "
                                    "checkpoint or start again without --resume.")
            return super().find_class(module, name)

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            # As FileSystemReader.read_metadata (torch 2.4-2.13), with the unpickler above.
            rank = kwargs.get("rank")
            name = ".metadata" if rank is None else f"__{rank}.metadata"
            with open(folder / name, "rb") as f:
                metadata = Unpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

    return Reader(str(folder))


def _load_dcp(path: Path, model: torch.nn.Module, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state, optim = _dcp_state(model, optimizer)
    try:
        with _quiet():
            reader = _safe_reader(path / "state")
            reader.read_metadata()  # refused here with its own sentence, before DCP wraps errors in collectives
            dcp.load(state, storage_reader=reader)
    except (KeyboardInterrupt, SystemExit, PreftuneError):
        raise
    except BaseException as e:  # DCP wraps every process's failure; a line names the missing weight
        detail = str(e).splitlines()
        missing = next((line.strip() for line in detail if "Missing key" in line), detail[0] if detail else "")
        raise PreftuneError(f"checkpoint {path} does not match this model ({missing}); resume with the same "
                            "model and LoRA settings.") from None
    with _quiet():
        # strict=False: frozen weights are not in a checkpoint; every trainable one was (dcp.load checked).
        set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))


def save_final(run_dir: Path, model: torch.nn.Module, tokenizer, *, merge_lora: bool,
               state_dict: dict[str, torch.Tensor] | None = None,
               dtypes: dict[str, torch.dtype] | None = None) -> Path:
    """final/: a folder AutoModelForCausalLM/AutoTokenizer (or PEFT, for adapters) load directly.

    `state_dict`: the gathered weights of a sharded run (keys of `model.state_dict()`), saved through a
    copy of `model` built on the meta device and filled with them, so the folder is the one a one-process
    run writes; `dtypes` casts them back to the dtypes the weights had before sharding (FSDP2 keeps fp32
    master weights under mixed precision)."""
    final = run_dir / "final"
    tmp = run_dir / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    to_save = model if state_dict is None else _materialise(model, state_dict, dtypes or {})
    if merge_lora and hasattr(to_save, "merge_and_unload"):
        import copy

        to_save = (copy.deepcopy(to_save) if to_save is model else to_save).merge_and_unload()
    to_save.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _materialise(model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                 dtypes: dict[str, torch.dtype]) -> torch.nn.Module:
    """A CPU module like `model` (a transformers model, or a PEFT model around one) holding `state_dict`."""
    peft_config = getattr(model, "peft_config", None)
    base = model.get_base_model() if peft_config else model
    with torch.device("meta"):
        shell = type(base)(base.config)
    if peft_config:
        from peft import get_peft_model

        name = getattr(model, "active_adapter", "default")
        shell = get_peft_model(shell, peft_config[name])
    sd = {k: v.to(dtypes[k]) if k in dtypes and v.is_floating_point() else v for k, v in state_dict.items()}
    missing, _ = shell.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if k in dtypes]  # non-persistent buffers are not saved anyway
    if missing:
        raise PreftuneError(f"the gathered weights lack {len(missing)} of the model's (e.g. {missing[0]}); "
                            "final/ was not written.")
    if getattr(base, "generation_config", None) is not None:
        getattr(shell, "get_base_model", lambda: shell)().generation_config = base.generation_config
    shell.tie_weights() if hasattr(shell, "tie_weights") else None
    return shell
