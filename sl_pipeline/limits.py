"""What a peer may send us: the sizes checked before anything is allocated.

Kept apart from the codec so that reading a config (every CLI verb) does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import LimitError


@dataclass(frozen=True)
class Limits:
    """What a peer may send us. Checked before allocation."""

    max_frames: int = 32
    max_header_bytes: int = 64 * 1024
    max_tensor_bytes: int = 256 * 1024 * 1024
    max_message_bytes: int = 512 * 1024 * 1024
    max_dims: int = 8
    # Chunked messages being assembled, all peers of a worker together
    max_inflight_bytes: int = 1024 * 1024 * 1024
    # Activations and gradients a peer sends: the largest magnitude (checked where read)
    max_abs_value: float = 1e6

    def __post_init__(self) -> None:
        names = ("max_frames", "max_header_bytes", "max_tensor_bytes", "max_message_bytes")
        for name in (*names, "max_inflight_bytes", "max_abs_value"):
            if getattr(self, name) <= 0:
                raise LimitError(f"limits.{name} must be positive")


DEFAULT_LIMITS = Limits()
