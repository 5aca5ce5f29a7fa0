"""The topology registry: each topology's name -> the object that defines it.

Adding a topology is one module in this package (a :class:`Topology` subclass and its
``TOPOLOGY``) plus one line in :data:`REGISTRY`; its name also goes into
``sl_pipeline.config.TOPOLOGIES``, the list the config checks (a test keeps the two equal).
Nothing outside this package compares a topology's name: it asks the topology.
"""

from __future__ import annotations

from sl_pipeline.errors import ConfigError
from workers.topologies import multihop, multitask, roundrobin, splitfed, ushaped, vanilla, vertical
from workers.topologies.base import Topology

REGISTRY: dict[str, Topology] = {
    "vanilla": vanilla.TOPOLOGY,
    "ushaped": ushaped.TOPOLOGY,
    "vertical": vertical.TOPOLOGY,
    "multitask": multitask.TOPOLOGY,
    "multihop": multihop.TOPOLOGY,
    "roundrobin": roundrobin.TOPOLOGY,
    "splitfed": splitfed.TOPOLOGY,
}


def topology(name: str) -> Topology:
    """The topology called ``name``; a clear error naming the choices for any other name."""
    found = REGISTRY.get(name)
    if found is None:
        raise ConfigError(f"topology {name!r} is unknown; choose one of {list(REGISTRY)}")
    return found


__all__ = ["REGISTRY", "Topology", "topology"]
