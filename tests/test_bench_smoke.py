"""Smoke tests for the cheap bench sections. They check that figures exist, never speed."""

from __future__ import annotations

import pytest

from bench import crypto_rt, flops
from bench.common import machine_load, paired
from bench.models import VGG_CUT, vgg16
from bench.rpc import RpcPeer


@pytest.mark.timeout(60)
def test_flops_table_counts_positive_and_split_below_federated() -> None:
    # Execute
    table = flops.run(quick=True)["flops_table"]["ours_per_epoch"]

    # Assert
    assert set(table) == {"vgg16", "resnet18"}
    for by_clients in table.values():
        assert set(by_clients) == {"100", "500"}
        for row in by_clients.values():
            assert row["split_tflops"] > 0 and row["federated_tflops"] > 0
            assert row["split_tflops"] < row["federated_tflops"]
            assert row["split_gb"] > 0 and row["federated_gb"] > 0


def test_segment_flops_are_a_part_of_the_whole_model() -> None:
    # Execute
    whole, out_shape = flops.train_flops_per_sample(vgg16(), None)
    segment, cut_shape = flops.train_flops_per_sample(vgg16(), VGG_CUT)

    # Assert
    assert 0 < segment < whole
    assert out_shape == (10,) and cut_shape == (64, 32, 32)


@pytest.mark.timeout(60)
def test_tiny_crypto_round_trip_runs() -> None:
    # Execute
    result = crypto_rt.run(quick=True, sizes={"4KiB": 4 * 1024})

    # Assert
    assert set(result["encryption_overhead"]) == {"4KiB"}
    assert result["encryption_overhead"]["4KiB"] > 0
    assert result["rtt_ms"]["4KiB"]["samples"] >= 3


@pytest.mark.timeout(120)
def test_rpc_baseline_runs_blocks_on_request_and_its_processes_stop() -> None:
    # Setup
    peer = RpcPeer("digits_cnn")
    try:
        # Execute: two blocks, as bench.overhead interleaves them with its own
        first, second = peer.steps(2), peer.steps(3)
    finally:
        peer.close()

    # Assert
    assert len(first) == 2 and len(second) == 3
    assert all(seconds > 0 for seconds in first + second)
    assert not any(party.is_alive() for party in peer.parties)


def test_paired_ratio_is_the_median_of_pair_ratios_with_its_quartiles() -> None:
    # Prepare: the third pair was hit by a burst of load on one side only
    a, b = [2.0, 4.0, 30.0, 6.0, 8.0], [1.0, 2.0, 3.0, 3.0, 4.0]

    # Execute
    spread = paired(a, b)

    # Assert: pair ratios 2, 2, 10, 2, 2 -> the burst moves the quartiles, not the median
    assert spread["median"] == 2.0 and spread["pairs"] == 5
    assert spread["q1"] == 2.0 and spread["q3"] == 2.0 and spread["iqr"] == 0.0
    with pytest.raises(ValueError, match="matched"):
        paired([1.0], [])


def test_machine_load_names_the_load_averages_and_cores() -> None:
    # Execute
    load = machine_load()

    # Assert
    assert len(load["loadavg"]) == 3 and all(value >= 0 for value in load["loadavg"])
    assert load["cpus"] >= 1
