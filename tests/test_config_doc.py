"""docs/config.md is generated from the typed config and must not go stale."""

from __future__ import annotations

import dataclasses
import typing

from workers.tools.configdoc import DOC, WORKERS, render


def test_config_reference_is_current() -> None:
    assert DOC.read_text() == render(), (
        "docs/config.md is stale: run `python -m workers.tools.configdoc --write` and commit it"
    )


def test_every_key_is_documented_with_a_meaning() -> None:
    text = render()
    for config in WORKERS.values():
        hints = typing.get_type_hints(config)
        for section in dataclasses.fields(config):
            cls = hints[section.name]
            if not dataclasses.is_dataclass(cls):
                continue
            assert f"## [{section.name}]" in text
            for key in dataclasses.fields(cls):
                row = next(
                    line
                    for line in text.split(f"## [{section.name}]")[1].splitlines()
                    if line.startswith(f"| `{key.name}` |")
                )
                assert not row.endswith("|  |"), f"{section.name}.{key.name} has no meaning"
