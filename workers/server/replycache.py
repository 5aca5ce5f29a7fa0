"""The server's memory of its last replies, per client and request kind.

It makes every step idempotent: a request for a step already applied gets the same reply
again and is never applied twice. It keeps the last few steps (not only the last one) so a
pipelining client, with several steps in flight, can resend all of them after a rejoin.
Every dimension is bounded, so no peer can grow it without limit, in memory or in every
checkpoint: ``depth`` steps per name and kind, ``max_names`` names (the least recently
active name goes first; ``on_hit`` reports it), and ``max_bytes`` of replies in all. At the
byte bound the oldest steps go first, starting with the least recently active name, and a
name's newest reply per kind goes last (``on_bytes_hit`` reports each eviction): a resent
newest step must be answered from here, or it would be applied twice, while a resent older
one whose reply is gone is refused as stale, which is an error and never a double step.

A reply is kept with the digest of the request it answers
(:func:`sl_pipeline.messages.request_digest`; ``digests``: a server keeps them where its
clients may rewind and redo steps, as it checkpoints every N > 1 steps). A request that
says it redoes a step (meta ``redo``: a rewound client, whose DP-SGD rows are drawn afresh)
is answered from here only if it is that request again; with other inputs it is refused
(``RedoError``), never answered with the other inputs' gradients and never applied a second
time. A request without it is a resend: a restarted client that recomputed its step in
flight over the same rows (with a cut-layer noise defense, fresh noise) gets the gradient
those rows were applied with.

A checkpoint holds less (:meth:`ReplyCache.entries`): every name's newest reply per kind
(bounded with the cache), and older replies, newest first, only within ``checkpoint_bytes``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

from sl_pipeline.config import MAX_PIPELINE_DEPTH
from sl_pipeline.errors import RedoError
from sl_pipeline.messages import Message, message_from_state, message_state, request_digest
from workers.runtime.bounded import no_hit

Step = tuple[int, int]


class Cached(NamedTuple):
    reply: Message
    size: int  # its bytes, counted against ``max_bytes``
    digest: str = ""  # the request it answers (request_digest); "" = not known
    request: Message | None = None  # that request while its digest is not taken yet


Steps = OrderedDict[Step, Cached]
MIB = 1024 * 1024
DEFAULT_MAX_BYTES = 256 * MIB
DEFAULT_CHECKPOINT_BYTES = 16 * MIB  # older replies a checkpoint keeps, beyond the newest
HEADER_BYTES = 256  # a reply's own fields and meta, roughly, on top of its tensors


def reply_size(reply: Message) -> int:
    return HEADER_BYTES + sum(t.numel() * t.element_size() for t in reply.tensors.values())


class ReplyCache:
    def __init__(
        self,
        depth: int = MAX_PIPELINE_DEPTH,  # steps kept per name and kind: the deepest pipeline
        max_names: int = 256,
        on_hit: Callable[[], None] = no_hit,
        max_bytes: int = DEFAULT_MAX_BYTES,
        on_bytes_hit: Callable[[], None] = no_hit,
        checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES,
        digests: bool = True,  # keep each request's digest (off where no redo can come)
    ) -> None:
        if max_names < 1 or max_bytes < 1 or checkpoint_bytes < 0:
            raise ValueError("a reply cache needs room for at least one name and one byte")
        self.depth = depth
        self.max_names, self.max_bytes = max_names, max_bytes
        self.checkpoint_bytes = checkpoint_bytes
        self.digests = digests
        self.on_hit, self.on_bytes_hit = on_hit, on_bytes_hit
        self.bytes = 0  # the replies held, in all
        self._names: OrderedDict[str, dict[str, Steps]] = OrderedDict()  # least recent first
        self._undigested: list[tuple[str, str, Step]] = []  # put since the last ``settle``

    def _steps(self, client: str, kind: str) -> Steps | None:
        kinds = self._names.get(client)
        if kinds is None:
            return None
        self._names.move_to_end(client)
        return kinds.get(kind)

    def get(
        self, client: str, kind: str, step: Step, request: Message | None = None
    ) -> Message | None:
        """The reply kept for ``step``, if any. A ``request`` that says it redoes the step
        (meta ``redo``) gets it only if it is the request that reply answers, else a
        ``RedoError``: it came with other inputs (other rows)."""
        steps = self._steps(client, kind)
        found = None if steps is None else steps.get(step)
        if found is None:
            return None
        redo = request is not None and request.meta.get("redo") is True
        digest = _digest_of(found) if redo else ""
        if redo and request is not None and digest and request_digest(request) != digest:
            raise RedoError(
                f"{client}'s {kind} of step {step} was applied already with other inputs: "
                "it is refused rather than answered with those inputs' gradients (a rewound "
                "client redoes steps only where the next hop lost them; resend the recorded "
                "request instead)"
            )
        return found.reply

    def newest(self, client: str, kind: str) -> Step | None:
        steps = self._steps(client, kind)
        return next(reversed(steps)) if steps else None

    def put(
        self, client: str, kind: str, step: Step, reply: Message, request: Message | None = None
    ) -> None:
        """Keep ``reply``; with ``request`` (the request it answers), that request's digest,
        taken by :meth:`settle` once the reply is on its way (hashing the request's tensors
        costs 0.1 ms for a digits batch and 2 ms for 1 MiB: not on the step's critical path),
        or at once where it is asked for before (:meth:`get`, :meth:`entries`)."""
        kept = request if self.digests else None
        self._put(client, kind, step, reply, "", kept)
        if kept is not None:
            self._undigested.append((client, kind, step))

    def settle(self) -> None:
        """Take the digests of the requests put since the last call."""
        for client, kind, step in self._undigested:
            steps = self._names.get(client, {}).get(kind)
            found = None if steps is None else steps.get(step)
            if found is not None and found.request is not None:
                steps[step] = found._replace(digest=_digest_of(found), request=None)  # type: ignore[index]
        self._undigested.clear()

    def _put(
        self,
        client: str,
        kind: str,
        step: Step,
        reply: Message,
        digest: str,
        request: Message | None = None,
    ) -> None:
        kinds = self._names.setdefault(client, {})
        self._names.move_to_end(client)
        steps = kinds.setdefault(kind, OrderedDict())
        if step in steps:
            self.bytes -= steps.pop(step).size
        size = reply_size(reply)
        steps[step] = Cached(reply, size, digest, request)
        self.bytes += size
        while len(steps) > self.depth:
            self.bytes -= steps.popitem(last=False)[1].size
        while len(self._names) > self.max_names:
            self._drop_name(next(iter(self._names)))
            self.on_hit()
        self._shrink(keep=client)

    def forget(self, name: str) -> None:
        """Drop every reply kept for ``name`` (it starts afresh: none of its steps comes again)."""
        if name in self._names:
            self._drop_name(name)

    def _drop_name(self, name: str) -> None:
        for steps in self._names.pop(name).values():
            self.bytes -= sum(cached.size for cached in steps.values())

    def _shrink(self, keep: str) -> None:
        """Back under ``max_bytes``: older steps first, then whole names other than
        ``keep`` (the name just served); a single name's newest replies always stay."""
        while self.bytes > self.max_bytes:
            if not self._drop_an_older_step():
                others = [n for n in self._names if n != keep]
                if not others:
                    return
                self._drop_name(others[0])
            self.on_bytes_hit()

    def _drop_an_older_step(self) -> bool:
        for kinds in self._names.values():  # the least recently active name first
            for steps in kinds.values():
                if len(steps) > 1:
                    self.bytes -= steps.popitem(last=False)[1].size
                    return True
        return False

    def compact(self) -> None:
        """Keep only each name's newest reply per kind (a run that ended answers no more
        retransmissions; its newest steps still say where each client stood)."""
        for kinds in self._names.values():
            for steps in kinds.values():
                while len(steps) > 1:
                    self.bytes -= steps.popitem(last=False)[1].size

    def names(self) -> int:
        return len(self._names)

    def entries(self) -> list[dict[str, Any]]:
        """What a checkpoint keeps (:meth:`_kept`), checkpoint-safe (the safe loader
        refuses tuple keys)."""
        kept = self._kept()
        return [
            {
                "client": c,
                "kind": k,
                "step": list(step),
                "reply": message_state(m),
                "digest": _digest_of(self._names[c][k][step]),
            }
            for c, k, step, m, _ in self._all()
            if (c, k, step) in kept
        ]

    def checkpoint_size(self) -> int:
        """The bytes of replies a checkpoint keeps."""
        kept = self._kept()
        return sum(size for c, k, step, _, size in self._all() if (c, k, step) in kept)

    def _all(self) -> list[tuple[str, str, Step, Message, int]]:
        return [
            (c, k, step, m, size)
            for c, kinds in self._names.items()
            for k, steps in kinds.items()
            for step, (m, size, *_) in steps.items()
        ]

    def _kept(self) -> set[tuple[str, str, Step]]:
        """Every name's newest reply per kind (a resent newest step must never be applied
        twice after a restart), then older replies, newest first, while they fit in
        ``checkpoint_bytes``: an older step whose reply was left out is refused as stale."""
        kept = {
            (c, k, next(reversed(steps)))
            for c, kinds in self._names.items()
            for k, steps in kinds.items()
            if steps
        }
        budget = self.checkpoint_bytes
        older = [
            (step, c, k, size) for c, k, step, _, size in self._all() if (c, k, step) not in kept
        ]
        for step, c, k, size in sorted(older, reverse=True):
            if size <= budget:
                kept.add((c, k, step))
                budget -= size
        return kept

    def load(self, entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            step = (int(entry["step"][0]), int(entry["step"][1]))
            # a reply saved before replies named their request: its cache entry names it
            reply = message_from_state(entry["reply"], answers=entry["kind"])
            digest = str(entry.get("digest", ""))  # absent from older checkpoints
            self._put(entry["client"], entry["kind"], step, reply, digest)


def _digest_of(cached: Cached) -> str:
    """The digest of the request ``cached`` answers ("" where it is not known)."""
    if cached.digest or cached.request is None:
        return cached.digest
    return request_digest(cached.request)
