"""Privacy settings: frozen dataclasses validated at construction, built from TOML.

The ``[privacy]`` table of a run's TOML file maps onto :class:`PrivacyConfig`::

    [privacy.noise]            # cut-layer activation noise (client side)
    sigma = 0.5
    clip = 1.0
    mechanism = "gaussian"     # or "laplace"

    [privacy.nopeek]           # distance-correlation penalty in the client loss
    alpha = 0.1

    [privacy.dpsgd]            # DP-SGD on the client segment's weights (Opacus)
    noise_multiplier = 1.0     # exactly one of noise_multiplier / target_epsilon
    max_grad_norm = 1.0

    [privacy.label]            # label protection (vertical topology only)
    mechanism = "marvell"
    scale = 4.0

A missing section means that defense is off. Unknown keys, wrong types, out-of-range values
and contradictory combinations raise :class:`~sl_pipeline.errors.PrivacyError` naming the key.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, Literal, TypeVar, get_args, get_origin

from sl_pipeline.errors import PrivacyError

NoiseMechanism = Literal["gaussian", "laplace"]
LabelMechanism = Literal["none", "gaussian", "marvell"]
ACCOUNTANTS = ("rdp", "gdp", "prv")
# Where label protection runs, per topology whose labels reach another party through the
# gradients: the vertical server (it holds the labels; feature parties get cut gradients) and
# the u-shaped client (it holds the labels; the server gets the gradient of its output).
LABEL_HOLDERS = {"vertical": "server", "ushaped": "client"}
CLIENT_DEFENSES = ("noise", "nopeek", "dpsgd", "hijack")


def _check_float(
    path: str,
    value: float,
    *,
    low: float,
    high: float = 1e6,  # no privacy setting means anything beyond a million
    low_open: bool = False,
    high_open: bool = False,
    hint: str | None = None,
) -> None:
    """Raise unless ``low <= value <= high`` (open ends when asked) and ``value`` is finite."""
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if math.isfinite(value) and not too_low and not too_high:
        return
    left = "(" if low_open else "["
    right = ")" if high_open or math.isinf(high) else "]"
    raise PrivacyError(
        f"{path} = {value!r} is out of range; allowed: {left}{low:g}, {high:g}{right}",
        hint=hint or f"set {path} to a finite value in that range",
    )


def _check_choice(path: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PrivacyError(
            f"{path} = {value!r} is not supported; allowed: {', '.join(choices)}",
            hint=f"set {path} to one of the allowed values",
        )


@dataclass(frozen=True)
class NoiseConfig:
    """Per-sample clipping of cut-layer activations, then additive noise of scale sigma*clip."""

    sigma: float = 0.0
    clip: float = 1.0
    mechanism: NoiseMechanism = "gaussian"

    def __post_init__(self) -> None:
        _check_float(
            "privacy.noise.sigma",
            self.sigma,
            low=0.0,
            hint="sigma is the noise multiplier; 0 means clipping only",
        )
        _check_float(
            "privacy.noise.clip",
            self.clip,
            low=0.0,
            low_open=True,
            hint="clip is the per-sample norm bound; use a positive value such as 1.0",
        )
        _check_choice("privacy.noise.mechanism", self.mechanism, ("gaussian", "laplace"))


@dataclass(frozen=True)
class NoPeekConfig:
    """Weight of the distance-correlation penalty added to the client loss."""

    alpha: float

    def __post_init__(self) -> None:
        _check_float(
            "privacy.nopeek.alpha",
            self.alpha,
            low=0.0,
            hint="alpha weighs dCor(inputs, activations) in the loss; typical 0.01-10",
        )


@dataclass(frozen=True)
class DPSGDConfig:
    """DP-SGD on the client segment (Opacus). Exactly one of noise_multiplier/target_epsilon."""

    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "rdp"
    poisson_sampling: bool = True

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            given = "both" if self.noise_multiplier is not None else "neither"
            raise PrivacyError(
                f"privacy.dpsgd: {given} of noise_multiplier and target_epsilon are set; "
                "exactly one is required",
                hint="set noise_multiplier to fix the noise, or target_epsilon to have it derived",
            )
        if self.noise_multiplier is not None:
            _check_float("privacy.dpsgd.noise_multiplier", self.noise_multiplier, low=0.0)
        if self.target_epsilon is not None:
            _check_float(
                "privacy.dpsgd.target_epsilon",
                self.target_epsilon,
                low=0.0,
                high=1e4,
                low_open=True,
            )
        _check_float("privacy.dpsgd.max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        _check_float(
            "privacy.dpsgd.delta",
            self.delta,
            low=0.0,
            high=1.0,
            low_open=True,
            high_open=True,
            hint="delta should be well below 1/dataset size, e.g. 1e-5",
        )
        if self.accountant == "gdp":  # Opacus' central-limit approximation: not a bound
            raise PrivacyError(
                "privacy.dpsgd.accountant = 'gdp' underestimates DP-SGD's epsilon (1.29 for "
                "at least 2.31 at noise 1 over 15 steps at rate 1/15); use 'prv' or 'rdp'"
            )
        _check_choice("privacy.dpsgd.accountant", self.accountant, ("rdp", "prv"))


@dataclass(frozen=True)
class LabelConfig:
    """Protection of the cut gradients the label holder sends to a non-label party."""

    mechanism: LabelMechanism = "none"
    scale: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("privacy.label.mechanism", self.mechanism, ("none", "gaussian", "marvell"))
        if self.mechanism == "none":
            if self.scale != 0.0:
                raise PrivacyError(
                    f"privacy.label.scale = {self.scale!r} has no effect with mechanism 'none'",
                    hint="choose mechanism 'gaussian' or 'marvell', or remove scale",
                )
            return
        _check_float(
            "privacy.label.scale",
            self.scale,
            low=0.0,
            low_open=True,
            hint="scale is the noise power relative to the gradients; try 1-4",
        )


@dataclass(frozen=True)
class HijackConfig:
    """The client's detector of a hijacking server (:class:`privacy.hijack.GradientScrutinizer`):
    on when the section is present; ``stop`` ends training when it flags."""

    threshold: float = 0.1
    window: int = 5
    warmup: int = 5
    stop: bool = False

    def __post_init__(self) -> None:
        _check_float("privacy.hijack.threshold", self.threshold, low=-1.0, high=2.0)
        for name in ("window", "warmup"):
            value = getattr(self, name)
            if value < (1 if name == "window" else 0) or value > 10_000:
                raise PrivacyError(
                    f"privacy.hijack.{name} = {value!r} is out of range; "
                    f"allowed: [{1 if name == 'window' else 0}, 10000]",
                    hint="count batches: window 5 and warmup 5 flag FSHA within 6 batches",
                )


@dataclass(frozen=True)
class PrivacyConfig:
    """All privacy settings of one run; ``None`` means that defense is off."""

    noise: NoiseConfig | None = None
    nopeek: NoPeekConfig | None = None
    dpsgd: DPSGDConfig | None = None
    label: LabelConfig | None = None
    hijack: HijackConfig | None = None

    def __post_init__(self) -> None:
        if self.dpsgd is not None and self.nopeek is not None and self.nopeek.alpha > 0:
            # dCor is a statistic of the whole batch: with it in the loss, one record's
            # "per-example" gradient depends on every other record of the batch, so clipping
            # no longer bounds a record's influence and the accountant's epsilon is void.
            raise PrivacyError(
                "privacy.nopeek and privacy.dpsgd cannot be combined: NoPeek's dCor term "
                "couples the examples of a batch, so DP-SGD's per-example clipping no longer "
                "bounds one record's influence and its epsilon would not hold",
                hint="remove [privacy.nopeek] (or set alpha = 0) or remove [privacy.dpsgd]",
            )
        if self.hijack is not None and self.label_protection_on:
            # A u-shaped client that protects its labels sends the server label-independent
            # output gradients, so an honest server's cut gradients stop depending on the
            # labels too: the detector would flag every honest run (min score -0.04 measured).
            raise PrivacyError(
                "privacy.hijack and privacy.label cannot be combined: label protection makes "
                "an honest server's cut gradients label-independent, which is what the "
                "detector flags",
                hint="remove [privacy.hijack] or [privacy.label] from this client's config",
            )

    @property
    def label_protection_on(self) -> bool:
        return self.label is not None and self.label.mechanism != "none"

    def validate_for_topology(self, topology: str) -> None:
        """Refuse settings that make no sense for ``topology`` (e.g. label protection)."""
        self._check_dpsgd_topology(topology)
        if self.label_protection_on and topology not in LABEL_HOLDERS:
            raise PrivacyError(
                f"privacy.label is only meaningful for topologies {', '.join(LABEL_HOLDERS)}, "
                f"not '{topology}'",
                hint="remove [privacy.label] or set mechanism = 'none'",
            )

    def _check_dpsgd_topology(self, topology: str) -> None:
        """DP-SGD where its mechanism cannot run: before, a u-shaped client stopped on
        Opacus' traceback (its optimizer holds the head's weights too) and vertical parties,
        each drawing its own Poisson batch, on "different sample ids ... check data.seed"."""
        if self.dpsgd is None:
            return
        if topology == "ushaped":
            raise PrivacyError(
                "privacy.dpsgd is not supported for topology ushaped: the client's optimizer "
                "also trains the head, whose gradients Opacus would not clip",
                hint="remove [privacy.dpsgd], or train vanilla",
            )
        if topology == "vertical" and self.dpsgd.poisson_sampling:
            raise PrivacyError(
                "privacy.dpsgd in a vertical party needs poisson_sampling = false: each party "
                "would draw its own Poisson batch from the operating system, so the parties' "
                "rows of a step would differ",
                hint="set privacy.dpsgd.poisson_sampling = false in every party (its epsilon "
                "then counts each pass over the data, unamplified), or remove [privacy.dpsgd]",
            )

    def check_placement(self, topology: str, *, server: bool, holds_labels: bool) -> None:
        """Refuse a defense that this worker cannot apply, instead of ignoring it.

        The cut-layer defenses (noise, nopeek, dpsgd) act on a client's segment and its
        activations, so they belong in a client's file; label protection acts on the gradient
        that the label holder sends back, which today is the vertical server holding the labels.
        """
        if server:
            for name in CLIENT_DEFENSES:
                if getattr(self, name) is not None:
                    raise PrivacyError(
                        f"privacy.{name} is a client-side defense; a server cannot apply it",
                        hint=f"move [privacy.{name}] to each client's config",
                    )
        self._check_dpsgd_topology(topology)
        if self.label is None:
            return
        if topology not in LABEL_HOLDERS:
            self.validate_for_topology(topology)
        elif LABEL_HOLDERS.get(topology) == "server" and not (server and holds_labels):
            raise PrivacyError(
                "privacy.label is applied by the vertical server that holds the labels; "
                "this worker does not",
                hint="put [privacy.label] in server.toml and leave server.label_holder empty",
            )
        elif LABEL_HOLDERS.get(topology) == "client" and server:
            raise PrivacyError(
                f"privacy.label is applied by the {topology} client that holds the labels; "
                "a server cannot apply it",
                hint="put [privacy.label] in each client's config",
            )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PrivacyConfig:
        """Build from the TOML ``[privacy]`` table, rejecting unknown keys and bad types."""
        if not isinstance(data, Mapping):
            raise PrivacyError(f"privacy must be a table, got {type(data).__name__}")
        sections: dict[str, type] = {
            "noise": NoiseConfig,
            "nopeek": NoPeekConfig,
            "dpsgd": DPSGDConfig,
            "label": LabelConfig,
            "hijack": HijackConfig,
        }
        _reject_unknown("privacy", data, sections)
        built: dict[str, Any] = {
            name: _build(sections[name], value, f"privacy.{name}") for name, value in data.items()
        }
        return cls(**built)


def _reject_unknown(path: str, data: Mapping[str, Any], valid: Mapping[str, Any]) -> None:
    for key in data:
        if key not in valid:
            raise PrivacyError(
                f"unknown key '{path}.{key}'; valid keys: {', '.join(valid)}",
                hint=f"check its spelling in the [{path}] table or in --set {path}.KEY=VALUE",
            )


_T = TypeVar("_T")


def _build(cls: type[_T], data: Any, path: str) -> _T:
    if not isinstance(data, Mapping):
        raise PrivacyError(f"{path} must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    valid = {f.name: hints[f.name] for f in fields(cls)}  # type: ignore[arg-type]
    _reject_unknown(path, data, valid)
    values = {key: _check_type(f"{path}.{key}", value, valid[key]) for key, value in data.items()}
    missing = [f.name for f in fields(cls) if f.name not in values and _required(f)]  # type: ignore[arg-type]
    if missing:
        raise PrivacyError(
            f"{path}.{missing[0]} is required in [{path}]",
            hint=f"set {path}.{missing[0]} (docs/privacy.md), or remove the [{path}] table",
        )
    return cls(**values)


def _required(f: Any) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _check_type(path: str, value: Any, hint: Any) -> Any:
    """Return ``value`` (ints widened to float) if it matches ``hint``, else raise."""
    allowed = get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in allowed:
        if option is type(None) and value is None:
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if (option is str or get_origin(option) is Literal) and isinstance(value, str):
            return value
    names = " or ".join(_type_name(o) for o in allowed)
    raise PrivacyError(
        f"{path} must be {names}, got {type(value).__name__} {value!r}",
        hint=f"write {path} as {names}, in the config file or in --set {path}=VALUE",
    )


def _type_name(option: Any) -> str:
    if get_origin(option) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(option))
    return "null" if option is type(None) else getattr(option, "__name__", str(option))


__all__ = [
    "ACCOUNTANTS",
    "LABEL_HOLDERS",
    "DPSGDConfig",
    "HijackConfig",
    "LabelConfig",
    "NoPeekConfig",
    "NoiseConfig",
    "PrivacyConfig",
]
