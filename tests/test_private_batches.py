"""A DP-SGD client's batches after a resume (workers/client/private.py).

The Poisson mask is drawn from the operating system's generator (no seed a peer could search),
so a resumed client cannot draw the batch it sent before a crash again: the batch about to be
sent must already be in the checkpoint, or a step the server applied is resent with other
rows and answered from the server's cache with their gradient."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from privacy.config import DPSGDConfig
from sl_pipeline.config import TrainConfig
from sl_pipeline.data import Split
from workers.client.private import PrivateBatches

ROWS, BATCH = 200, 20


def _attach() -> PrivateBatches:
    torch.manual_seed(0)
    bottom = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(bottom.parameters(), lr=0.1)
    train = Split(torch.randn(ROWS, 4), torch.randint(0, 2, (ROWS,)), torch.arange(ROWS))
    cfg = DPSGDConfig(noise_multiplier=1.0)
    return PrivateBatches.attach(bottom, optimizer, train, cfg, TrainConfig(batch_size=BATCH))


def test_a_resumed_client_sends_the_batch_it_would_have_sent() -> None:
    # Prepare: a client that applied steps 0..3 of an epoch and saved its state after step 3
    first = _attach()
    batches = first.batches(0)
    for _step, _x, _y, _ids in itertools.islice(batches, 4):
        pass
    saved = first.state()
    step, _x, _y, sent_ids = next(batches)  # drawn and sent; then killed before its checkpoint
    # Execute: a restarted client (fresh generators) resumes from the saved state
    second = _attach()
    second.load_state(saved)
    again = next(second.batches(4))
    # Assert: the same step with the same rows, and the epoch's draws continue from there
    assert (again[0], again[3].tolist()) == (step, sent_ids.tolist())
    assert second.drawn == first.drawn


def test_an_epoch_draws_its_batches_once_and_a_new_one_starts_afresh() -> None:
    private = _attach()
    steps = [s for s, *_ in private.batches(0)]
    assert steps == list(range(len(steps))) and private.drawn == ROWS // BATCH
    assert private.state()["next_batch"] is None  # nothing pre-drawn past the epoch's end
    assert [s for s, *_ in itertools.islice(private.batches(0), 2)] == [0, 1]


def test_a_pipelined_client_resumes_with_the_batches_it_had_in_flight() -> None:
    # Prepare: steps 0..5 handed out with 3 in flight (train.pipeline_depth = 3); the state
    # saved after step 2 was applied, then the client was killed with steps 3..5 sent
    first = _attach()
    handed = list(itertools.islice(first.batches(0), 6))
    saved = first.state()
    # Execute: a restarted client resumes at step 3
    second = _attach()
    second.load_state(saved)
    again = list(itertools.islice(second.batches(3), 3))
    # Assert: steps 3..5 carry the rows sent before the crash, then the epoch goes on
    assert [(s, ids.tolist()) for s, _x, _y, ids in again] == [
        (s, ids.tolist()) for s, _x, _y, ids in handed[3:]
    ]
