"""Vanilla split learning: one cut; the client sends activations and labels, the server
holds the rest of the model and the loss, and sends back the gradient at the cut."""

from __future__ import annotations

from workers.topologies.base import Topology


class Vanilla(Topology):
    name = "vanilla"


TOPOLOGY = Vanilla()
