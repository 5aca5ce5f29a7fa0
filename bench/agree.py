"""Do runs of the same build agree? ``python -m bench.agree RUN.json RUN.json ...``

Each argument is the output of ``sl-pipeline bench --json`` (the file may hold the whole
stdout: the last line that starts with ``{`` is read). For every ratio the issue's targets
name, prints each run's value, the spread ``max / min - 1`` and whether it is within the
tolerance (10 %); under a ratio that differs, each run's interquartile range of pair ratios
and its number of pairs where the run kept them; then the machine load each run recorded.
Exit status 0 when every ratio
present in all runs agrees, 1 when one does not, 2 on unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The ratios issue 18 asks to agree within 10 % over three `--quick` runs of one build.
RATIOS = (
    "encryption_overhead",
    "encryption_cpu_ratio",
    "overhead_ratio",
    "overhead_cpu_ratio",
    "overhead_ratio_pipelined",
    "wan_40ms_of_bound",
    "wan_40ms_speedup",
)
TOLERANCE = 0.10


def read_run(path: Path) -> dict[str, Any]:
    """The JSON object of one bench run: the last line of the file that starts with ``{``."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("{")]
    if not lines:
        raise ValueError(f"{path}: no JSON line; save `sl-pipeline bench --json` output there")
    result = json.loads(lines[-1])
    if not isinstance(result, dict):
        raise ValueError(f"{path}: the last JSON line is not an object")
    return result


def flatten(run: dict[str, Any]) -> dict[str, float]:
    """``{"overhead_ratio.digits_cnn": 1.6, "wan_40ms_of_bound": 0.85, ...}`` for RATIOS."""
    flat: dict[str, float] = {}
    for key in RATIOS:
        value = run.get(key)
        if isinstance(value, dict):
            for label, figure in value.items():
                if isinstance(figure, int | float):
                    flat[f"{key}.{label}"] = float(figure)
        elif isinstance(value, int | float):
            flat[key] = float(value)
    return flat


def quartiles(run: dict[str, Any], name: str) -> str | None:
    """``[q1-q3, pairs]`` of one ratio in one run, from its ``*_spread`` figure, or None.
    A wide range or few pairs says the run's own median is unsure; a narrow one whose
    runs still differ says the machine moved between runs."""
    key, _, label = name.partition(".")
    figure = run.get(f"{key}_spread")
    if label and isinstance(figure, dict):
        figure = figure.get(label)
    if not isinstance(figure, dict) or not {"q1", "q3", "pairs"} <= set(figure):
        return None
    return f"[{figure['q1']:.2f}-{figure['q3']:.2f}, {figure['pairs']}]"


def spread(values: Sequence[float]) -> float:
    """How far the runs disagree: the largest over the smallest, less one."""
    low, high = min(values), max(values)
    return float("inf") if low <= 0 else high / low - 1


def compare(runs: Sequence[dict[str, Any]], tolerance: float = TOLERANCE) -> list[dict[str, Any]]:
    """One row per ratio present in every run: its values, spread and verdict."""
    flats = [flatten(run) for run in runs]
    common = [name for name in flats[0] if all(name in flat for flat in flats[1:])]
    rows = []
    for name in common:
        values = [flat[name] for flat in flats]
        rows.append(
            {
                "ratio": name,
                "values": values,
                "spread": spread(values),
                "agree": spread(values) <= tolerance,
            }
        )
    return rows


def load_of(run: dict[str, Any]) -> str:
    """The 1-minute load averages the run recorded around its sections, as ``a-b``."""
    loads = [
        figure
        for section in (run.get("load") or {}).values()
        if isinstance(section, dict)
        for key, figure in section.items()
        if key.startswith("loadavg_1min") and isinstance(figure, int | float)
    ]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "?"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agree", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="saved `bench --json` outputs")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two runs to compare")
    try:
        runs = [read_run(path) for path in args.runs]
    except (OSError, ValueError) as exc:
        print(f"bench.agree: {exc}", file=sys.stderr)
        return 2
    rows = compare(runs, args.tolerance)
    if not rows:
        print("bench.agree: no ratio is present in every run", file=sys.stderr)
        return 2
    width = max(len(row["ratio"]) for row in rows)
    for row in rows:
        values = " ".join(f"{v:7.3f}" for v in row["values"])
        verdict = "agree" if row["agree"] else "DIFFER"
        print(f"{row['ratio']:<{width}} {values}  spread {row['spread']:6.1%}  {verdict}")
        ranges = [quartiles(run, row["ratio"]) for run in runs]
        if not row["agree"] and all(ranges):
            print(f"{'  quartiles, pairs':<{width}} " + " ".join(str(r) for r in ranges))
    print("load (1-minute average during each run): " + ", ".join(load_of(r) for r in runs))
    return 0 if all(row["agree"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
