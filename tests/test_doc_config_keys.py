"""Every config key the docs name is a real key: a user who copies `server.max_runs`,
`[ops] listen = ...`, `--set train.lr=...` or a ```toml block from README.md or docs/*.md
gets a key the loader knows, not an "unknown key" refusal (or, worse, a setting that a
renamed key silently no longer makes)."""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest

from privacy.config import PrivacyConfig
from sl_pipeline.config import ClientConfig, RelayConfig, ServerConfig

from .conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Free-form tables: any key below them is the user's (a group's name, a member's name).
FREE_FORM = {"server.groups"}
# Last parts that make `a.b` a file name, not a key.
FILE_SUFFIXES = {
    "py",
    "toml",
    "pub",
    "key",
    "json",
    "csv",
    "sh",
    "md",
    "npz",
    "parquet",
    "log",
    "pt",
}
BACKTICKED = re.compile(r"`(?:--set )?([a-z_]+(?:\.[a-z_0-9]+)+)(?:\s*=[^`]*)?`")
BRACKETED = re.compile(r"\[([a-z_]+(?:\.[a-z_]+)?)\] ([a-z_]+)(?=`| =|>)")
SET_FLAG = re.compile(r"--set ([a-z_]+(?:\.[a-z_0-9]+)+)=")
TOML_BLOCK = re.compile(r"```toml\n(.*?)```", re.S)


def _sections() -> dict[str, type]:
    """Each top-level section of any worker's file, with its dataclass (privacy's own)."""
    sections: dict[str, type] = {"privacy": PrivacyConfig}
    for config in (ServerConfig, ClientConfig, RelayConfig):
        hints = typing.get_type_hints(config)
        for f in dataclasses.fields(config):
            if dataclasses.is_dataclass(hints[f.name]):
                sections[f.name] = hints[f.name]
    return sections


SECTIONS = _sections()


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass inside ``hint`` (``X | None`` included), or None."""
    for option in (hint, *typing.get_args(hint)):
        if isinstance(option, type) and dataclasses.is_dataclass(option):
            return option
    return None


def resolves(dotted: str) -> bool:
    """Whether ``section.key[.sub...]`` names a field of the typed config."""
    head, *rest = dotted.split(".")
    cls: Any = SECTIONS[head]
    for i, part in enumerate(rest):
        if ".".join([head, *rest[:i]]) in FREE_FORM:
            return True
        if cls is None:
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = _dataclass_of(hints[part])
    return True


def _is_module(dotted: str) -> bool:
    """`privacy.audit`: a module of the privacy package, not a key."""
    parts = dotted.split(".")
    return (ROOT / parts[0] / f"{parts[1]}.py").exists()


def _toml_keys(table: dict[str, Any], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in FREE_FORM:
            keys += _toml_keys(value, f"{dotted}.")
        else:
            keys.append(dotted)
    return keys


def mentions(text: str) -> list[tuple[int, str]]:
    """(line, dotted key) for every config key ``text`` names."""
    found: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in BACKTICKED.finditer(line):
            dotted = match.group(1)
            if dotted.split(".")[-1] in FILE_SUFFIXES or _is_module(dotted):
                continue
            found.append((number, dotted))
        found += [(number, f"{m.group(1)}.{m.group(2)}") for m in BRACKETED.finditer(line)]
        found += [(number, m.group(1)) for m in SET_FLAG.finditer(line)]
    for block in TOML_BLOCK.finditer(text):
        number = text[: block.start()].count("\n") + 2
        found += [(number, key) for key in _toml_keys(tomllib.loads(block.group(1)))]
    return [(n, k) for n, k in found if k.split(".")[0] in SECTIONS]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_config_key_a_doc_names_exists(doc: Path) -> None:
    unknown = [
        f"{doc.name}:{n}: {key}" for n, key in mentions(doc.read_text()) if not resolves(key)
    ]
    assert not unknown, "docs name config keys that do not exist:\n" + "\n".join(unknown)


def test_the_scan_finds_keys_in_every_form() -> None:
    text = (
        '`server.max_runs` `[ops] listen = "x"` <[ops] status_token> `--set train.lr=0.1`\n'
        '```toml\n[privacy.dpsgd]\nnoise_multiplier = 1.0\n[server.groups]\nteam = ["a"]\n```\n'
        "`privacy.audit` `server.toml` `server.nope`\n"
    )
    keys = {key for _, key in mentions(text)}
    assert keys == {
        "server.max_runs",
        "ops.listen",
        "ops.status_token",
        "train.lr",
        "server.nope",
        "privacy.dpsgd.noise_multiplier",
        "server.groups",
    }
    assert {k for k in keys if not resolves(k)} == {"server.nope"}
