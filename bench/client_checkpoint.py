"""What a client's ``[checkpoint]`` costs: ``python -m bench.client_checkpoint [--repeats N]``.

``sl-pipeline init`` and ``provision`` give each client a ``[checkpoint]`` section, so a client
killed without a stop (``kill -9``, the OOM killer, a power cut) carries on with the same
command. This measures its price the way a user pays it: a deployment written by ``init``,
its server and clients started as ``sl-pipeline`` processes, and each setting's client run
(a new run on the same server) timed by its own summary (``wall_seconds``: the training,
without the interpreter's start) and by its CPU time. Settings run interleaved (none, then
each checkpoint setting, repeated), so a burst of load on a shared machine hits them alike;
each run writes into a folder of its own (nothing to resume from).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from workers.runtime.checkpoint import CheckpointStore
from workers.tools.localdeploy import init_deployment

from .common import machine_load, stop_process

SETTINGS: dict[str, tuple[str, ...]] = {
    "none": ('checkpoint.dir=""',),
    "every 1, no fsync (init)": ("checkpoint.every_steps=1", "checkpoint.fsync=false"),
    "every 1, fsync (provision)": ("checkpoint.every_steps=1", "checkpoint.fsync=true"),
    "every 10, no fsync": ("checkpoint.every_steps=10", "checkpoint.fsync=false"),
}
CLI = [sys.executable, "-m", "workers"]
Run = tuple[float, float, int]  # training wall s, client CPU s, steps


def _client(config: Path, sets: tuple[str, ...], folder: str) -> Run:
    """(training wall s, client CPU s, steps) of one client run with ``sets``."""
    argv = [*CLI, "client", "--config", str(config), "--json"]
    with_dir = sets if "checkpoint.dir" in sets[0] else (*sets, f'checkpoint.dir="{folder}"')
    for item in with_dir:
        argv += ["--set", item]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"client exited {done.returncode}: {done.stderr[-800:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return float(summary["wall_seconds"]), cpu, int(summary["steps"])


def measure(dataset: str, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        files = init_deployment(Path(tmp) / "d", dataset=dataset)["files"]
        server = subprocess.Popen(
            [*CLI, "server", "--config", files["server"]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        runs: dict[str, list[Run]] = {name: [] for name in SETTINGS}
        try:
            for repeat in range(repeats):
                for index, (name, sets) in enumerate(SETTINGS.items()):
                    folder = f"state/bench-{repeat}-{index}"
                    runs[name].append(_client(Path(files["client-1"]), sets, folder))
        finally:
            stop_process(server)
        figures = {name: _figures(values, runs["none"]) for name, values in runs.items()}
        saved = Path(files["client-1"]).parent / "state" / "bench-0-1"
        figures["one save"] = _save_cost(saved)
    return figures


def _save_cost(folder: Path, saves: int = 40) -> dict[str, Any]:
    """The client's newest real checkpoint (weights, momentum, RNG...) saved ``saves`` times
    in-process: its size and the median ms of one save, without and with fsync. Unlike the
    runs' wall time, a busy shared machine hardly moves this."""
    reader = CheckpointStore(folder, keep=3, prefix="client-1")
    found = reader.load_latest()
    reader.release()
    assert found is not None, f"no checkpoint in {folder}"
    state, path = found
    out: dict[str, Any] = {"bytes": path.stat().st_size}
    for fsync in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            store = CheckpointStore(Path(tmp), keep=3, prefix="client-1", fsync=fsync)
            times = []
            for step in range(saves):
                start = time.perf_counter()
                store.save(state, step)
                times.append(time.perf_counter() - start)
            store.release()
        out["fsync_ms" if fsync else "no_fsync_ms"] = round(1000 * statistics.median(times), 3)
    return out


def _figures(runs: list[Run], base: list[Run]) -> dict[str, Any]:
    """Each run against the run without checkpoints of the same repeat (back to back: the
    same load): its wall-time ratio, and the added wall and CPU ms per step; medians."""
    steps = runs[0][2]
    ratios = [r[0] / b[0] for r, b in zip(runs, base, strict=True)]
    wall_ms = [1000 * (r[0] - b[0]) / steps for r, b in zip(runs, base, strict=True)]
    cpu_ms = [1000 * (r[1] - b[1]) / steps for r, b in zip(runs, base, strict=True)]
    return {
        "steps": steps,
        "wall_s": [round(r[0], 3) for r in runs],
        "cpu_s": [round(r[1], 3) for r in runs],
        "median_wall_s": round(statistics.median(r[0] for r in runs), 3),
        "wall_ratio": round(statistics.median(ratios), 3),
        "wall_ratios": [round(x, 3) for x in ratios],
        "added_wall_ms_per_step": round(statistics.median(wall_ms), 3),
        "added_cpu_ms_per_step": round(statistics.median(cpu_ms), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--datasets", nargs="+", default=["digits", "breast_cancer"])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = {"load_before": machine_load()}
    for dataset in args.datasets:
        result[dataset] = measure(dataset, args.repeats)
        for name, fig in result[dataset].items():
            if name == "one save":
                print(f"{dataset:14s} one save: {fig}", file=sys.stderr)
                continue
            print(
                f"{dataset:14s} {name:28s} steps {fig['steps']:4d}  wall {fig['wall_s']}  "
                f"cpu {fig['cpu_s']}  median {fig['median_wall_s']} s  "
                f"ratio {fig['wall_ratio']} {fig['wall_ratios']}  "
                f"+{fig['added_wall_ms_per_step']} wall ms/step  "
                f"+{fig['added_cpu_ms_per_step']} cpu ms/step",
                file=sys.stderr,
            )
    result["load_after"] = machine_load()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
