"""Model splitting: build the whole network from a seed, keep only your own segment.

A model is either an ``nn.Sequential`` cut at indices (a built-in, or a user function
named ``"pkg.module:function"``), or one factory per segment. Every party builds from the
same seed, so the split network starts from exactly the weights a central one would.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import itertools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict

import torch
from torch import nn

from . import optim
from .config import ModelConfig
from .errors import ConfigError
from .topologies import OWN_FEATURES, default_cuts

Shape = tuple[int, ...]


def cnn(in_shape: Sequence[int], classes: int, hidden: int = 64) -> nn.Sequential:
    """A small CNN for small images (digits is 1x8x8)."""
    channels, height, width = in_shape
    flat = 32 * (height // 2) * (width // 2)
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def mlp(in_shape: Sequence[int], classes: int, hidden: int = 64) -> nn.Sequential:
    """An MLP for tabular data (breast_cancer has 30 features)."""
    features = math.prod(in_shape)
    return nn.Sequential(
        nn.Linear(features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden // 2),
        nn.ReLU(),
        nn.Linear(hidden // 2, classes),
    )


BUILTINS: dict[str, Callable[..., nn.Sequential]] = {"cnn": cnn, "mlp": mlp}


def import_path(spec: str, dotted: str) -> Callable[..., nn.Module]:
    """Resolve ``"pkg.module:function"``; errors name the config key."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{dotted} = {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{dotted} = {spec!r}: cannot import {module_name!r} ({exc})") from None
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{dotted} = {spec!r}: {module_name!r} has no {attr!r}") from None
    if not callable(factory):
        raise ConfigError(f"{dotted} = {spec!r} is not callable")
    return factory  # type: ignore[no-any-return]


def full_model(cfg: ModelConfig) -> nn.Sequential:
    """The whole network as one Sequential, initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    if cfg.builtin:
        if cfg.builtin not in BUILTINS:
            raise ConfigError(
                f"model.builtin = {cfg.builtin!r} is unknown; choose one of {sorted(BUILTINS)}"
            )
        if not cfg.in_shape:
            raise ConfigError("model.in_shape must be set for a built-in model")
        with _buildable(cfg):
            return BUILTINS[cfg.builtin](cfg.in_shape, cfg.classes, cfg.hidden)
    if cfg.sequential:
        model = import_path(cfg.sequential, "model.sequential")()
        if not isinstance(model, nn.Sequential):
            raise ConfigError("model.sequential must return an nn.Sequential")
        return model
    raise ConfigError("set one of model.builtin, model.sequential or model.factories")


@contextlib.contextmanager
def _buildable(cfg: ModelConfig) -> Iterator[None]:
    """A built-in network the sizes in ``[model]`` cannot make (more weights than memory
    holds, an in_shape of the wrong length): one line naming the keys, not torch's traceback."""
    try:
        yield
    except (RuntimeError, MemoryError, ValueError, OverflowError) as exc:
        why = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(
            f"model.builtin = {cfg.builtin or 'mlp'!r} with in_shape = {cfg.in_shape}, classes = "
            f"{cfg.classes}, hidden = {cfg.hidden} cannot be built ({why}); check those keys"
        ) from None


def build_segments(cfg: ModelConfig, topology: str = "vanilla") -> list[nn.Module]:
    """All segments in order (client first). Each party keeps only its own."""
    if cfg.factories:
        segments = []
        for i, spec in enumerate(cfg.factories):
            torch.manual_seed(cfg.seed + i)
            segments.append(import_path(spec, f"model.factories[{i}]")())
        return segments
    model = full_model(cfg)
    cuts = list(cfg.cuts) or default_cuts(cfg.builtin, topology)
    if sorted(set(cuts)) != cuts or cuts[0] <= 0 or cuts[-1] >= len(model):
        raise ConfigError(
            f"model.cuts = {cuts} must be increasing indices between 1 and {len(model) - 1}"
        )
    bounds = [0, *cuts, len(model)]
    return [model[a:b] for a, b in itertools.pairwise(bounds)]


def segment_inputs(segments: Sequence[nn.Module], in_shape: Sequence[int]) -> list[Shape | None]:
    """The per-sample shape each segment takes, found by passing two zero samples through
    them in order, in eval mode and without autograd (so no weight, gradient or BatchNorm
    statistic changes). A peer's activations are checked against it before any layer runs:
    a wrong spatial size would otherwise make a conv compute on it before a later layer
    refuses it. ``None`` where it is not known: no ``in_shape`` configured, or a model that
    does not run on it (then ``in_shape`` itself is in doubt, and nothing is checked).

    Not on ``meta`` tensors: the first meta convolution loads torch's decompositions, about
    2 s of every worker's start-up, against milliseconds for two real samples."""
    unknown: list[Shape | None] = [None] * len(segments)
    if not in_shape:
        return unknown
    shapes: list[Shape | None] = []
    modes = [(m, m.training) for segment in segments for m in segment.modules()]
    try:
        for segment in segments:
            segment.eval()
        with torch.inference_mode():
            x = torch.zeros(2, *in_shape, device=_device_of(segments[0]))
            for segment in segments:
                shapes.append(tuple(x.shape[1:]))
                x = segment(x.to(_device_of(segment, x.device)))
                if not isinstance(x, torch.Tensor):
                    return unknown
    except Exception:  # any failure: shapes unknown, so none is checked
        return unknown
    finally:
        for module, training in modes:
            module.training = training
    return shapes


def _device_of(module: nn.Module, default: torch.device | str = "cpu") -> torch.device | str:
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return default


def vertical_bottom(cfg: ModelConfig, party: int) -> nn.Sequential:
    """A vertical feature party's own layers: its features -> ``hidden`` units."""
    torch.manual_seed(cfg.seed + 1 + party)
    with _buildable(cfg):
        return nn.Sequential(nn.Linear(math.prod(cfg.in_shape), cfg.hidden), nn.ReLU())


def vertical_top(cfg: ModelConfig, parties: int, fuse: str) -> nn.Sequential:
    """The server's layers above the fusion of every party's cut-layer output."""
    torch.manual_seed(cfg.seed)
    width = cfg.hidden * parties if fuse == "concat" else cfg.hidden
    with _buildable(cfg):
        return nn.Sequential(
            nn.Linear(width, cfg.hidden // 2), nn.ReLU(), nn.Linear(cfg.hidden // 2, cfg.classes)
        )


def multitask_heads(cfg: ModelConfig, in_features: int, classes: Sequence[int]) -> list[nn.Module]:
    """One head per task on top of the shared trunk (in place of the model's last Linear)."""
    heads: list[nn.Module] = []
    for i, n in enumerate(classes):
        torch.manual_seed(cfg.seed + 1000 + i)
        heads.append(nn.Linear(in_features, n))
    return heads


def fingerprint(cfg: ModelConfig, topology: str) -> str:
    """A short hash both sides compare in the handshake: same architecture, same cut.
    Vertical parties each see a different slice of the features, so in_shape is left out."""
    model = asdict(cfg)
    if topology in OWN_FEATURES:
        model.pop("in_shape")
    blob = json.dumps({"model": model, "topology": topology}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_device(name: str) -> torch.device:
    """``train.device``: "cpu" (the default, what CI tests), "cuda[:N]" where a GPU exists,
    or "auto": the GPU when one is visible, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"train.device = {name!r} is not a device; use 'cpu', 'cuda' or 'auto'"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but no CUDA GPU is visible; use 'cpu'")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"train.device = {name!r} but this machine shows {torch.cuda.device_count()} "
            "CUDA GPU(s), numbered from 0; use 'cuda' or 'cuda:N' with N below that"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.device = {name!r} is not supported; use 'cpu' or 'cuda'")
    return device


def make_optimizer(
    params: Sequence[nn.Parameter] | list[nn.Parameter],
    name: str,
    lr: float,
    momentum: float,
) -> torch.optim.Optimizer:
    params = list(params)
    if name == "adam":
        return optim.Adam(params, lr=lr)
    return optim.SGD(params, lr=lr, momentum=momentum)
