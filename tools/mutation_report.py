"""Turn `mutmut results --all true` into the mutation report of `make mutate` (per module and in total).

Reads the listing on stdin (lines `    preftune.module.x_function__mutmut_N: status`), writes Markdown to stdout.
Score = killed / (killed + survived + no tests + suspicious): timeouts count as killed (the mutant made the tests
hang), and mutants that no selected test reaches count against the score. Survivors are listed so each can be
read with `mutmut show NAME` and either killed by a test or explained in tools/MUTATION.md.
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict

LINE = re.compile(r"^\s*(?P<name>[\w.]+?)\.(?P<func>x[_ǁ][^:]*__mutmut_\d+): (?P<status>.+)$")
KILLED = {"killed", "timeout", "caught by type check"}
COUNTED = KILLED | {"survived", "no tests", "suspicious"}


def main() -> int:
    by_module: dict[str, Counter] = defaultdict(Counter)
    survivors: list[str] = []
    for line in sys.stdin:
        m = LINE.match(line.rstrip("\n"))
        if not m:
            continue
        status = m["status"].strip()
        by_module[m["name"]][status] += 1
        if status in COUNTED - KILLED:
            survivors.append(f"{m['name']}.{m['func']}: {status}")
    if not by_module:
        print("no mutmut results found; run `mutmut run` first", file=sys.stderr)
        return 1
    total = Counter()
    print("# Mutation report\n")
    print("| module | killed | survived | no tests | not run / other | score |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for module in sorted(by_module):
        c = by_module[module]
        total.update(c)
        print(_row(module, c))
    print(_row("**total**", total))
    print(f"\n## Not killed ({len(survivors)})\n")
    for s in survivors:
        print(f"- `{s}`")
    return 0


def _row(label: str, c: Counter) -> str:
    killed = sum(c[s] for s in KILLED)
    counted = sum(c[s] for s in COUNTED)
    other = sum(c.values()) - counted
    score = f"{100 * killed / counted:.1f}%" if counted else "-"
    return f"| {label} | {killed} | {c['survived']} | {c['no tests']} | {other} | {score} |"


if __name__ == "__main__":
    sys.exit(main())
