"""Benchmarks for sl-pipeline: ``python -m bench [--quick] [--json]``.

Each section is a module with a ``run(quick: bool) -> dict`` entry point. Every figure a
section reports is a ratio or a median over repeats measured within the same run, never an
absolute time to compare across runs or machines. See docs/performance.md.
"""

SECTIONS = (
    "flops",
    "crypto_rt",
    "event_loop",
    "chunks",
    "wan",
    "transport",
    "overhead",
    "rpc",
    "scaling",
    "scrape",
    "checkpoint",
)

__all__ = ["SECTIONS"]
