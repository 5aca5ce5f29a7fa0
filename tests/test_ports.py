"""Ports that ``init`` picks: never one port for two workers, though the kernel, asked for a
free port twice, may offer the same one (workers/tools/ports.py)."""

from __future__ import annotations

import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.tools import ports
from workers.tools.localdeploy import init_deployment


@pytest.fixture
def kernel_repeats(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The kernel's picks (port 0) offered twice each, as it may do at random; the ports
    this process handed out so far forgotten."""
    offered: list[int] = []
    real = ports._try_port

    def twice(host: str, port: int) -> int | None:
        if port:
            return real(host, port)
        offered.append(offered[-1] if len(offered) % 2 else real(host, 0))  # type: ignore[arg-type]
        return offered[-1]

    monkeypatch.setattr(ports, "_try_port", twice)
    monkeypatch.setattr(ports, "_handed_out", set())
    monkeypatch.setattr(ports, "_range", None)
    yield offered


def test_a_port_offered_again_is_not_handed_out_again(kernel_repeats: list[int]) -> None:
    picked = [ports.free_port() for _ in range(6)]
    assert len(set(picked)) == 6, picked
    assert len(kernel_repeats) > len(set(kernel_repeats))  # the kernel did repeat itself


def test_init_gives_every_worker_a_port_of_its_own(
    kernel_repeats: list[int], tmp_path: Path
) -> None:
    out = init_deployment(tmp_path / "d", topology="multihop", clients=2, ops=True)
    seen = []
    for path in out["files"].values():
        cfg = tomllib.loads(Path(path).read_text())
        for section in ("server", "relay"):
            if "bind" in cfg.get(section, {}):
                seen.append(cfg[section]["bind"].rsplit(":", 1)[1])
        seen.append(cfg["ops"]["listen"].rsplit(":", 1)[1])
    assert len(seen) == 6 and len(set(seen)) == len(seen), seen


def test_a_range_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_handed_out", set())
    monkeypatch.setattr(ports, "_range", None)
    ports.use_port_range(40100, 40140)
    picked = {ports.free_port() for _ in range(20)}
    assert len(picked) == 20 and all(40100 <= p <= 40140 for p in picked), picked


def test_a_range_with_no_free_port_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_handed_out", set())
    monkeypatch.setattr(ports, "_range", None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        ports.use_port_range(port, port)
        with pytest.raises(OSError, match=f"no free TCP port on 127.0.0.1 in {port}-{port}"):
            ports.free_port()


@pytest.mark.parametrize("low, high", [(80, 2000), (3000, 2000), (60000, 70000)])
def test_a_range_out_of_bounds_is_refused(low: int, high: int) -> None:
    with pytest.raises(ValueError, match=f"port range {low}-{high}"):
        ports.use_port_range(low, high)
