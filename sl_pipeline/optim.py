"""torch's SGD and Adam, without the import of torch._dynamo that their wrappers make.

``torch.optim`` marks graph breaks for ``torch.compile``: ``step`` (through
``_use_grad_for_differentiable``) and ``add_param_group``, ``zero_grad``, ``state_dict`` and
``load_state_dict`` (through ``torch._disable_dynamo``) import ``torch._dynamo`` on first use.
That import costs about a second of CPU in every worker process that starts, more than the
rest of a worker's start-up besides torch itself, and we never compile. These subclasses call
the functions those wrappers wrap, with gradients off as the step wrapper sets them: the
same arithmetic, the same state dicts (``test_optim.py`` checks both against torch's own).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import Optimizer


def _unwrapped(method: Callable[..., Any]) -> Callable[..., Any]:
    """The function under a functools.wraps decorator (itself when undecorated)."""
    return getattr(method, "__wrapped__", method)


_ADD_PARAM_GROUP = _unwrapped(Optimizer.add_param_group)
_ZERO_GRAD = _unwrapped(Optimizer.zero_grad)
_STATE_DICT = _unwrapped(Optimizer.state_dict)
_LOAD_STATE_DICT = _unwrapped(Optimizer.load_state_dict)


class _Eager(Optimizer):
    """The four Optimizer methods torch decorates with a lazy dynamo import, undecorated."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _ADD_PARAM_GROUP(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _ZERO_GRAD(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return _STATE_DICT(self)  # type: ignore[no-any-return]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _LOAD_STATE_DICT(self, state_dict)


_SGD_STEP = _unwrapped(torch.optim.SGD.step)
_ADAM_STEP = _unwrapped(torch.optim.Adam.step)


class SGD(_Eager, torch.optim.SGD):
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        with torch.set_grad_enabled(bool(self.defaults["differentiable"])):
            return _SGD_STEP(self, closure)  # type: ignore[no-any-return]


class Adam(_Eager, torch.optim.Adam):
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        with torch.set_grad_enabled(bool(self.defaults["differentiable"])):
            return _ADAM_STEP(self, closure)  # type: ignore[no-any-return]
