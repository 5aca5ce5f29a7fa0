"""Privacy for split learning: cut-layer defenses, NoPeek, DP-SGD, label protection,
accounting and leakage audits.

Mechanisms (``defenses``, ``nopeek``, ``label``, ``dpsgd``) are kept apart from accounting
(``accounting``); audits (``audit``) measure what an attacker can still learn. This package
imports no transport code.
"""

from importlib import import_module
from typing import Any

# Names are loaded on first use (PEP 562): opacus, scikit-learn and matplotlib take seconds
# to import, and a worker that uses only a cut-layer defense should not pay for them.
_SOURCES = {
    "ActivationReleaseAccountant": "accounting",
    "DPSGDAccountantView": "accounting",
    "LaplaceReleaseAccountant": "accounting",
    "activation_accountant": "accounting",
    "activation_release_statement": "accounting",
    "CanaryGame": "canary",
    "epsilon_lower_bound": "canary",
    "run_canary_game": "canary",
    "dcor_leakage": "audit",
    "label_leak_auc": "audit",
    "reconstruction_attack": "audit",
    "label_leak_over_run": "label_attacks",
    "output_leak_auc": "label_attacks",
    "baselines": "reconstruction",
    "reconstruction_audit": "reconstruction",
    "release_of": "reconstruction",
    "THREAT_MODELS": "threats",
    "FSHASetup": "hijack",
    "GradientScrutinizer": "hijack",
    "HonestReference": "hijack",
    "fsha_game": "hijack",
    "ssim": "audit",
    "DPSGDConfig": "config",
    "LabelConfig": "config",
    "NoiseConfig": "config",
    "NoPeekConfig": "config",
    "PrivacyConfig": "config",
    "ActivationNoise": "defenses",
    "Compose": "defenses",
    "CutLayerDefense": "defenses",
    "Identity": "defenses",
    "build_defenses": "defenses",
    "PrivateClient": "dpsgd",
    "epsilon_spent": "dpsgd",
    "make_private_client": "dpsgd",
    "pareto_front": "frontier",
    "plot_frontier": "frontier",
    "GaussianGradientNoise": "label",
    "LabelProtection": "label",
    "Marvell": "label",
    "build_label_protection": "label",
    "NoPeekLoss": "nopeek",
    "distance_correlation": "nopeek",
}


def __getattr__(name: str) -> Any:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module 'privacy' has no attribute {name!r}")
    value = getattr(import_module(f"privacy.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "THREAT_MODELS",
    "ActivationNoise",
    "ActivationReleaseAccountant",
    "CanaryGame",
    "Compose",
    "CutLayerDefense",
    "DPSGDAccountantView",
    "DPSGDConfig",
    "FSHASetup",
    "GaussianGradientNoise",
    "GradientScrutinizer",
    "HonestReference",
    "Identity",
    "LabelConfig",
    "LabelProtection",
    "LaplaceReleaseAccountant",
    "Marvell",
    "NoPeekConfig",
    "NoPeekLoss",
    "NoiseConfig",
    "PrivacyConfig",
    "PrivateClient",
    "activation_accountant",
    "activation_release_statement",
    "baselines",
    "build_defenses",
    "build_label_protection",
    "dcor_leakage",
    "distance_correlation",
    "epsilon_lower_bound",
    "epsilon_spent",
    "fsha_game",
    "label_leak_auc",
    "label_leak_over_run",
    "make_private_client",
    "output_leak_auc",
    "pareto_front",
    "plot_frontier",
    "reconstruction_attack",
    "reconstruction_audit",
    "release_of",
    "run_canary_game",
    "ssim",
]
