"""The wire codec: exact round trips, limits checked before allocation, only our errors."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sl_pipeline.codec import DTYPES, Limits, decode, encode
from sl_pipeline.errors import (
    LimitError,
    ProtocolError,
    ReplyMismatchError,
    SLError,
    VersionError,
)
from sl_pipeline.messages import PROTOCOL_VERSION, Kind, Message, check_answers

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    tensors = {}
    for i in range(draw(st.integers(0, 4))):
        dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
        shape = draw(shapes)
        t = (torch.randn(shape) * 50).to(dtype)
        tensors[f"t{i}"] = t
    return Message(
        kind=draw(st.sampled_from(list(Kind))),
        session=draw(st.text(alphabet="abcdef0123456789", max_size=16)),
        client=draw(st.text(alphabet="abcxyz-1", max_size=16)),
        epoch=draw(st.integers(0, 10**6)),
        step=draw(st.integers(0, 10**6)),
        meta={
            "loss": draw(st.floats(allow_nan=False, allow_infinity=False)),
            "tag": draw(st.text(max_size=8)),
        },
        tensors=tensors,
        answers=draw(st.sampled_from([None, *Kind])),
    )


@given(messages())
@settings(max_examples=150, deadline=None)
def test_round_trip_is_exact(message: Message) -> None:
    # Execute
    decoded = decode([bytes(f) for f in encode(message)])
    # Assert
    assert (decoded.kind, decoded.answers) == (message.kind, message.answers)
    assert (decoded.session, decoded.client, decoded.epoch, decoded.step) == (
        message.session,
        message.client,
        message.epoch,
        message.step,
    )
    assert dict(decoded.meta) == dict(message.meta)
    assert list(decoded.tensors) == list(message.tensors)
    for name, tensor in message.tensors.items():
        assert decoded.tensors[name].dtype == tensor.dtype
        assert torch.equal(decoded.tensors[name], tensor)


def test_decoding_shares_the_buffer_without_copying() -> None:
    frames = encode(Message(kind=Kind.FORWARD, tensors={"act": torch.randn(64, 64)}))
    buf = bytearray(frames[1])
    out = decode([frames[0], buf]).tensors["act"]
    buf[0:4] = b"\x00\x00\x00\x00"
    assert out.reshape(-1)[0].item() == 0.0  # the tensor is a view of the received buffer


def test_a_read_only_buffer_is_copied_once_so_decoded_tensors_are_writable() -> None:
    frames = encode(Message(kind=Kind.FORWARD, tensors={"act": torch.arange(6.0)}))
    received = bytes(frames[1])  # read-only, like a raw zmq frame
    out = decode([frames[0], received]).tensors["act"]
    out.add_(1.0)
    assert torch.equal(out, torch.arange(6.0) + 1.0)
    assert received == bytes(frames[1])  # the peer's buffer was never written into


def test_non_contiguous_tensor_travels_correctly() -> None:
    t = torch.arange(12.0).reshape(3, 4).t()
    out = decode([bytes(f) for f in encode(Message(kind=Kind.FORWARD, tensors={"a": t}))])
    assert torch.equal(out.tensors["a"], t)


def _header(**changes: object) -> bytes:
    header = {
        "v": PROTOCOL_VERSION,
        "kind": "forward",
        "re": None,
        "session": "",
        "client": "",
        "epoch": 0,
        "step": 0,
        "meta": {},
        "tensors": [{"name": "a", "dtype": "float32", "shape": [2]}],
    }
    header.update(changes)
    return json.dumps(header).encode()


@pytest.mark.parametrize(
    ("frames", "error"),
    [
        ([], ProtocolError),
        ([b"not json"], ProtocolError),
        ([_header(), b"\x00" * 7], ProtocolError),  # truncated tensor
        ([_header()], ProtocolError),  # missing frame
        ([_header(v=99), b"\x00" * 8], VersionError),
        ([_header(kind="steal"), b"\x00" * 8], ProtocolError),
        ([_header(re="steal"), b"\x00" * 8], ProtocolError),
        ([_header(re=1), b"\x00" * 8], ProtocolError),
        (
            [_header(tensors=[{"name": "a", "dtype": "object", "shape": [2]}]), b"\x00" * 8],
            ProtocolError,
        ),
        ([_header(tensors=[{"name": "a", "dtype": "float32", "shape": [-1]}]), b""], ProtocolError),
        ([_header(tensors=[{"name": "a", "dtype": "float32", "shape": [2**40]}]), b""], LimitError),
        (
            [_header(tensors=[{"name": "a", "dtype": "float32", "shape": [1] * 9}]), b"\x00" * 4],
            LimitError,
        ),
        ([_header(extra=1), b"\x00" * 8], ProtocolError),
        ([_header(epoch=-1), b"\x00" * 8], ProtocolError),
    ],
)
def test_malformed_frames_raise_a_protocol_error(
    frames: list[bytes], error: type[Exception]
) -> None:
    with pytest.raises(error):
        decode(frames)


def test_limits_are_checked_before_reading_buffers() -> None:
    limits = Limits(max_tensor_bytes=1024)
    header = _header(tensors=[{"name": "a", "dtype": "float32", "shape": [1024]}])
    with pytest.raises(LimitError, match="limit 1024"):
        decode([header, b""], limits)  # no 4 KiB buffer needed to refuse it
    with pytest.raises(LimitError):
        decode([b"x"] * 40, Limits(max_frames=32))


@given(st.lists(st.binary(max_size=64), max_size=5))
@settings(max_examples=300, deadline=None)
def test_fuzzed_frames_raise_only_project_errors(frames: list[bytes]) -> None:
    with contextlib.suppress(SLError):
        decode(frames)


@given(
    st.dictionaries(
        st.sampled_from(
            ["v", "kind", "re", "meta", "tensors", "epoch", "step", "session", "client"]
        ),
        st.one_of(
            st.none(),
            st.integers(),
            st.text(max_size=4),
            st.lists(st.integers(), max_size=3),
            st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
        ),
    )
)
@settings(max_examples=300, deadline=None)
def test_fuzzed_headers_raise_only_project_errors(fields: dict[str, object]) -> None:
    header = json.loads(_header())
    header.update(fields)
    with contextlib.suppress(SLError):
        decode([json.dumps(header).encode(), b"\x00" * 8])


def test_message_validation_rejects_bad_values() -> None:
    with pytest.raises(ProtocolError, match="epoch"):
        Message(kind=Kind.FORWARD, epoch=-1)
    with pytest.raises(ProtocolError, match="meta"):
        Message(kind=Kind.FORWARD, meta={"x": object()})
    with pytest.raises(ProtocolError, match="kind"):
        Message(kind="nope")  # type: ignore[arg-type]
    msg = Message(kind=Kind.FORWARD, meta={"a": [1]})
    with pytest.raises(TypeError):
        msg.meta["b"] = 2  # type: ignore[index]


def test_a_reply_names_the_request_it_answers_on_the_wire() -> None:
    # Prepare: a u-shaped step: the forward, its result, the backward that follows it
    forward = Message(kind=Kind.FORWARD, client="client-1", epoch=2, step=7)
    result = forward.reply(Kind.RESULT, tensors={"out": torch.ones(2)})
    backward = forward.follow(Kind.BACKWARD)
    # Execute
    frames = encode(result)
    decoded = decode([bytes(f) for f in frames])
    # Assert: the header says which request (kind and step) the reply answers; a request
    # that follows another answers nothing
    header = json.loads(bytes(frames[0]))
    assert (header["re"], header["epoch"], header["step"]) == ("forward", 2, 7)
    assert json.loads(bytes(encode(backward)[0]))["re"] is None
    assert decoded.answers is Kind.FORWARD and check_answers(forward, decoded) == decoded


def test_a_header_of_protocol_1_without_re_is_refused_as_another_version() -> None:
    old = json.loads(_header())
    del old["re"]
    with pytest.raises(ProtocolError, match="exactly the keys"):
        decode([json.dumps(old).encode(), b"\x00" * 8])
    with pytest.raises(VersionError, match="version 1"):
        decode([_header(v=1), b"\x00" * 8])


@pytest.mark.parametrize(
    "changes",
    [
        {"kind": Kind.EVALUATE},  # the reply to another kind of request, same step
        {"step": 8},  # the reply to the next step
        {"epoch": 3},  # the same step of another epoch
    ],
    ids=["kind", "step", "epoch"],
)
def test_a_reply_to_another_request_does_not_answer_this_one(changes: dict[str, object]) -> None:
    forward = Message(kind=Kind.FORWARD, client="client-1", epoch=2, step=7)
    other = Message(
        **{"kind": Kind.FORWARD, "client": "client-1", "epoch": 2, "step": 7, **changes}
    )
    with pytest.raises(ReplyMismatchError, match="while waiting for the reply to forward"):
        check_answers(forward, other.reply(Kind.BACKWARD))
    with pytest.raises(ReplyMismatchError, match="reply to no request"):
        check_answers(forward, forward.follow(Kind.BACKWARD))  # names no request at all
