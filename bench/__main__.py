"""``python -m bench [--quick] [--json] [--only SECTION ...]``: run the benchmarks.

Prints a table; with ``--json`` the last stdout line is one JSON object holding every
figure. A section that fails is reported (in the table and under ``errors``) and the
others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from workers.runtime import eventloop

from . import SECTIONS
from .common import machine_load

KEYS = (
    "cipher",
    "encryption_overhead",
    "encryption_overhead_by_cipher",
    "encryption_overhead_spread",
    "encryption_cpu_ratio",
    "encryption_overhead_wan",
    "encryption_overhead_wan_spread",
    "chunked_vs_whole_wan",
    "aead_gb_s",
    "aead_gil",
    "transport_efficiency",
    "transport_efficiency_spread",
    "overhead_ratio",
    "overhead_ratio_spread",
    "overhead_ratio_pipelined",
    "overhead_cpu_ratio",
    "overhead_ratio_pinned",
    "overhead_cpu_ratio_pinned",
    "rpc_ratio",
    "rpc_cpu_ratio",
    "rpc_ratio_same_host_shm",
    "scaling",
    "efficiency_64",
    "server_mem_per_client_mib",
    "flops_table",
    "scrape_slowdown",
    "chunk_table",
    "wan_40ms_of_bound",
    "wan_40ms_of_pipelined_bound",
    "wan_40ms_speedup",
    "wan_40ms_depth",
    "load",
)


def pin_threads(threads: int) -> None:
    """One torch thread per party by default: client and server share this machine's cores."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)  # inherited by every child and worker process
    import torch

    torch.set_num_threads(threads)


def machine() -> str:
    return f"{os.cpu_count()}-core {platform.machine()} CPU, Python {platform.python_version()}"


def _runner(name: str, quick: bool, results: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    import importlib

    module = importlib.import_module(f"bench.{name}")
    if name == "rpc":
        overhead = results.get("overhead")  # holds RPC blocks run beside our own steps
        return lambda: module.run(quick, overhead)  # type: ignore[no-any-return]
    return lambda: module.run(quick)  # type: ignore[no-any-return]


def run_all(sections: Sequence[str], quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Run each section; ``load`` keeps the machine's load averages before and after each,
    since a busy machine (other processes on the same cores) moves every figure."""
    results: dict[str, Any] = {"errors": {}, "seconds": {}, "load": {"start": machine_load()}}
    for name in sections:
        log(f"bench: {name} ...")
        start = time.monotonic()
        before = machine_load()["loadavg"][0]
        try:
            results.update(_runner(name, quick, results)())
        except Exception as exc:  # one failing section must not hide the others
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
        results["seconds"][name] = round(time.monotonic() - start, 1)
        results["load"][name] = {
            "loadavg_1min_before": before,
            "loadavg_1min_after": machine_load()["loadavg"][0],
        }
    results["load"]["end"] = machine_load()
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="fewer pairs, no 64 clients (3-4 min quiet)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per party")
    parser.add_argument(
        "--device",
        default="cpu",
        help="overhead: where both sides train (cpu, cuda; SL_BENCH_DEVICE)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="overhead: also run pairs with each party on its own core (SL_BENCH_PIN=1)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    pin_threads(args.threads)
    if args.pin:
        os.environ["SL_BENCH_PIN"] = "1"
    if args.device != "cpu":
        from sl_pipeline.errors import ConfigError
        from sl_pipeline.models import resolve_device

        try:
            resolve_device(args.device)
        except ConfigError as exc:
            print(f"bench: --device {args.device}: {exc}", file=sys.stderr)
            return 2
    os.environ["SL_BENCH_DEVICE"] = args.device
    from .report import render

    results = run_all(args.only, args.quick, lambda text: print(text, file=sys.stderr))
    results.update(
        machine=machine(),
        event_loop=eventloop.loop_name(),
        quick=args.quick,
        threads_per_party=args.threads,
    )
    results["device"] = args.device
    print(render(results, results["errors"], results["machine"]))
    if args.json:
        summary = {key: results.get(key) for key in KEYS}
        extra = {k: v for k, v in results.items() if k not in summary}
        print(json.dumps(summary | extra, default=str))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
