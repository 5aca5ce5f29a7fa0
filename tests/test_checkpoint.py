"""Checkpoints: atomic writes, keep-K, torn/corrupt files skipped, nothing unpickled."""

from __future__ import annotations

import io
import logging
import random
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sl_pipeline.errors import CheckpointError, SLError
from sl_pipeline.messages import Kind, Message, check_answers, message_from_state, message_state
from workers.runtime.checkpoint import (
    CheckpointStore,
    SnapshotRing,
    _frame,
    decode,
    encode,
    restore_rng,
    rng_state,
)
from workers.server.replycache import ReplyCache

MARKER: list[str] = []


def _mark(text: str) -> None:
    MARKER.append(text)


class Evil:
    """Unpickling this would run ``_mark``: a stand-in for arbitrary code execution."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_mark, ("pwned",))


def trained_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = model(torch.randn(5, 4)).pow(2).sum()
    loss.backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 2,
        "step": 17,
        "name": "client-1",
        "order": [[3, 1, 2], [0], []],
        "accountant": {"history": [(1.1, 0.01, 100)], "eps": 0.5},
        "applied": {"client-1": [2, 17], "client-2": None},
        "rng": rng_state(),
    }


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b) and a.dtype == b.dtype
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_model_optimizer_and_primitives(tmp_path: Path) -> None:
    # Prepare
    store = CheckpointStore(tmp_path)
    state = trained_state()
    # Execute
    path = store.save(state, 17)
    loaded = store.load_latest()
    # Assert
    assert loaded is not None
    assert loaded[1] == path
    assert_same(state, loaded[0])
    assert loaded[0]["optimizer"]["state"][0]["momentum_buffer"] is not None
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    model.load_state_dict(loaded[0]["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(loaded[0]["optimizer"])


def test_keep_k_prunes_oldest_by_step(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3, prefix="server")
    for step in (5, 1, 30, 20, 10):
        store.save({"step": step}, step)
    assert [p.name for p in store.list()] == [
        "server-000000000010.ckpt",
        "server-000000000020.ckpt",
        "server-000000000030.ckpt",
    ]
    latest = store.load_latest()
    assert latest is not None and latest[0] == {"step": 30}


def test_empty_directory_gives_none(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "new").load_latest() is None


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "empty", "garbage_tail"])
def test_damaged_newest_is_skipped(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    store = CheckpointStore(tmp_path)
    store.save({"step": 1, "w": torch.arange(1000.0)}, 1)
    newest = store.save({"step": 2, "w": torch.arange(1000.0) * 2}, 2)
    blob = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(blob[: len(blob) // 2])
    elif damage == "bitflip":
        flipped = bytearray(blob)
        flipped[len(blob) * 3 // 4] ^= 0x10
        newest.write_bytes(bytes(flipped))
    elif damage == "empty":
        newest.write_bytes(b"")
    else:
        newest.write_bytes(blob + b"x")
    # Execute
    with caplog.at_level(logging.WARNING, logger="sl_pipeline.checkpoint"):
        loaded = store.load_latest()
    # Assert
    assert loaded is not None and loaded[0]["step"] == 1
    assert newest.name in caplog.text


def test_no_temp_file_remains_and_stale_temps_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".ckpt-000000000003.dead.tmp"
    stale.write_bytes(b"half a checkpoint")
    store = CheckpointStore(tmp_path)
    assert not stale.exists()
    for step in range(5):
        store.save({"x": step}, step)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != ".ckpt.lock")  # held, not temp
    assert left == [p.name for p in store.list()]


def test_files_are_private(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpts")
    path = store.save({"w": torch.ones(2)}, 1)
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ckpts").stat().st_mode & 0o077 == 0


def test_pickled_object_is_refused_and_never_executed(tmp_path: Path) -> None:
    # Prepare: a well-framed file (valid hash) whose payload pickles a class instance
    store = CheckpointStore(tmp_path)
    store.save({"ok": 1}, 1)
    buf = io.BytesIO()
    torch.save({"format": 1, "step": 2, "state": {"evil": Evil()}}, buf)
    store.path_for(2).write_bytes(_frame(buf.getvalue()))
    MARKER.clear()
    # Execute
    loaded = store.load_latest()
    # Assert
    assert MARKER == []
    assert loaded is not None and loaded[0] == {"ok": 1}
    with pytest.raises(CheckpointError, match="safe loader"):
        store.load(store.path_for(2))


def test_save_refuses_unsafe_values_loudly(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError, match=r"state\.a\[1\] is a Evil"):
        store.save({"a": [1, Evil()]}, 1)
    with pytest.raises(CheckpointError, match="Linear"):
        store.save({"model": torch.nn.Linear(2, 2)}, 1)
    assert store.list() == []


def test_checkpoint_error_is_sl_and_os_error() -> None:
    with pytest.raises(OSError):
        decode(b"short")
    with pytest.raises(SLError):
        decode(encode({"a": 1}, 3)[:-1])
    assert decode(encode({"a": 1}, 3)) == ({"a": 1}, 3)


def test_renamed_file_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save({"a": 1}, 1)
    store.path_for(1).rename(store.path_for(9))
    assert store.load_latest() is None


def test_max_step_and_discard_after(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=5)
    for step in (10, 20, 30):
        store.save({"s": step}, step)
    latest = store.load_latest(max_step=25)
    assert latest is not None and latest[0] == {"s": 20}
    assert [p.name for p in store.discard_after(20)] == ["ckpt-000000000030.ckpt"]
    latest = store.load_latest()
    assert latest is not None and latest[0] == {"s": 20}


def test_bad_arguments() -> None:
    with pytest.raises(CheckpointError):
        CheckpointStore(Path(tempfile.gettempdir()), keep=0)
    with pytest.raises(CheckpointError):
        CheckpointStore(Path(tempfile.gettempdir()), prefix="../x")
    with pytest.raises(CheckpointError):
        CheckpointStore(Path(tempfile.gettempdir())).path_for(-1)


def test_rng_state_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    # Prepare
    store = CheckpointStore(tmp_path)
    random.seed(7)
    torch.manual_seed(7)
    store.save({"rng": rng_state()}, 1)
    expected = (random.random(), torch.rand(3))
    random.seed(99)
    torch.manual_seed(99)
    # Execute
    loaded = store.load_latest()
    assert loaded is not None
    restore_rng(loaded[0]["rng"])
    # Assert
    assert random.random() == expected[0]
    assert torch.equal(torch.rand(3), expected[1])
    with pytest.raises(CheckpointError):
        restore_rng({"torch": "nope"})


def test_snapshot_ring_is_a_bounded_deep_copy() -> None:
    ring = SnapshotRing(capacity=3)
    weights = torch.zeros(2)
    for step in range(5):
        weights += 1
        ring.push((0, step), {"w": weights})
    assert ring.keys() == [(0, 2), (0, 3), (0, 4)]
    snap = ring.get((0, 3))
    assert snap is not None and torch.equal(snap["w"], torch.full((2,), 4.0))
    snap["w"] += 100  # a copy: the ring is unchanged
    again = ring.get((0, 3))
    assert again is not None and torch.equal(again["w"], torch.full((2,), 4.0))
    ring.discard_after((0, 3))  # a rewind to (0, 3): the undo points after it are void
    assert ring.keys() == [(0, 2), (0, 3)]
    assert ring.get((0, 0)) is None and ring.get((0, 4)) is None


def test_cached_reply_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    # Prepare
    reply = Message(
        kind=Kind.BACKWARD,
        session="s1",
        client="client-1",
        epoch=1,
        step=9,
        meta={"loss": 0.25, "durable": [1, 5], "nested": {"a": [1, {"b": None}]}},
        tensors={"grad": torch.randn(4, 3)},
        answers=Kind.FORWARD,
    )
    store = CheckpointStore(tmp_path)
    # Execute
    store.save({"clients": {"client-1": {"applied": [1, 9], "reply": message_state(reply)}}}, 1)
    loaded = store.load_latest()
    # Assert
    assert loaded is not None
    again = message_from_state(loaded[0]["clients"]["client-1"]["reply"])
    assert (again.kind, again.session, again.client, again.epoch, again.step) == (
        Kind.BACKWARD,
        "s1",
        "client-1",
        1,
        9,
    )
    assert again.answers is Kind.FORWARD  # a replayed reply still names its request
    assert _plain_meta(again) == _plain_meta(reply)
    assert torch.equal(again.tensor("grad"), reply.tensor("grad"))
    with pytest.raises(CheckpointError):
        message_from_state({"kind": "nonsense"})


def _plain_meta(msg: Message) -> str:
    return repr(message_state(msg)["meta"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blob=st.one_of(
        st.binary(max_size=2048),
        st.binary(max_size=512).map(lambda b: _frame(b)),  # valid frame, arbitrary payload
        st.binary(max_size=64).map(lambda b: b"SLCKPT\x00\x01" + b),
    )
)
def test_arbitrary_newest_file_never_crashes_load_latest(blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = CheckpointStore(Path(tmp))
        store.save({"good": True}, 1)
        store.path_for(2).write_bytes(blob)
        loaded = store.load_latest()
        assert loaded is not None and loaded[0] == {"good": True}


def test_a_reply_cache_saved_before_replies_named_their_request_still_answers_it() -> None:
    # Prepare: a protocol-1 checkpoint's cache entry: the reply state has no "re"
    reply = Message(kind=Kind.BACKWARD, client="client-1", epoch=0, step=4)
    state = {k: v for k, v in message_state(reply).items() if k != "re"}
    entry = {"client": "client-1", "kind": "forward", "step": [0, 4], "reply": state}
    cache = ReplyCache()
    # Execute
    cache.load([entry])
    # Assert: the entry's request kind fills it in, so a resent forward is answered by a
    # reply the client accepts
    request = Message(kind=Kind.FORWARD, client="client-1", epoch=0, step=4)
    cached = cache.get("client-1", "forward", (0, 4))
    assert cached is not None and check_answers(request, cached) is cached


def test_a_lock_on_a_file_removed_meanwhile_is_taken_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A refused start removes its lock file (CheckpointStore.discard_if_unused); a worker that
    # opened it just before held a lock on a file no other worker could see, and a third then
    # locked a new one: two writers on one state (the red team's race)
    import fcntl
    import os

    from workers.runtime import checkpoint

    folder, real_lockf = tmp_path / "ckpt", fcntl.lockf
    removed: list[bool] = []

    def lockf_as_the_file_goes(fd: int, operation: int) -> None:
        real_lockf(fd, operation)
        if not removed:  # the refused start's unlink lands between our open and lock
            removed.append(True)
            (folder / ".server.lock").unlink()

    monkeypatch.setattr(checkpoint.fcntl, "lockf", lockf_as_the_file_goes)
    store = CheckpointStore(folder, prefix="server")
    held, there = os.fstat(store._lock_fd), os.stat(folder / ".server.lock")
    assert (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)
    store.release()


def test_a_refused_start_removes_its_folder_only_while_it_holds_nothing_else(
    tmp_path: Path,
) -> None:
    made = CheckpointStore(tmp_path / "state" / "ckpt", prefix="server")
    made.discard_if_unused()
    assert not (tmp_path / "state").exists()  # it made both: both gone
    kept = CheckpointStore(tmp_path / "other" / "ckpt", prefix="server")
    (tmp_path / "other" / "ckpt" / "notes").write_text("someone's")
    kept.discard_if_unused()
    assert (tmp_path / "other" / "ckpt" / "notes").exists()
    again = CheckpointStore(tmp_path / "other" / "ckpt", prefix="server")  # released
    again.release()
