"""The PSI core over bytes, and the server's relay of its sealed payloads."""

from __future__ import annotations

import os

import pytest
import torch

from sl_pipeline.config import DataConfig, ModelConfig, ServerConfig, ServerSection
from sl_pipeline.errors import CryptoError, ProtocolError
from sl_pipeline.messages import Kind, Message
from sl_pipeline.psi import PsiParty
from workers.server.engines.vertical import VerticalEngine


def _run(
    a_ids: list[str], b_ids: list[str], key_b: bytes | None = None
) -> tuple[list[str], list[str], list[bytes]]:
    key = os.urandom(32)
    a, b = PsiParty(a_ids, key, "hospital", "lab"), PsiParty(b_ids, key_b or key, "lab", "hospital")
    a0, b0 = a.first(), b.first()
    a1, b1 = a.second(b0), b.second(a0)
    return [a_ids[r] for r in a.result(b1)], [b_ids[r] for r in b.result(a1)], [a0, b0, a1, b1]


def test_both_parties_find_the_same_intersection_in_id_order() -> None:
    a_ids = [f"patient-{i:04d}" for i in range(0, 300, 3)]
    b_ids = [f"patient-{i:04d}" for i in range(200, 0, -2)]
    mine, theirs, wire = _run(a_ids, b_ids)
    expected = sorted(set(a_ids) & set(b_ids))
    assert mine == theirs == expected and len(expected) == 33
    # what travels is ciphertext: no id, shared or not, appears in it
    assert not [i for i in a_ids + b_ids for blob in wire if i.encode() in blob]


def test_disjoint_sets_give_an_empty_intersection() -> None:
    mine, theirs, _ = _run(["a", "b"], ["c", "d", "e"])
    assert mine == theirs == []


def test_a_payload_sealed_with_another_key_or_changed_is_refused() -> None:
    with pytest.raises(CryptoError, match="group_key"):
        _run(["a", "b"], ["b", "c"], key_b=os.urandom(32))
    key = os.urandom(32)
    a, b = PsiParty(["a"], key, "x", "y"), PsiParty(["a"], key, "y", "x")
    blob = bytearray(b.first())
    blob[20] ^= 1
    with pytest.raises(CryptoError):
        a.second(bytes(blob))
    with pytest.raises(CryptoError):  # a's own payload played back to it (sender bound)
        a.second(a.first())


def _engine(label_holder: str) -> VerticalEngine:
    cfg = ServerConfig(
        server=ServerSection(topology="vertical", parties=2, label_holder=label_holder),
        model=ModelConfig(builtin="mlp", in_shape=[0], classes=2),
        data=DataConfig() if label_holder else DataConfig(dataset="breast_cancer"),
    )
    return VerticalEngine(cfg)


def _post(client: str, round_: int, payload: bytes) -> Message:
    sealed = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    meta = {"op": "psi", "round": round_}
    return Message(
        kind=Kind.WEIGHTS, client=client, step=round_, meta=meta, tensors={"sealed": sealed}
    )


def test_the_server_pairs_each_round_and_hands_each_party_the_other_payload() -> None:
    engine = _engine("lab")
    assert engine.handle(b"A", _post("hospital", 0, b"from-hospital")) == []
    replies = dict(engine.handle(b"B", _post("lab", 0, b"from-lab")))
    assert bytes(replies[b"A"].tensor("sealed").numpy()) == b"from-lab"
    assert bytes(replies[b"B"].tensor("sealed").numpy()) == b"from-hospital"
    assert replies[b"A"].client == "hospital" and replies[b"A"].meta["from"] == "lab"


def test_a_server_holding_labels_refuses_psi() -> None:
    with pytest.raises(ProtocolError, match="label_holder"):
        _engine("").handle(b"A", _post("hospital", 0, b"x"))
