"""A relay's log of the requests it applied since its newest checkpoint, to run them again.

A relay that checkpoints every N > 1 steps loses up to N-1 applied steps in a crash, while
its clients and the next hop (the server) applied them. So before a step's reply leaves, the
relay appends the request itself (its wire frames, as the client sent it) to
``{name}.requests`` beside its checkpoints (fsynced where ``checkpoint.fsync`` is on, as the
checkpoints are), and empties the file at each checkpoint. After a restart it runs the
entries past its checkpoint again, in the order it first applied them (every client's steps
interleaved as they were), before it takes any message: the next hop answers each from its
cache, and the relay stands where it stood (:meth:`workers.relay.RelayWorker.on_start`).

Each record: ``[count u64][body length u64][crc32 u32]`` then the body, ``[frames u32]`` and
each frame as ``[length u64][bytes]`` (:func:`sl_pipeline.codec.encode`, read back with the
relay's own limits: never unpickled). ``count`` is the relay's applied steps after that step.
A last record cut short or failing its CRC (killed mid-write: its reply never left) ends the
log: the start cuts it off the file before anything is appended. A record failing its CRC
with more after it is damage, not a crash: the start refuses it, the file left as it is.
The file never grows past ``relay.request_log_mib``: a step that would take it over is
checkpointed instead.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

from sl_pipeline.codec import decode, encode
from sl_pipeline.errors import CheckpointError, SLError
from sl_pipeline.limits import Limits
from sl_pipeline.messages import Message

log = logging.getLogger("sl_pipeline.relay")
_RECORD = struct.Struct(">QQI")  # count, body length, CRC-32 of the body
_COUNT, _LENGTH = struct.Struct(">I"), struct.Struct(">Q")


class RequestLog:
    """``{name}.requests`` in the checkpoint directory, at most ``max_bytes`` long."""

    def __init__(self, directory: Path, name: str, fsync: bool, max_bytes: int) -> None:
        self.path = directory / f"{name}.requests"
        self.fsync, self.max_bytes = fsync, max_bytes
        self.size = 0  # the whole records on disk
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            self.size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise CheckpointError(f"cannot open {self.path}: {exc}") from None

    def read(self, applied: int, limits: Limits) -> list[Message]:
        """The requests applied past the checkpoint (which holds ``applied`` steps), in the
        order applied. A torn last record is cut off the file (one warning line)."""
        if self.size > self.max_bytes:
            raise CheckpointError(
                f"{self.path} holds {self.size} bytes, over relay.request_log_mib = "
                f"{self.max_bytes / 2**20:g}: raise it to replay the steps it holds "
                "(removing the file loses them)"
            )
        data = memoryview(self.path.read_bytes())
        requests, at = [], 0
        while at < len(data):
            try:
                found = _record(data, at, limits)
            except CheckpointError as exc:
                raise CheckpointError(f"{self.path}: {exc}") from None
            if found is None:
                break
            count, msg, at = found
            if count > applied:
                requests.append(msg)
        if at < len(data):  # the torn record goes, or the next append would join it
            self._cut(at)
            log.warning("%s: dropped a torn last record (the relay stopped mid-write)", self.path)
        return requests

    def append(self, count: int, msg: Message) -> bool:
        """Before the step's reply leaves: its request is on disk (fsynced with ``fsync``).
        False, writing nothing, where it would take the log over its cap: checkpoint then."""
        frames = encode(msg)
        parts: list[bytes | memoryview] = [_COUNT.pack(len(frames))]
        for frame in frames:
            parts += [_LENGTH.pack(memoryview(frame).nbytes), memoryview(frame).cast("B")]
        body = sum(memoryview(p).nbytes for p in parts)
        if self.size + _RECORD.size + body > self.max_bytes:
            return False
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)
        try:
            written = os.writev(self._fd, [_RECORD.pack(count, body, crc), *parts])
            if written != _RECORD.size + body:
                raise OSError(f"wrote {written} of {_RECORD.size + body} bytes")
            if self.fsync:
                os.fdatasync(self._fd)
        except OSError as exc:
            self._cut(self.size)  # no part of it stays to join the next one
            raise CheckpointError(f"cannot write {self.path}: {exc}") from None
        self.size += _RECORD.size + body
        return True

    def checkpointed(self) -> None:
        """A checkpoint holds every step so far (or a new run starts): the log starts over."""
        self._cut(0)

    def _cut(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
            if self.fsync:
                os.fdatasync(self._fd)
        except OSError as exc:
            raise CheckpointError(f"cannot truncate {self.path}: {exc}") from None
        self.size = size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _record(data: memoryview, at: int, limits: Limits) -> tuple[int, Message, int] | None:
    """The record at ``at``: (count, request, where the next starts); None if torn (cut
    short, or the last and not the bytes its CRC names). One failing its CRC with more
    after it is damage, not a crash (only the last record tears): an error. A whole record
    that does not decode (limits lowered since it was written) is an error: cutting it off
    would lose it."""
    if len(data) - at < _RECORD.size:
        return None
    count, length, crc = _RECORD.unpack_from(data, at)
    body = data[at + _RECORD.size : at + _RECORD.size + length]
    if len(body) < length:
        return None
    if zlib.crc32(body) != crc:
        if at + _RECORD.size + length < len(data):  # whole records follow: not a torn tail
            raise CheckpointError(
                f"the request logged at count {count} is damaged (its CRC fails) and "
                f"{len(data) - at - _RECORD.size - length} bytes of requests follow it; move "
                "the file away to start without the steps it holds"
            )
        return None
    try:
        msg = decode(_frames(body, limits.max_frames), limits)
    except (SLError, struct.error) as exc:
        raise CheckpointError(f"the request logged at count {count} does not read: {exc}") from None
    return count, msg, at + _RECORD.size + length


def _frames(body: memoryview, max_frames: int) -> list[memoryview]:
    (nframes,) = _COUNT.unpack_from(body)
    frames, pos = [], _COUNT.size
    for _ in range(min(nframes, max_frames + 1)):  # one more: decode names the limit
        (size,) = _LENGTH.unpack_from(body, pos)
        frames.append(body[pos + _LENGTH.size : pos + _LENGTH.size + size])
        pos += _LENGTH.size + size
    return frames
