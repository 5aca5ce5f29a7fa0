"""The config reference (docs/config.md), generated from the typed config.

Every key of every section of the server's, client's and relay's TOML file, with its type,
default and the comment next to it in :mod:`sl_pipeline.config`. ``tests/test_config_doc.py``
fails when the file is stale. Regenerate with ``python -m workers.tools.configdoc --write``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any, Literal

from sl_pipeline.config import ClientConfig, RelayConfig, ServerConfig
from sl_pipeline.configbounds import describe

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"
WORKERS: dict[str, type] = {"server": ServerConfig, "client": ClientConfig, "relay": RelayConfig}
_FIELD = re.compile(r"^\s+(\w+):\s*[^=#]+(?:=[^#]*)?(?:#\s*(.*))?$")
_COMMENT = re.compile(r"^\s+#\s?(.*)$")
# Meanings of the keys that carry no comment in sl_pipeline/config.py ("section.key").
MEANINGS: dict[str, str] = {
    "model.in_shape": "shape of one input sample, e.g. [1, 8, 8]",
    "model.classes": "number of output classes (at least 2)",
    "model.hidden": "width of the built-in MLP's hidden layers",
    "model.seed": "seed every party builds the initial weights from (must match)",
    "train.epochs": "passes over the training data",
    "train.batch_size": "samples per step (at least 1)",
    "train.lr": "learning rate",
    "train.momentum": "SGD momentum",
    "train.optimizer": "the optimizer of every segment",
    "train.seed": "seed of the batch order",
    "train.device": '"cpu", "cuda", "cuda:N" or "auto"',
    "train.wire_dtype": "how activations and gradients travel (int8/int4/int2: 4x/8x/16x fewer; "
    "int2-ef: 2-bit activations, 1-bit gradients with error feedback)",
    "ops.log_format": "one line per event, as text or JSON",
    "ops.log_level": "DEBUG, INFO, WARNING, ERROR or CRITICAL",
    "checkpoint.keep": "how many checkpoints to keep (the newest)",
    "limits.max_frames": "frames per message accepted",
    "limits.max_header_bytes": "bytes of a message's header accepted",
    "limits.max_tensor_bytes": "bytes of one tensor accepted",
    "limits.max_message_bytes": "bytes of one message accepted",
    "server.bind": "where the server listens, tcp://HOST:PORT",
    "server.topology": "how the model is split between the parties",
    "server.key": "this server's private key file",
    "server.admitted": (
        "the clients' (and relays') public keys: a folder of NAME.pub files, "
        "or a file of 'NAME BASE64' lines"
    ),
    "server.insecure": "plaintext, no authentication (warns on every start)",
    "server.ciphers": "transport AEADs a client may pick from, the server's preference first "
    "(docs/security.md, 'Cipher suites'); a client offering none of them is refused",
    "server.max_clients": "peers at once; one more is refused as overloaded (it retries); "
    "split between several [server] groups (docs/security.md)",
    "server.client_timeout_s": "a peer silent for this long is dropped",
    "server.fuse": "vertical: how the parties' activations are joined",
    "data.test_fraction": "share of the rows held out for the test split",
    "data.seed": "seed of the train/test split and the shards",
    "data.shards": "how many horizontal shards the data is cut into",
    "client.server": "the server (or relay) to join, tcp://HOST:PORT",
    "client.ciphers": "transport AEADs this client offers; the server picks one (docs/security.md)",
    "client.name": "this client's name (the server knows it by its key's name)",
    "client.key": "this client's private key file",
    "client.server_key": "the server's public key, pinned: the client talks to it only",
    "client.insecure": "plaintext, no authentication (warns on every start)",
    "client.timeout_s": (
        "the longest wait for a reply before resending: the wait follows the round trip "
        "(RFC 6298: 1 s at first, at least 0.2 s, doubled at each expiry) up to this"
    ),
    "client.connect_timeout_s": "the longest one handshake attempt waits (adapting as timeout_s)",
    "client.retry_for_s": (
        "how long to keep trying to (re)join, to wait out refusals that mean later "
        "(overloaded, name_in_use), or to resend a step no reply answers (8 sends at least), "
        "before giving up"
    ),
    "client.wait_for_parties_s": (
        "the longest a request may go unanswered while the server waits for other parties "
        "(a vertical batch's other parts or PSI post, a round-robin turn, a SplitFed round), "
        "resends and rejoins included; then the client ends (exit 5, its state saved). "
        "0: by topology, 900 s for vertical (and its PSI post), 86400 s for round-robin and "
        "SplitFed, whose members wait through the others' epochs"
    ),
    "client.topology": "must match the server's",
    "client.role": 'vertical: "feature" (a feature party) or "label" (holds the labels)',
    "relay.bind": "where the relay listens for its clients, tcp://HOST:PORT",
    "relay.upstream": "the next hop towards the server, tcp://HOST:PORT",
    "relay.name": "this relay's name",
    "relay.ciphers": "transport AEADs the relay offers upstream and accepts from its clients",
    "relay.key": "this relay's private key file",
    "relay.admitted": (
        "its clients' public keys: a folder of NAME.pub files, or a file of 'NAME BASE64' lines"
    ),
    "relay.upstream_key": "the next hop's public key, pinned",
    "relay.insecure": "plaintext, no authentication (warns on every start)",
    "relay.timeout_s": "how long to wait for the next hop's reply",
    "relay.save": "where to save the relay's segment at the end",
}
HEADER = """# Configuration reference

Generated from `sl_pipeline/config.py` by `python -m workers.tools.configdoc --write`; do not edit
by hand (a test fails when this file is stale). One TOML file per worker; relative paths are
relative to the file; an unknown key is refused with its dotted name; `--set SECTION.KEY=VALUE`
overrides one value. A number is never negative, nor NaN or infinite; a tighter range is
given after its type, and a value out of it is refused when the file is loaded, naming the
key. The sections each worker's file may have:

"""


def _comments(cls: type) -> dict[str, str]:
    """Field -> its comment: the trailing one on its line, or the full-line ones above it."""
    out: dict[str, str] = {}
    pending: list[str] = []
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return out
    for line in lines:
        comment = _COMMENT.match(line)
        if comment:
            pending.append(comment.group(1).strip())
            continue
        field = _FIELD.match(line)
        if field and not line.strip().startswith(("def ", "return", '"""')):
            text = " ".join([*pending, field.group(2) or ""]).strip()
            out[field.group(1)] = text
        pending = []
    return out


def _type(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " \\| ".join(f'`"{v}"`' for v in typing.get_args(hint))
    if origin is list:
        return f"list of {_type(typing.get_args(hint)[0])}"
    if origin is dict:
        return "table"
    return getattr(hint, "__name__", str(hint))


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, dict):
        return "empty" if not value else f"`{value}`"
    return f"`{value}`"


def _section(name: str, cls: type, users: list[str]) -> list[str]:
    doc = inspect.getdoc(cls) or ""
    lines = [f"## [{name}]", "", f"In the {', '.join(users)} file{'s' if len(users) > 1 else ''}."]
    if doc and not doc.startswith(cls.__name__ + "("):
        lines += ["", " ".join(doc.split())]
    lines += ["", "| Key | Type | Default | Meaning |", "|---|---|---|---|"]
    hints, notes = typing.get_type_hints(cls), _comments(cls)
    for f in dataclasses.fields(cls):
        note = (notes.get(f.name) or MEANINGS.get(f"{name}.{f.name}", "")).replace("|", "\\|")
        bound = describe(f"{name}.{f.name}")
        kind = f"{_type(hints[f.name])}, {bound}" if bound else _type(hints[f.name])
        lines.append(f"| `{f.name}` | {kind} | {_default(f)} | {note} |")
    return [*lines, ""]


def render() -> str:
    """The whole reference, as written to docs/config.md."""
    sections: dict[str, tuple[type, list[str]]] = {}
    for worker, config in WORKERS.items():
        hints = typing.get_type_hints(config)
        for f in dataclasses.fields(config):
            hint = hints[f.name]
            cls: type = typing.cast(type, hint) if dataclasses.is_dataclass(hint) else dict
            entry = sections.setdefault(f.name, (cls, []))
            entry[1].append(worker)
    overview = [f"- `[{name}]`: {', '.join(users)}" for name, (_, users) in sections.items()]
    body: list[str] = []
    for name, (cls, users) in sections.items():
        if cls is dict:
            body += [
                f"## [{name}]",
                "",
                f"In the {', '.join(users)} files: a free-form table; see docs/{name}.md.",
                "",
            ]
        else:
            body += _section(name, cls, users)
    return HEADER + "\n".join(overview) + "\n\n" + "\n".join(body).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--write" in argv:
        DOC.write_text(text)
        print(f"wrote {DOC}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
