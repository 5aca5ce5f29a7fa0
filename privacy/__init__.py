"""Privacy for split learning: cut-layer defenses, NoPeek, DP-SGD, label protection,
accounting and leakage audits.

Mechanisms (``defenses``, ``nopeek``, ``label``, ``dpsgd``) are kept apart from accounting
(``accounting``); audits (``audit``) measure what an attacker can still learn. This package
imports no transport code.
"""

from privacy.accounting import (
    ActivationReleaseAccountant,
    DPSGDAccountantView,
    LaplaceReleaseAccountant,
    activation_accountant,
)
from privacy.audit import dcor_leakage, label_leak_auc, reconstruction_attack, ssim
from privacy.config import (
    DPSGDConfig,
    LabelConfig,
    NoiseConfig,
    NoPeekConfig,
    PrivacyConfig,
)
from privacy.defenses import ActivationNoise, Compose, CutLayerDefense, Identity, build_defenses
from privacy.dpsgd import PrivateClient, epsilon_spent, make_private_client
from privacy.frontier import pareto_front, plot_frontier
from privacy.label import (
    GaussianGradientNoise,
    LabelProtection,
    Marvell,
    build_label_protection,
)
from privacy.nopeek import NoPeekLoss, distance_correlation

__all__ = [
    "ActivationNoise",
    "ActivationReleaseAccountant",
    "Compose",
    "CutLayerDefense",
    "DPSGDAccountantView",
    "DPSGDConfig",
    "GaussianGradientNoise",
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
    "build_defenses",
    "build_label_protection",
    "dcor_leakage",
    "distance_correlation",
    "epsilon_spent",
    "label_leak_auc",
    "make_private_client",
    "pareto_front",
    "plot_frontier",
    "reconstruction_attack",
    "ssim",
]
