"""Child-process peers for the message-path benchmarks (run under the ``spawn`` context).

``channel_peer`` is our server side: the workers' ZMTP listener (:class:`ZmtpRouter`), the
real handshake (plaintext and Noise IK both accepted), and one :class:`Channel` per peer.
Each FORWARD says in ``meta["reply"]`` what it wants back: ``"echo"`` (the same tensor, same size),
``"ack"`` (a small reply), ``"none"`` or ``"cpu"`` (a small reply whose meta ``cpu_s`` is
this process's CPU time so far, all threads: ZeroMQ's I/O thread included). ``raw_peer`` is
the baseline: bare pyzmq plus AES-256-GCM on the same bytes, acknowledging every message
that ends in ``b"A"``.
"""

from __future__ import annotations

import asyncio
import struct
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event

import zmq
import zmq.asyncio

from sl_pipeline import transport
from sl_pipeline.ciphers import DEFAULT_CIPHERS, SUITES, Aead
from sl_pipeline.codec import DEFAULT_LIMITS
from sl_pipeline.handshake import ServerHandshake, is_handshake
from sl_pipeline.keys import generate_keypair
from sl_pipeline.messages import Kind
from sl_pipeline.session import Session
from sl_pipeline.transport import Channel, frame_buffers
from sl_pipeline.zmtp import Caps
from sl_pipeline.zmtp_router import ZmtpRouter
from workers.runtime import eventloop

POLL_MS = 100
_caps: Caps | None = None  # the workers' caps unless unbounded_frames() lifts them
NONCE = struct.Struct(">4xQ")  # 12-byte GCM nonce from a 64-bit message counter


def channel_peer(endpoint: str, ready: Queue, stop: Event) -> None:
    """Serve until ``stop`` is set; puts the server's public key on ``ready`` once bound."""
    eventloop.run(_serve(endpoint, ready, stop))


def unbounded_frames() -> None:
    """Lift the workers' frame cap (``MAXMSGSIZE`` of one chunk) in this process, for
    ``bench.chunks``' chunk sizes beyond the default (its ``whole`` mode): no worker sends
    such frames, so none accepts them."""
    global _caps
    transport.max_frame_bytes = lambda limits: -1
    _caps = Caps(frame_bytes=2**62, message_frames=2**20, message_bytes=2**62)


def unbounded_channel_peer(endpoint: str, ready: Queue, stop: Event) -> None:
    """:func:`channel_peer` that takes frames of any size (see :func:`unbounded_frames`)."""
    unbounded_frames()
    channel_peer(endpoint, ready, stop)


async def _serve(endpoint: str, ready: Queue, stop: Event) -> None:
    router = await ZmtpRouter.bind(endpoint, DEFAULT_LIMITS, caps=_caps)
    static = generate_keypair()
    handshake = ServerHandshake(static, lambda key: True, insecure=True)
    channels: dict[bytes, Channel] = {}
    ready.put(static.public)
    try:
        while not stop.is_set():
            if router.pending():  # the next chunk, often: no timer
                identity, frames = await router.recv()
            else:
                try:
                    identity, frames = await asyncio.wait_for(router.recv(), POLL_MS / 1000)
                except TimeoutError:
                    continue
            buffers = frame_buffers(frames)
            if is_handshake(buffers):
                reply, session, _, _ = handshake.answer(buffers, lambda hello, key: {})
                channels[identity] = Channel(session)
                await router.send(identity, reply)
                continue
            channel = channels[identity]
            message = channel.feed(buffers)
            if message is None:  # more chunks of this message to come
                continue
            mode = message.meta.get("reply", "echo")
            if "chunk_bytes" in message.meta and isinstance(channel.session, Session):
                # bench.chunks: reply with the chunk size the client names
                channel.session.chunk_bytes = int(message.meta["chunk_bytes"])
            if mode == "echo":
                answer = message.reply(Kind.BACKWARD, tensors={"grad": message.tensor("act")})
            elif mode == "ack":
                answer = message.reply(Kind.HEARTBEAT)
            elif mode == "cpu":
                answer = message.reply(Kind.HEARTBEAT, meta={"cpu_s": time.process_time()})
            else:
                continue
            await router.send_parts(identity, channel.parts(answer))
    finally:
        router.close()


def raw_peer(endpoint: str, key: bytes, ready: Queue, stop: Event) -> None:
    """Decrypt every frame (:func:`raw_aead`); answer ``b"ok"`` when the plaintext ends in ``A``."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    aead = raw_aead(key)
    counters: dict[bytes, int] = {}
    ready.put(b"raw")
    try:
        while not stop.is_set():
            if not sock.poll(POLL_MS, zmq.POLLIN):
                continue
            identity, frame = sock.recv_multipart(copy=False)
            peer = bytes(identity.buffer)
            counter = counters.get(peer, 0)
            plain = aead.decrypt(NONCE.pack(counter), frame.buffer, None)
            counters[peer] = counter + 1
            if plain[-1:] == b"A":
                sock.send_multipart([identity, b"ok"])
    finally:
        sock.close(linger=0)
        ctx.term()


def raw_aead(key: bytes) -> Aead:
    """The raw baseline's cipher: the suite sessions pick by default, from a 32-byte key."""
    return SUITES[DEFAULT_CIPHERS[0]].aead(key)


def raw_seal(aead: Aead, counter: int, payload: bytearray, ack: bool) -> bytes:
    """The raw sender's frame: payload's last byte marks whether an ack is wanted."""
    payload[-1:] = b"A" if ack else b"N"
    return aead.encrypt(NONCE.pack(counter), payload, None)
