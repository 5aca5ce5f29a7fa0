"""PrivacyConfig: TOML mapping, unknown keys, types, ranges, contradictions, topology."""

from __future__ import annotations

from typing import Any

import pytest

from privacy.config import DPSGDConfig, LabelConfig, NoiseConfig, PrivacyConfig
from sl_pipeline.errors import PrivacyError, SLError


def test_full_table_builds_frozen_configs() -> None:
    # Prepare
    table = {
        "noise": {"sigma": 1, "clip": 2.0, "mechanism": "laplace"},
        "nopeek": {"alpha": 0},  # off: NoPeek with alpha > 0 is refused beside DP-SGD
        "dpsgd": {"target_epsilon": 3.0, "max_grad_norm": 1.0, "delta": 1e-6},
        "label": {"mechanism": "marvell", "scale": 4},
    }
    # Execute
    cfg = PrivacyConfig.from_mapping(table)
    # Assert
    assert cfg.noise == NoiseConfig(sigma=1.0, clip=2.0, mechanism="laplace")
    assert isinstance(cfg.noise.sigma, float)
    assert cfg.nopeek is not None and cfg.nopeek.alpha == 0.0
    assert cfg.dpsgd is not None and cfg.dpsgd.noise_multiplier is None
    assert cfg.label == LabelConfig(mechanism="marvell", scale=4.0)
    with pytest.raises(AttributeError):
        cfg.noise.sigma = 2.0  # type: ignore[misc]


def test_empty_table_turns_everything_off() -> None:
    assert PrivacyConfig.from_mapping({}) == PrivacyConfig()


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ({"noise": {"sigmaa": 1.0}}, "unknown key 'privacy.noise.sigmaa'; valid keys: sigma, clip"),
        ({"nosie": {}}, "unknown key 'privacy.nosie'"),
        ({"dpsgd": {"noise_multiplier": 1.0, "epsilon": 2.0}}, "'privacy.dpsgd.epsilon'"),
    ],
)
def test_unknown_keys_are_named(table: dict[str, Any], needle: str) -> None:
    with pytest.raises(PrivacyError, match="unknown key") as err:
        PrivacyConfig.from_mapping(table)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"noise": {"sigma": "1.0"}}, "privacy.noise.sigma must be float"),
        ({"noise": {"sigma": True}}, "privacy.noise.sigma must be float"),
        ({"noise": 3}, "privacy.noise must be a table"),
        (
            {"dpsgd": {"noise_multiplier": 1.0, "poisson_sampling": 1}},
            "privacy.dpsgd.poisson_sampling must be bool",
        ),
        ({"label": {"mechanism": 2}}, "privacy.label.mechanism must be one of"),
    ],
)
def test_wrong_types_rejected(table: dict[str, Any], key: str) -> None:
    with pytest.raises(PrivacyError) as err:
        PrivacyConfig.from_mapping(table)
    assert key in str(err.value)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"noise": {"sigma": -0.1}}, "privacy.noise.sigma"),
        ({"noise": {"sigma": float("nan")}}, "privacy.noise.sigma"),
        ({"noise": {"clip": 0.0}}, "privacy.noise.clip"),
        ({"noise": {"mechanism": "uniform"}}, "privacy.noise.mechanism"),
        ({"nopeek": {"alpha": -1.0}}, "privacy.nopeek.alpha"),
        ({"dpsgd": {"noise_multiplier": -1.0}}, "privacy.dpsgd.noise_multiplier"),
        ({"dpsgd": {"target_epsilon": 0.0}}, "privacy.dpsgd.target_epsilon"),
        ({"dpsgd": {"noise_multiplier": 1.0, "delta": 1.0}}, "privacy.dpsgd.delta"),
        ({"dpsgd": {"noise_multiplier": 1.0, "max_grad_norm": 0}}, "privacy.dpsgd.max_grad_norm"),
        ({"dpsgd": {"noise_multiplier": 1.0, "accountant": "moments"}}, "privacy.dpsgd.accountant"),
        ({"label": {"mechanism": "marvell", "scale": 0.0}}, "privacy.label.scale"),
    ],
)
def test_out_of_range_values_rejected_with_range(table: dict[str, Any], key: str) -> None:
    with pytest.raises(PrivacyError) as err:
        PrivacyConfig.from_mapping(table)
    message = str(err.value)
    assert key in message
    assert "allowed" in message


@pytest.mark.parametrize(
    "kwargs", [{}, {"noise_multiplier": 1.0, "target_epsilon": 3.0}], ids=["neither", "both"]
)
def test_contradictory_dpsgd_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(PrivacyError, match="exactly one is required"):
        DPSGDConfig(**kwargs)


def test_label_scale_without_mechanism_is_contradictory() -> None:
    with pytest.raises(PrivacyError, match="no effect"):
        LabelConfig(mechanism="none", scale=1.0)


def test_label_protection_only_where_labels_reach_another_party() -> None:
    # Prepare
    cfg = PrivacyConfig(label=LabelConfig(mechanism="gaussian", scale=1.0))
    # Execute / Assert
    cfg.validate_for_topology("vertical")
    cfg.validate_for_topology("ushaped")
    with pytest.raises(PrivacyError, match="only meaningful for topologies vertical, ushaped"):
        cfg.validate_for_topology("horizontal")
    PrivacyConfig(label=LabelConfig()).validate_for_topology("horizontal")


def test_label_protection_is_placed_with_the_label_holder() -> None:
    cfg = PrivacyConfig(label=LabelConfig(mechanism="gaussian", scale=1.0))
    cfg.check_placement("vertical", server=True, holds_labels=True)
    cfg.check_placement("ushaped", server=False, holds_labels=False)  # the u-shaped client
    with pytest.raises(PrivacyError, match="ushaped client that holds the labels"):
        cfg.check_placement("ushaped", server=True, holds_labels=False)
    with pytest.raises(PrivacyError, match="vertical server that holds the labels"):
        cfg.check_placement("vertical", server=False, holds_labels=False)


def test_privacy_error_is_sl_and_value_error() -> None:
    with pytest.raises(ValueError) as err:
        NoiseConfig(sigma=-1.0)
    assert isinstance(err.value, SLError)
    assert err.value.code == "privacy"


def test_nopeek_with_dpsgd_is_refused_naming_both() -> None:
    # dCor couples a batch's examples: per-example clipping would not bound a record.
    table = {"nopeek": {"alpha": 0.5}, "dpsgd": {"noise_multiplier": 1.0}}
    with pytest.raises(PrivacyError, match=r"privacy\.nopeek and privacy\.dpsgd cannot"):
        PrivacyConfig.from_mapping(table)
    assert PrivacyConfig.from_mapping({"nopeek": {"alpha": 0.5}}).nopeek is not None


def test_hijack_detector_with_label_protection_is_refused_naming_both() -> None:
    # Protected label gradients make an honest server's cut gradients label-independent.
    table = {"hijack": {}, "label": {"mechanism": "marvell", "scale": 4.0}}
    with pytest.raises(PrivacyError, match=r"privacy\.hijack and privacy\.label cannot"):
        PrivacyConfig.from_mapping(table)
    assert PrivacyConfig.from_mapping({"hijack": {}, "label": {"mechanism": "none"}}).hijack
