"""``python -m bench.gpu_copy``: does a received tensor's copy to the GPU overlap compute?

A received activation or gradient arrives in host memory; ``sl_pipeline.tensors.as_input``
copies it to the GPU through pinned memory without blocking (``non_blocking=True``). While
the GPU still works through earlier kernels (here a chain of matrix products), the host
can then go on (decode the next message, run the event loop) instead of waiting. For each
size this measures, median of ``REPEATS``:

* ``host_ms``: how long the host is held by the copy call while the GPU is busy, for
  ``as_input`` (pinned, non-blocking) and for a plain ``.to(device)`` from pageable memory;
* ``busy_ms``: the GPU work alone; ``total_ms``: GPU work, then the copy, then one
  synchronisation, per variant.

Needs a CUDA GPU (``bench/gpu_check.sh``); prints one JSON line.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch

from sl_pipeline.tensors import as_input

SIZES = {"64KiB": 64 << 10, "2MiB": 2 << 20, "32MiB": 32 << 20}
REPEATS = 20
BUSY_PRODUCTS = 10  # 4096^3 float32 products: tens of milliseconds of GPU work


def _busy(a: torch.Tensor) -> None:
    out = torch.empty_like(a)
    for _ in range(BUSY_PRODUCTS):
        torch.mm(a, a, out=out)  # values do not matter; the time the GPU spends does


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _timed(copy: Callable[[], torch.Tensor], a: torch.Tensor, busy: bool) -> tuple[float, float]:
    """(host ms held by ``copy``, ms until the GPU finished everything)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    if busy:
        _busy(a)
    before = time.perf_counter()
    copy()
    held = time.perf_counter() - before
    torch.cuda.synchronize()
    return held * 1e3, (time.perf_counter() - start) * 1e3


def measure(device: torch.device) -> dict[str, dict[str, float]]:
    a = torch.randn(4096, 4096, device=device) / 64
    results: dict[str, dict[str, float]] = {}
    for name, size in SIZES.items():
        received = torch.randn(size // 4)
        variants: dict[str, Callable[[], torch.Tensor]] = {
            "pinned_async": partial(as_input, received, False, device),
            "pageable_sync": partial(received.to, device),
        }
        row: dict[str, float] = {}
        busy_alone = [_timed(partial(_same, received), a, True)[1] for _ in range(REPEATS)]
        row["busy_ms"] = statistics.median(busy_alone)
        for label, copy in variants.items():
            copy()  # warm-up: pinned pool, allocator
            samples = [_timed(copy, a, True) for _ in range(REPEATS)]
            idle = [_timed(copy, a, False)[1] for _ in range(REPEATS)]
            row[f"{label}_host_ms"] = statistics.median(s[0] for s in samples)
            row[f"{label}_total_ms"] = statistics.median(s[1] for s in samples)
            row[f"{label}_alone_ms"] = statistics.median(idle)
        results[name] = row
    return results


def main() -> int:
    if not torch.cuda.is_available():
        print("bench.gpu_copy: no CUDA GPU is visible here", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    report = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__}
    print(json.dumps(report | {"copy": measure(device)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
