"""The human-readable table ``python -m bench`` prints."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if value is None:
        return "n/a"
    return str(value)


def _pairs(value: Any) -> str:
    if isinstance(value, dict) and "q1" in value:  # a spread from bench.common.paired
        spread = f"{_fmt(value['q1'])}-{_fmt(value['q3'])}, {value['pairs']}"
        return f"{_fmt(value['median'])} [{spread}]"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_pairs(v)}" for k, v in value.items())
    return _fmt(value)


def headline(results: dict[str, Any]) -> list[str]:
    rows = [
        ("cipher", "the transport suite peers pick by default (encryption_overhead's)"),
        ("encryption_overhead", "encrypted/plain round trip, by size (goal <= 1.10 at 2MiB)"),
        ("encryption_overhead_by_cipher", "the same per suite, each on its own connection"),
        ("encryption_overhead_spread", "median [interquartile range, pairs] of the ratios above"),
        ("encryption_cpu_ratio", "the same ratio of both processes' CPU time per round trip"),
        (
            "encryption_overhead_wan_spread",
            "the same on a shaped link (20 ms RTT; 100 Mbit/s, 1 Gbit/s): median [IQR, pairs]",
        ),
        (
            "chunked_vs_whole_wan_spread",
            "on that link, 2MiB sealed in 1 MiB chunks / sealed whole: median [IQR, pairs]",
        ),
        ("aead_gb_s", "sealing speed of each AEAD on one core, 2 MiB, GB/s"),
        ("transport_efficiency", "our message path / raw pyzmq + same AEAD, throughput at 2MiB"),
        ("overhead_ratio", "split encrypted 2-process step / single-process step"),
        ("overhead_cpu_ratio", "the same ratio of CPU time per step (both processes / one)"),
        ("rpc_cpu_ratio", "our split step / torch.distributed.rpc's, CPU time of both sides"),
        ("overhead_ratio_spread", "median [interquartile range, pairs] of the ratios above"),
        ("overhead_ratio_pinned", "the same, each party on its own core, the one process on one"),
        ("overhead_cpu_ratio_pinned", "its CPU ratio (pinned pairs alternate with the free ones)"),
        ("overhead_ratio_pipelined", "the same with pipelining (depth 2) / single-process step"),
        ("rpc_ratio", "our split step / torch.distributed.rpc (TensorPipe, TCP) step"),
        ("rpc_ratio_same_host_shm", "the same against TensorPipe's shared memory (run apart)"),
        ("scaling", "aggregate steps/s by number of clients"),
        ("efficiency_64", "steps/s at 64 clients / 1-client server limit"),
        ("server_mem_per_client_mib", "server RSS growth per idle authenticated client"),
        ("chunk_table", "encrypted/plain 2MiB round trip by chunk size: median [IQR, pairs]"),
        ("wan_40ms_of_bound", "40 ms RTT: recommended depth's steps/s / its bound (goal >= 0.8)"),
        (
            "wan_40ms_of_pipelined_bound",
            "40 ms RTT: recommended depth's steps/s / depth x depth 1's (goal >= 0.8)",
        ),
        ("wan_40ms_speedup", "40 ms RTT: recommended depth's steps/s / depth 1's (goal >= 3)"),
        ("wan_40ms_depth", "40 ms RTT: the recommended depth (covers depth 1's step latency)"),
    ]
    lines = ["", "figure                       value", "-" * 78]
    for key, meaning in rows:
        lines.append(f"{key:<28} {_pairs(results.get(key))}")
        lines.append(f"{'':<28}   ({meaning})")
    return lines


def flops_lines(table: dict[str, Any] | None) -> list[str]:
    if not table or "ours_per_epoch" not in table:
        return []
    lines = [
        "",
        "client compute and communication, per client per epoch (ours)",
        f"{'model':<10}{'clients':>8}{'FL TFLOP':>11}{'split TFLOP':>13}{'FL/split':>10}"
        f"{'FL GB':>9}{'split GB':>10}",
    ]
    for model, by_clients in table["ours_per_epoch"].items():
        for clients, r in by_clients.items():
            lines.append(
                f"{model:<10}{clients:>8}{r['federated_tflops']:>11.4g}{r['split_tflops']:>13.4g}"
                f"{r['compute_ratio_fl_over_split']:>10.0f}{r['federated_gb']:>9.3g}"
                f"{r['split_gb']:>10.3g}"
            )
    lines.append("published (project page, whole training, epochs not stated):")
    for name, t in table["published"].items():
        cells = ", ".join(f"{row} {v['100']}/{v['500']}" for row, v in t.items() if row != "setup")
        lines.append(f"  {name} [{t['setup']}] 100/500 clients: {cells}")
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in table["assumptions"]]
    return lines


def load_line(load: dict[str, Any] | None) -> str:
    if not load or "start" not in load:
        return "machine load: unknown"
    start, end = load["start"], load.get("end", load["start"])
    return (
        f"machine load (1/5/15-min averages, {start['cpus']} cores): start {start['loadavg']}, "
        f"end {end['loadavg']}"
    )


def render(results: dict[str, Any], errors: dict[str, str], machine: str) -> str:
    lines = [f"sl-pipeline bench ({machine}); ratios and medians from this run only"]
    lines.append(load_line(results.get("load")))
    lines += headline(results)
    lines += flops_lines(results.get("flops_table"))
    for section, message in errors.items():
        lines.append(f"section {section} failed: {message}")
    return "\n".join(lines)
