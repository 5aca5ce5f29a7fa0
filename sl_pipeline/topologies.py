"""What the protocol core knows of each topology, as data (no torch): where the built-in
models are cut, and which topologies give each party its own slice of the features.

The rest of what defines a topology (its client runner, server engine, deployment) is in
the registry, :mod:`workers.topologies`.
"""

from __future__ import annotations

from .errors import ConfigError

# The default cuts of the built-ins, per cut plan: topologies not named in CUT_PLANS cut the
# model once ("two" segments). Data, not code: the topology registry in workers says the rest.
DEFAULT_CUTS: dict[str, dict[str, list[int]]] = {
    "cnn": {"two": [3], "ushaped": [3, 8], "multihop": [3, 6]},
    "mlp": {"two": [2], "ushaped": [2, 4], "multihop": [2, 4]},
}
CUT_PLANS = {"ushaped": "ushaped", "multihop": "multihop"}
# Topologies whose parties each hold a different slice of the features: the handshake's
# model fingerprint leaves their input shape out.
OWN_FEATURES = frozenset({"vertical"})


def default_cuts(builtin: str, topology: str) -> list[int]:
    table = DEFAULT_CUTS.get(builtin)
    if table is None:
        raise ConfigError(f"model.cuts must be set for model.builtin = {builtin!r}")
    return list(table[CUT_PLANS.get(topology, "two")])
