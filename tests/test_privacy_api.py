"""The public surface of ``privacy`` and its import boundary (no workers, no transport)."""

from __future__ import annotations

import ast
from pathlib import Path

import privacy

FORBIDDEN = ("workers", "zmq", "sl_pipeline.transport")
ALLOWED_ROOTS = {
    "__future__",
    "collections",
    "dataclasses",
    "importlib",
    "math",
    "pathlib",
    "types",
    "typing",
    "warnings",  # dpsgd.py quiets one Opacus warning that does not apply (docs/privacy.md)
    "numpy",
    "torch",
    "opacus",
    "sklearn",
    "matplotlib",
    "scipy",
    "bisect",
    "secrets",
    "hashlib",
    "privacy",
    "sl_pipeline",
}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_all_names_resolve() -> None:
    assert len(privacy.__all__) == len(set(privacy.__all__))
    for name in privacy.__all__:
        assert getattr(privacy, name) is not None


def test_privacy_imports_no_workers_or_transport() -> None:
    for path in Path(privacy.__file__).parent.glob("*.py"):
        for module in imported_modules(path):
            assert not module.startswith(FORBIDDEN), f"{path.name} imports {module}"
            assert module.split(".")[0] in ALLOWED_ROOTS, f"{path.name} imports {module}"
            if module.startswith("sl_pipeline"):
                assert module == "sl_pipeline.errors", f"{path.name} imports {module}"
