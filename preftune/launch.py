"""What the launcher (torchrun, `accelerate launch`, a scheduler) sets up around a process: its environment
variables, checked before accelerate reads them; the precision the accelerate config asks for; and how a finished
process of a multi-process job ends. The engine itself (one process, DDP, FSDP2, DeepSpeed) is distributed.py's.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Mapping

from preftune.errors import PreftuneError
from preftune.options import MIXED_PRECISIONS

_COUNTS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_PORT")
_SWITCHES = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_CPU")
# accelerate's str_to_bool
_BOOLS = ("y", "yes", "t", "true", "on", "1", "n", "no", "f", "false", "off", "0")
_LAUNCH = "start a multi-process run with `torchrun` or `accelerate launch`, which set them all"


def check_environment(env: Mapping[str, str] | None = None) -> None:
    """The variables torchrun and `accelerate launch` set, read by accelerate and torch.distributed: whole
    numbers where numbers, consistent with each other, a precision preftune trains in. A variable left from
    another job or typed by hand is one sentence here, before anything is read or written (accelerate would
    raise a traceback, wait for processes that never come, or ignore it)."""
    env = os.environ if env is None else env
    for name in _COUNTS:
        value = env.get(name)
        if value is not None and not (value.strip().isdigit() and (name != "WORLD_SIZE" or int(value) >= 1)):
            raise PreftuneError(f"the environment variable {name}={value!r} is not a whole number"
                                f"{' >= 1' if name == 'WORLD_SIZE' else ''}; unset it, or {_LAUNCH}.")
    world, rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
    if rank >= world:
        raise PreftuneError(f"the environment says this is process RANK={rank} of WORLD_SIZE={world}; unset RANK "
                            f"(and WORLD_SIZE), or {_LAUNCH}.")
    local, local_world = env.get("LOCAL_RANK"), env.get("LOCAL_WORLD_SIZE")
    if local is not None and local_world is not None and int(local) >= int(local_world):
        raise PreftuneError(f"the environment says LOCAL_RANK={local} of LOCAL_WORLD_SIZE={local_world}; {_LAUNCH}.")
    missing = [n for n in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(n)]
    if world > 1 and missing:
        raise PreftuneError(f"WORLD_SIZE={world} says this is one of {world} processes, but {', '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not set; unset WORLD_SIZE for one process, or "
                            f"{_LAUNCH}.")
    if not 0 < int(env.get("MASTER_PORT", "1")) < 65536:
        raise PreftuneError(f"MASTER_PORT={env['MASTER_PORT']} is not a port (1-65535); {_LAUNCH}.")
    for name in _SWITCHES:
        if env.get(name) is not None and env[name].strip().lower() not in _BOOLS:
            raise PreftuneError(f"the environment variable {name}={env[name]!r} is not true or false; unset it, "
                                "or set it in the accelerate config that `accelerate launch` reads.")
    launcher_precision(env)


def launcher_precision(env: Mapping[str, str] | None = None) -> str | None:
    """The mixed precision an `accelerate launch` config asked for (None when not launched that way)."""
    value = (os.environ if env is None else env).get("ACCELERATE_MIXED_PRECISION")
    if value is None or value.strip() == "":
        return None
    if value.strip().lower() not in MIXED_PRECISIONS:
        raise PreftuneError(f"ACCELERATE_MIXED_PRECISION={value!r} (the accelerate config's mixed_precision) is not "
                            "a precision preftune trains in: set mixed_precision to bf16, fp16 or no in the accelerate "
                            "config (or unset the variable and pass --mixed-precision).")
    return value.strip().lower()


def resolve_precision(requested: str, say: Callable[[str], None] = print) -> str:
    """preftune's `mixed_precision` unless left at "no" while the accelerate config asks for bf16/fp16."""
    launched = launcher_precision()
    if requested == "no" and launched not in (None, "no"):
        say(f"mixed precision {launched} (from the accelerate config)")
        return launched
    if launched is not None and launched != requested:
        say(f"mixed precision {requested} (preftune's mixed_precision; the accelerate config's {launched} is not used)")
    return requested


def shutdown(exit_code: int) -> None:
    """End a process of a multi-process job: tear down the process group, run the interpreter's exit handlers,
    flush, and exit with `exit_code` without C++ static destructors; returns at once when no group is up.

    Why not a plain return: a process of a 2-process FSDP2 job on CPU, its work done and saved, sometimes died
    while the interpreter shut down ("terminate called without an active exception", SIGABRT or SIGSEGV, no
    Python frame on any thread): 1-2 runs in 12, and 1 in 20 still after destroying the process group. torchrun
    then reports the whole job as failed. Skipping the C++ teardown of a finished process removes that, and
    every Python-level cleanup (atexit: temporary folders, trackers, logging) has run by then."""
    import torch  # imported by then: the CLI calls this only when a run has imported torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    import atexit

    torch.distributed.destroy_process_group()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(exit_code)
