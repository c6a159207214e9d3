"""Print a fixed sample of mutmut's mutant names for the given source files: every N-th, in mutmut's own order.

`make mutate` runs the light core modules whole; the modules whose every mutant costs training runs (recipe,
log-probs) are sampled with this on a 2-core machine, the same sample before and after a change, so the two
scores compare. Reads the `.meta` files that `mutmut run` writes under mutants/ when it generates mutants.

    python tools/mutation_sample.py EVERY preftune/recipe.py [...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def sample(every: int, sources: list[str]) -> list[str]:
    names: list[str] = []
    for source in sources:
        meta = Path("mutants") / f"{source}.meta"
        keys = list(json.loads(meta.read_text())["exit_code_by_key"])
        names += keys[::every]
    return names


if __name__ == "__main__":
    print(" ".join(sample(int(sys.argv[1]), sys.argv[2:])))
