"""The topology registry: every topology the config accepts has one entry, and each entry
names what defines it."""

from __future__ import annotations

import pytest

from sl_pipeline.config import TOPOLOGIES, ServerConfig, load
from sl_pipeline.errors import ConfigError
from sl_pipeline.topologies import OWN_FEATURES
from workers.client.steps import StepRunner
from workers.server.engines import ENGINES, build_engine
from workers.topologies import REGISTRY, topology


def test_the_registry_knows_every_topology_the_config_accepts() -> None:
    assert list(REGISTRY) == list(TOPOLOGIES)
    assert all(spec.name == name for name, spec in REGISTRY.items())


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_each_topology_names_its_runner_and_what_it_needs(name: str) -> None:
    # Prepare
    spec = topology(name)
    # Assert
    assert issubclass(spec.runner, StepRunner)
    assert 1 <= spec.min_clients <= spec.default_clients
    assert spec.datasets
    assert spec.feature_parties == (name in OWN_FEATURES)
    assert spec.engine_kind in ENGINES  # the engines' factory builds what it names


def test_the_engine_factory_refuses_an_unknown_kind_with_the_choices(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(clients=1, dataset="breast_cancer")
    with pytest.raises(ConfigError, match="engine 'star' is unknown; choose one of"):
        build_engine("star", load(ServerConfig, files["server"]), files["server"].parent)


def test_an_unknown_topology_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="topology 'star' is unknown; choose one of"):
        topology("star")
