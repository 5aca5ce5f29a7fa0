"""A vertical label client takes the server's fused output (``out``) only if it fits.

The label client computes the loss on the output the server fuses from every party's cut
(docs/security.md, "A hostile server"). An ``out`` of another width or batch, without its
class dimension, NaN, infinite, beyond ``limits.max_abs_value``, of an integer dtype or in a
reply of another kind is refused with one line (a ``ProtocolError``, exit 3) before anything
of it is used: the client's weights stay as they were and no gradient goes back. The same
holds for the output of an evaluation, from which the label client scores its accuracy.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from sl_pipeline.errors import ProtocolError
from sl_pipeline.messages import Kind, Message
from workers.client.worker import ClientWorker

from .conftest import load_client

CLASSES = 2  # breast_cancer
Change = Callable[[torch.Tensor], torch.Tensor]

# name -> (the server's out, made from an honest one of [batch, classes]; what the error says)
WRONG_OUTPUTS: dict[str, tuple[Change, str]] = {
    "wrong width": (
        lambda o: torch.zeros(len(o), 3),
        r"out has shape \[32, 3\]; this step needs \[32, 2\]",
    ),
    "wider by one hidden layer": (lambda o: torch.zeros(len(o), 64), r"shape \[32, 64\]"),
    "larger batch": (lambda o: torch.zeros(len(o) + 5, CLASSES), r"shape \[37, 2\]"),
    "one row": (lambda o: o[:1], r"shape \[1, 2\]"),
    "no class dimension": (lambda o: o[:, 0], r"shape \[32\]"),
    "NaN": (lambda o: torch.full_like(o, float("nan")), "NaN or infinite"),
    "infinite": (lambda o: torch.full_like(o, float("inf")), "NaN or infinite"),
    "huge": (lambda o: torch.full_like(o, 1e30), "max_abs_value"),
    "just over max_abs_value": (lambda o: torch.full_like(o, 2e6), "max_abs_value"),
    "int64": (lambda o: torch.ones(o.shape, dtype=torch.int64), "int64"),
}


def _label_client(deployment: Any) -> ClientWorker:
    files = deployment(topology="vertical", clients=2, dataset="breast_cancer", label_client=True)
    cfg = load_client(files["client-1"])
    assert cfg.client.role == "label"
    return ClientWorker(cfg, files["client-1"].parent, progress=False)


def _weights(worker: ClientWorker) -> torch.Tensor:
    return parameters_to_vector(worker.runner.bottom.parameters()).detach().clone()


def _serve(worker: ClientWorker, answer: Callable[[Message], Message]) -> list[Message]:
    """``worker``'s requests answered by ``answer``; the list of what it sent."""
    sent: list[Message] = []

    async def request(msg: Message, timeout_s: float | None = None) -> Message:
        sent.append(msg)
        return answer(msg)

    worker.request = request  # type: ignore[method-assign,assignment]
    return sent


def _result(msg: Message, out: torch.Tensor) -> Message:
    return msg.reply(Kind.RESULT, tensors={"out": out})


def _refused(exc: ProtocolError, says: str) -> None:
    text = str(exc)
    assert exc.exit_code == 3
    assert "\n" not in text and re.search(says, text), text


@pytest.mark.parametrize("attack", list(WRONG_OUTPUTS))
async def test_a_wrong_fused_output_is_refused_before_anything_is_applied(
    deployment: Any, attack: str
) -> None:
    # Prepare: the label client's first step; its server answers the forward with a wrong out
    worker = _label_client(deployment)
    change, says = WRONG_OUTPUTS[attack]
    sent = _serve(worker, lambda m: _result(m, change(torch.randn(len(m.tensors["act"]), 2))))
    _, x, y, ids = next(worker.runner.epoch_batches(0))
    before = _weights(worker)
    try:
        # Execute
        with pytest.raises(ProtocolError) as caught:
            await worker.runner.train_step(0, x, y, ids)
        # Assert: one line, exit 3; the weights untouched, no gradient sent back
        _refused(caught.value, says)
        assert torch.equal(_weights(worker), before)
        assert [m.kind for m in sent] == [Kind.FORWARD]
    finally:
        worker.ckpt.release()


async def test_a_fused_output_in_a_reply_of_another_kind_is_refused(deployment: Any) -> None:
    # Prepare: a backward where the forward's result is due
    worker = _label_client(deployment)
    sent = _serve(worker, lambda m: m.reply(Kind.BACKWARD, tensors={"grad": torch.zeros(1)}))
    _, x, y, ids = next(worker.runner.epoch_batches(0))
    before = _weights(worker)
    try:
        with pytest.raises(ProtocolError) as caught:
            await worker.runner.train_step(0, x, y, ids)
        _refused(caught.value, "is no result")
        assert torch.equal(_weights(worker), before)
        assert len(sent) == 1
    finally:
        worker.ckpt.release()


async def test_an_honest_fused_output_trains_the_label_client(deployment: Any) -> None:
    # Prepare: the counter-check: an honest out and an honest gradient are applied
    worker = _label_client(deployment)

    def answer(msg: Message) -> Message:
        if msg.kind is Kind.FORWARD:
            return _result(msg, torch.randn(len(msg.tensors["act"]), CLASSES))
        act = sent[0].tensors["act"]
        return msg.reply(Kind.BACKWARD, tensors={"grad": torch.full_like(act, 1e-2)})

    sent = _serve(worker, answer)
    _, x, y, ids = next(worker.runner.epoch_batches(0))
    before = _weights(worker)
    try:
        await worker.runner.train_step(0, x, y, ids)
        assert not torch.equal(_weights(worker), before)
        assert [m.kind for m in sent] == [Kind.FORWARD, Kind.BACKWARD]
    finally:
        worker.ckpt.release()


EVALUATION: dict[str, tuple[Change, str]] = {
    # of another width: its argmax made an accuracy of a server's choosing (before: taken)
    "wrong width": (lambda o: torch.zeros(len(o), 3), r"out has shape \[\d+, 3\]"),
    "no scores": (lambda o: o[:, :0], r"out has shape \[\d+, 0\]"),
    "one row": (lambda o: o[:1], r"out has shape \[1, 2\]"),
    "huge": (lambda o: torch.full_like(o, 1e30), "max_abs_value"),
}


@pytest.mark.parametrize("attack", list(EVALUATION))
async def test_a_wrong_fused_evaluation_output_is_refused(deployment: Any, attack: str) -> None:
    # Prepare: the label client scores its evaluation on the outputs its server sends
    worker = _label_client(deployment)
    change, says = EVALUATION[attack]
    _serve(worker, lambda m: _result(m, change(torch.randn(len(m.tensors["act"]), CLASSES))))
    try:
        # Execute / Assert
        with pytest.raises(ProtocolError) as caught:
            await worker.runner.evaluate(worker.data.test)
        _refused(caught.value, says)
    finally:
        worker.ckpt.release()
