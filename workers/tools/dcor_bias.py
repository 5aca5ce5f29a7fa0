"""Distance correlation's bias under independence: ``python -m workers.tools.dcor_bias``.

:func:`privacy.nopeek.distance_correlation` is a V-statistic, biased upwards when the two sides
are independent, more so in few rows and many dimensions. This measures that floor: the mean
over ``--repeats`` draws of dCor between two independent standard Gaussian samples of ``n`` rows
and ``d`` dimensions each, for every ``--rows`` x ``--dims`` pair (docs/privacy.md, *NoPeek*:
compare dCor values only at equal batch sizes and widths).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from privacy.nopeek import distance_correlation
from sl_pipeline.errors import ConfigError, SLError


def bias(rows: Sequence[int], dims: Sequence[int], repeats: int, seed: int = 0) -> list[dict]:
    """The mean dCor of independent samples for each (rows, dims) pair, seeded."""
    if min(rows, default=0) < 2 or min(dims, default=0) < 1 or repeats < 1:
        raise ConfigError("--rows need at least 2, --dims and --repeats at least 1")
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in rows:
        for d in dims:
            found = [
                float(
                    distance_correlation(
                        torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
                    )
                )
                for _ in range(repeats)
            ]
            out.append({"rows": n, "dims": d, "dcor": sum(found) / repeats, "repeats": repeats})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.tools.dcor_bias", description=__doc__)
    p.add_argument("--rows", type=int, nargs="+", default=[100, 2000])
    p.add_argument("--dims", type=int, nargs="+", default=[1, 2, 8, 64])
    p.add_argument("--repeats", type=int, default=5, help="draws per pair (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="a JSON list instead of lines")
    args = p.parse_args(argv)
    try:
        found = bias(args.rows, args.dims, args.repeats, args.seed)
    except SLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    for r in found:
        print(f"n = {r['rows']}, {r['dims']} dimensions: dCor {r['dcor']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
