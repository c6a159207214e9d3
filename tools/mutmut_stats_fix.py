"""Only for `make mutate`: a fix for mutmut 3.8's stats pass with `max_stack_depth` set (pyproject.toml).

Its `record_trampoline_hit` resolves every frame's file strictly and crashes on frames that have no file
("<frozen importlib._bootstrap>" while modules import, "<string>" for dataclass-generated methods). This is the
same function with those frames skipped; conftest.py installs it only while mutmut collects its stats
(MUTANT_UNDER_TEST=stats), so ordinary test runs never import mutmut.
"""

from __future__ import annotations

import inspect
from pathlib import Path


def install() -> None:
    from mutmut.configuration import config
    from mutmut.mutation import trampoline
    from mutmut.state import state

    def record_trampoline_hit(name: str, caller: str | None = None) -> None:
        cfg = config()
        if cfg.max_stack_depth != -1:
            f, budget = inspect.currentframe(), cfg.max_stack_depth
            while budget and f:
                filename = f.f_code.co_filename
                f = f.f_back
                if "pytest" in filename or "unittest" in filename:
                    break
                if filename.startswith("<"):  # the fix: no file behind this frame
                    continue
                if any(p in Path(filename).resolve().parents for p in cfg.resolved_mutated_source_paths):
                    budget -= 1  # a frame of the package under test
            if not budget:
                return
        state()._stats.add(name)
        if caller is not None and cfg.track_dependencies:
            state().function_dependencies[name].add(caller)

    trampoline.record_trampoline_hit = record_trampoline_hit
