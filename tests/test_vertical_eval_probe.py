"""The vertical evaluation leak, closed: a feature party learns nothing from evaluation.

A malicious feature party can send any activation it likes for a row at evaluation. When the
server told it each batch's count of correct answers, a one-row batch whose activation forces
one fixed prediction gave that row's exact label, one probe per pass. Now the server keeps the
score to itself (its own accuracy) and the party gets an empty output and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sklearn.metrics import roc_auc_score

from sl_pipeline.config import ServerConfig, load
from sl_pipeline.messages import Kind, Message
from workers.server.engines.vertical import VerticalEngine
from workers.tools.localdeploy import init_deployment

PROBED_ROWS = 80


def _engine(tmp_path: Path) -> VerticalEngine:
    made = init_deployment(tmp_path / "d", topology="vertical", clients=2, dataset="breast_cancer")
    server = Path(made["files"]["server"])
    return VerticalEngine(load(ServerConfig, server), server.parent)


def _evaluate(engine: VerticalEngine, row: int, acts: dict[str, torch.Tensor]) -> Message:
    """One pass of one row: every party's part; returns what client-1 (the prober) got."""
    ids = torch.tensor([row], dtype=torch.int64)
    replies: list[Any] = []
    for party, act in acts.items():
        msg = Message(Kind.EVALUATE, client=party, epoch=row, tensors={"act": act, "ids": ids})
        replies += engine.evaluate(party.encode(), msg)
    return next(reply for identity, reply in replies if identity == b"client-1")


def _observed(reply: Message) -> float:
    """Everything the party was told, folded into one number: any meta figure, and the
    output's size and values."""
    out = reply.tensor("out").to(torch.float64)
    figures = sum(float(v) for v in reply.meta.values() if isinstance(v, int | float))
    return figures + out.numel() + float(out.sum())


def test_one_row_probe_at_evaluation_learns_labels_at_chance(tmp_path: Path) -> None:
    # Prepare: client-2 sends honest-looking activations; client-1 (the prober) sends a huge
    # constant one, which pins the server's prediction to one class whatever the row.
    engine = _engine(tmp_path)
    g = torch.Generator().manual_seed(0)
    hidden = engine.cfg.model.hidden
    labels = engine.labels
    assert labels is not None
    # Execute: one pass per probed row; the score is whatever came back
    scores = []
    for row in range(PROBED_ROWS):
        honest = torch.relu(torch.randn(1, hidden, generator=g))
        forced = torch.full((1, hidden), 1000.0)
        reply = _evaluate(engine, row, {"client-1": forced, "client-2": honest})
        assert reply.meta == {} and reply.tensor("out").shape == (1, 0)
        scores.append(_observed(reply))
    # Assert: label AUC of what the prober observed is chance (0.5 exactly: it saw nothing
    # that varies); the server still scored the pass itself
    truth = labels[:PROBED_ROWS].numpy()
    assert 0 < truth.sum() < PROBED_ROWS
    assert roc_auc_score(truth, scores) == 0.5
    assert engine.test_accuracy in (0.0, 1.0)  # the last pass: one row, scored by the server


def test_the_probe_would_read_every_label_from_a_count_of_correct_answers(
    tmp_path: Path,
) -> None:
    # The must-fail check of the probe: had the server sent its count of correct answers
    # (what it did before), the same probe reads the labels exactly.
    engine = _engine(tmp_path)
    g = torch.Generator().manual_seed(0)
    hidden = engine.cfg.model.hidden
    assert engine.labels is not None
    scores = []
    for row in range(PROBED_ROWS):
        honest = torch.relu(torch.randn(1, hidden, generator=g))
        _evaluate(engine, row, {"client-1": torch.full((1, hidden), 1000.0), "client-2": honest})
        scores.append(engine.test_accuracy)  # the count the server used to send (one row)
    auc = roc_auc_score(engine.labels[:PROBED_ROWS].numpy(), scores)
    assert max(auc, 1 - auc) == 1.0


# ---- red team 16, finding 1: a party sends its evaluation parts as PREDICT ----------------


def _server(tmp_path: Path, intent: str) -> tuple[Any, dict[str, Any]]:
    """An in-process vertical server both feature parties joined with ``intent``."""
    from workers.runtime.peers import Peer
    from workers.server.worker import ServerWorker

    made = init_deployment(
        tmp_path / "d", topology="vertical", clients=2, dataset="breast_cancer", insecure=True
    )
    path = Path(made["files"]["server"])
    server = ServerWorker(load(ServerConfig, path), path.parent)
    peers = {}
    for name in ("client-1", "client-2"):
        server.accept({"model": server.fingerprint, "client": name, "intent": intent}, None)
        peers[name] = Peer(name, None, "insecure")  # type: ignore[arg-type]
    return server, peers


async def _pass(
    server: Any, peers: dict[str, Any], kinds: dict[str, Kind], step: int = 0
) -> dict[str, Any]:
    """One batch of 40 labelled rows, each party's part sent with its kind; what each got."""
    g = torch.Generator().manual_seed(1)
    ids = torch.arange(40, dtype=torch.int64)
    got: dict[str, Any] = {}
    for name, kind in kinds.items():
        act = torch.relu(torch.randn(40, server.cfg.model.hidden, generator=g))
        msg = Message(kind, client=name, step=step, tensors={"act": act, "ids": ids})
        for identity, reply in await server.dispatch(name.encode(), peers[name], msg):
            got[identity.decode()] = reply
    return got


async def test_a_training_party_that_sends_predict_for_evaluation_gets_no_outputs(
    tmp_path: Path,
) -> None:
    # Prepare: both feature parties joined to train; client-1 (sorting first) swaps the kind
    server, peers = _server(tmp_path, "train")
    kinds = {"client-2": Kind.EVALUATE, "client-1": Kind.PREDICT}
    # Execute: the kind swap, and the same swap with client-2 sending PREDICT
    swapped = await _pass(server, peers, kinds)
    other = await _pass(server, peers, {"client-1": Kind.EVALUATE, "client-2": Kind.PREDICT}, 1)
    # Assert: the PREDICT part is refused; no logits reach either party; the mixed batch
    # never completes
    for got in (swapped, other):
        outs = [r.tensors["out"] for r in got.values() if "out" in r.tensors]
        assert all(out.numel() == 0 for out in outs)
        assert [r.kind for r in got.values()] == [Kind.ERROR]
        assert "gets no predictions" in next(iter(got.values())).meta["reason"]


async def test_parties_that_joined_to_infer_still_get_the_fused_predictions(
    tmp_path: Path,
) -> None:
    # Prepare: both parties joined to infer (what `sl-pipeline predict` says in its hello)
    server, peers = _server(tmp_path, "infer")
    # Execute: an honest prediction, and a mixed-kind batch from the same parties
    honest = await _pass(server, peers, {"client-1": Kind.PREDICT, "client-2": Kind.PREDICT})
    mixed = await _pass(server, peers, {"client-1": Kind.PREDICT, "client-2": Kind.EVALUATE}, 1)
    # Assert: each gets the outputs of every row; a mixed batch completes for nobody
    assert sorted(honest) == ["client-1", "client-2"]
    assert all(r.tensors["out"].shape == (40, 2) for r in honest.values())
    assert mixed == {}
