"""Where a defense's noise comes from when nobody passed a generator: a generator seeded from
the operating system's secret randomness, one per defense.

Never torch's global generator: every worker seeds it with ``model.seed`` to build identical
initial weights, and a peer knows that seed (the handshake checks that the ``[model]``
sections match), so noise drawn from it can be replayed and subtracted. Audits and tests pass
seeded generators of their own to make figures repeat.
"""

from __future__ import annotations

import secrets

import torch


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with 63 secret random bits."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator


class SecretRandomness:
    """Mixin: ``self.generator`` if one was given, else a secret one made on first use."""

    generator: torch.Generator | None

    def rng(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device.type != device.type:
            self.generator = secret_generator(device)
        return self.generator


__all__ = ["SecretRandomness", "secret_generator"]
