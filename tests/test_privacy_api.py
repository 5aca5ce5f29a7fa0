"""The public surface of ``privacy`` and its import boundary (no workers, no transport)."""

from __future__ import annotations

import subprocess
import sys

import privacy


def test_all_names_resolve() -> None:
    assert sorted(privacy.__all__) == sorted(set(privacy.__all__))
    for name in privacy.__all__:
        assert getattr(privacy, name) is not None


def test_privacy_imports_no_workers_or_transport() -> None:
    code = (
        "import sys, privacy\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('workers', 'zmq')"
        " or m.startswith('sl_pipeline.transport')]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == ""
