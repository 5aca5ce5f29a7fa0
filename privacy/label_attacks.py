"""Label inference over a whole run: norm and direction attacks aggregated across epochs.

A feature party sees the cut gradient of every training example once per epoch. One epoch's
scores (:func:`privacy.audit.label_leak_auc`) understate what it learns: averaging each
example's scores over the epochs averages the label protection's noise away. The attacker
here needs no label:

* norm: each epoch's gradient norms are turned into ranks in [0, 1] (the norms shrink as
  training goes on, ranks do not), then averaged per example;
* direction: each epoch's cosine to that epoch's top singular vector. A singular vector's sign
  is arbitrary, so each epoch's scores are flipped when they correlate negatively with the
  running average of the epochs before; then averaged per example;
* spread: each epoch's |cosine| to that epoch's top singular vector, averaged per example.
  Marvell's noise is zero-mean but its variance along the mean-difference direction differs
  by class, so the class with more noise there sits further from zero on both sides (this
  score broke Marvell 16 at one seed in a red-team review, 0.677 where direction gave 0.642);
* projection: the rank, within the epoch, of |g . v| (the size of the component along the top
  singular vector, not divided by the norm), averaged per example;
* offdir: the norm of the gradient's part *off* the epoch's top singular vector (of the
  centred gradients), divided by the epoch's mean gradient norm, averaged per example. A
  protection that equalises only per-coordinate variances gives the class with small rank-one
  gradients isotropic noise, so its energy off the main direction gives the label away (red
  team 16: 0.700 at Marvell 64 where the other attacks stayed under 0.65);
* offdir_projection: offdir plus the signed component along that vector (divided by the mean
  norm, sign-aligned across epochs like direction), both standardised, the projection's sign
  chosen to correlate positively with offdir (no label needed);
* batch spread (:func:`batch_spread_over_run`): the spread score with each batch's own top
  singular vector, as Marvell fits its noise per batch;
* row mean (:func:`row_mean_over_run`): each row's gradients averaged over the run *before*
  any score (each batch centred first), projected on the top singular vector of those means.
  The protection's noise is drawn afresh at every step and a row's gradient drifts slowly, so
  the mean of E releases keeps the signal and divides the noise's variance by E; the attacks
  above average each epoch's score, after a nonlinearity, which keeps much of the noise in.
  It broke the u-shaped Marvell 12 setting (0.679 where the others stayed under 0.65).

:func:`label_leak_whole_run` runs them all on per-step records and reports the strongest.

Also: the label leak of outputs a party receives at evaluation (:func:`output_leak_auc`), and
of a party's own representations (:func:`representation_leak`: the u-shaped server's outputs,
which label protection never touches).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from privacy.audit import label_leak_auc
from sl_pipeline.errors import PrivacyError

Round = tuple[Tensor, Tensor]  # (sample ids, per-example gradients) of one epoch


def _ranks(values: Tensor) -> Tensor:
    order = torch.argsort(torch.argsort(values))
    return order.to(torch.float64) / max(1, values.shape[0] - 1)


ATTACKS = ("norm", "direction", "spread", "projection", "offdir", "offdir_projection")
# Per-epoch score rows: the attacks' own, and the signed projection that offdir_projection
# combines with offdir once the epochs are averaged.
_ROWS = (*ATTACKS[:-1], "signed_projection")
_SIGNED = (_ROWS.index("direction"), _ROWS.index("signed_projection"))


def _epoch_scores(grads: Tensor) -> Tensor:
    """(len(_ROWS), batch): each score of each example in one epoch."""
    flat = grads.detach().reshape(grads.shape[0], -1).to(torch.float64)
    norms = torch.linalg.vector_norm(flat, dim=1)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    along = flat @ vh[0]
    cos = along / norms.clamp_min(1e-12)
    _, _, vh_centred = torch.linalg.svd(flat - flat.mean(dim=0), full_matrices=False)
    u = vh_centred[0]
    mean_norm = norms.mean().clamp_min(1e-12)
    off = torch.linalg.vector_norm(flat - torch.outer(flat @ u, u), dim=1) / mean_norm
    return torch.stack(
        [_ranks(norms), cos, cos.abs(), _ranks(along.abs()), off, flat @ u / mean_norm]
    )


def _standard(values: Tensor) -> Tensor:
    return (values - values.mean()) / values.std().clamp_min(1e-12)


def _offdir_projection(offdir: Tensor, projection: Tensor) -> Tensor:
    """The combined score: both standardised, the projection's sign set by its correlation
    with offdir (the attacker needs no label for that)."""
    if float(torch.corrcoef(torch.stack([offdir, projection]))[0, 1]) < 0:
        projection = -projection
    return _standard(offdir) + _standard(projection)


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    auc = float(roc_auc_score(labels, scores))
    return max(auc, 1.0 - auc)


def label_leak_over_run(rounds: Sequence[Round], labels: Tensor) -> dict[str, Any]:
    """AUCs of the cross-epoch attacks of one party (``ATTACKS``, see the module).

    ``rounds`` holds each epoch's (ids, gradients); ``labels[id]`` is each sample's binary
    label (the auditor's ground truth). Returns ``<attack>_auc`` for each attack over the run,
    ``label_leak_auc`` (the strongest) with ``label_leak_attack`` (its name), and
    ``last_epoch_auc`` / ``best_epoch_auc``: the one-epoch attack on the last epoch and on the
    epoch it did best.
    """
    if not rounds:
        raise PrivacyError("label_leak_over_run needs at least one epoch of gradients")
    size = int(labels.shape[0])
    sums = torch.zeros(len(_ROWS), size, dtype=torch.float64)
    counts = torch.zeros(size, dtype=torch.float64)
    per_epoch = []
    for ids, grads in rounds:
        scores = _epoch_scores(grads)
        seen = counts[ids] > 0
        if bool(seen.sum() > 2):
            for row in _SIGNED:  # align the singular vector's sign with the epochs before
                before = sums[row, ids][seen] / counts[ids][seen]
                if float(torch.corrcoef(torch.stack([before, scores[row][seen]]))[0, 1]) < 0:
                    scores[row] = -scores[row]
        for row, score in enumerate(scores):
            sums[row].index_add_(0, ids, score)
        counts.index_add_(0, ids, torch.ones(ids.shape[0], dtype=torch.float64))
        per_epoch.append(label_leak_auc(grads, labels[ids])["label_leak_auc"])
    known = counts > 0
    y = labels[known].cpu().numpy()
    mean = sums[:, known] / counts[known]
    mean[-1] = _offdir_projection(mean[_ROWS.index("offdir")], mean[-1])
    out: dict[str, Any] = {f"{a}_auc": _auc(y, mean[i].numpy()) for i, a in enumerate(ATTACKS)}
    strongest = max(ATTACKS, key=lambda a: out[f"{a}_auc"])
    out.update(
        label_leak_auc=out[f"{strongest}_auc"],
        label_leak_attack=strongest,
        last_epoch_auc=per_epoch[-1],
        best_epoch_auc=max(per_epoch),
        epochs=len(per_epoch),
    )
    return out


def batch_spread_over_run(batches: Sequence[Round], labels: Tensor) -> dict[str, Any]:
    """The spread attack per batch: each batch's |cosine| to that batch's own top singular
    vector, averaged per example over the run. Marvell fits its plan (the direction along which
    the classes' noise variance differs) per batch, so a batch's own direction is sharper than
    an epoch's. ``batches`` holds (ids, gradients) per training step; batches of fewer than 3
    rows are skipped. Returns ``batch_spread_auc``."""
    size = int(labels.shape[0])
    sums = torch.zeros(size, dtype=torch.float64)
    counts = torch.zeros(size, dtype=torch.float64)
    for ids, grads in batches:
        flat = grads.detach().reshape(grads.shape[0], -1).to(torch.float64)
        if flat.shape[0] < 3:
            continue
        _, _, vh = torch.linalg.svd(flat, full_matrices=False)
        cos = (flat @ vh[0]).abs() / torch.linalg.vector_norm(flat, dim=1).clamp_min(1e-12)
        sums.index_add_(0, ids, cos)
        counts.index_add_(0, ids, torch.ones_like(cos))
    known = counts > 0
    if not bool(known.any()):
        raise PrivacyError("batch_spread_over_run needs a batch of at least 3 rows")
    y = labels[known].cpu().numpy()
    return {"batch_spread_auc": _auc(y, (sums[known] / counts[known]).numpy())}


def row_mean_over_run(batches: Sequence[Round], labels: Tensor) -> dict[str, Any]:
    """The row-mean attack (see the module): ``batches`` holds (ids, gradients) per training
    step. Each batch is centred (its common part drifts with training and says nothing about a
    row's label), each row's centred gradients are averaged over the run, and the means are
    projected on the top singular vector of the centred means; no label is needed. Returns
    ``row_mean_auc``."""
    size = int(labels.shape[0])
    sums: Tensor | None = None
    counts = torch.zeros(size, dtype=torch.float64)
    for ids, grads in batches:
        flat = grads.detach().reshape(grads.shape[0], -1).to(torch.float64)
        if flat.shape[0] < 2:
            continue  # one row centred is zero: nothing to average
        if sums is None:
            sums = torch.zeros(size, flat.shape[1], dtype=torch.float64)
        sums.index_add_(0, ids, flat - flat.mean(dim=0))
        counts.index_add_(0, ids, torch.ones(ids.shape[0], dtype=torch.float64))
    known = counts > 0
    if sums is None or int(known.sum()) < 2:
        raise PrivacyError("row_mean_over_run needs batches of at least 2 rows")
    means = sums[known] / counts[known, None]
    _, _, vh = torch.linalg.svd(means - means.mean(dim=0), full_matrices=False)
    return {"row_mean_auc": _auc(labels[known].cpu().numpy(), (means @ vh[0]).numpy())}


def rounds_of(steps: Sequence[tuple[int, Tensor, Tensor]]) -> list[Round]:
    """One (ids, gradients) round per epoch from per-step (epoch, ids, gradients) records."""
    return [
        (
            torch.cat([i for e, i, _ in steps if e == epoch]),
            torch.cat([g.reshape(g.shape[0], -1) for e, _, g in steps if e == epoch]),
        )
        for epoch in sorted({e for e, _, _ in steps})
    ]


PER_STEP_ATTACKS = ("batch_spread", "row_mean")


def label_leak_whole_run(
    steps: Sequence[tuple[int, Tensor, Tensor]], labels: Tensor
) -> dict[str, Any]:
    """Every label attack over a whole run: :func:`label_leak_over_run` on each epoch's
    gradients, :func:`batch_spread_over_run` and :func:`row_mean_over_run` on each step's.
    ``steps`` holds one (epoch, ids, gradients) per training step. ``label_leak_auc`` and
    ``label_leak_attack`` are the strongest of all of them."""
    found = label_leak_over_run(rounds_of(steps), labels)
    batches = [(i, g) for _, i, g in steps]
    found.update(batch_spread_over_run(batches, labels))
    found.update(row_mean_over_run(batches, labels))
    for attack in PER_STEP_ATTACKS:
        if found[f"{attack}_auc"] > found["label_leak_auc"]:
            found.update(label_leak_auc=found[f"{attack}_auc"], label_leak_attack=attack)
    return found


def cluster_label_attack(
    rounds: Sequence[Round], labels: Tensor, classes: int, *, seed: int = 0
) -> dict[str, Any]:
    """k-means (k = ``classes``) on each epoch's L2-normalised gradients.

    The u-shaped server receives the gradient of its output, which carries the label through
    the client's head. Clusters are named by the best one-to-one matching with the labels (an
    attacker needs a handful of known labels for that), so the accuracy is the attack's best
    case. Returns the accuracy in the last epoch and the best epoch, and the chance level (the
    largest class's share).
    """
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans

    if not rounds:
        raise PrivacyError("cluster_label_attack needs at least one epoch of gradients")
    accuracies = []
    for ids, grads in rounds:
        flat = grads.detach().reshape(grads.shape[0], -1).to(torch.float64)
        flat = flat / torch.linalg.vector_norm(flat, dim=1, keepdim=True).clamp_min(1e-12)
        found = KMeans(n_clusters=classes, n_init=4, random_state=seed).fit_predict(flat.numpy())
        truth = labels[ids].cpu().numpy()
        hits = np.zeros((classes, classes))
        np.add.at(hits, (found, truth), 1)
        rows, cols = linear_sum_assignment(-hits)
        accuracies.append(float(hits[rows, cols].sum()) / len(truth))
    counts = torch.bincount(labels[rounds[-1][0]].reshape(-1), minlength=classes)
    return {
        "cluster_label_accuracy": accuracies[-1],
        "cluster_label_best_epoch_accuracy": max(accuracies),
        "cluster_label_chance": float(counts.max()) / float(counts.sum()),
    }


def model_completion(
    features: Tensor, labels: Tensor, *, known: int = 40, seed: int = 0
) -> dict[str, Any]:
    """Model completion (Fu et al. 2022): a party with a trained bottom segment and ``known``
    labelled rows fits a small head on its own representations and labels the rest.

    ``features`` are the party's segment outputs for its rows, ``labels`` their true labels.
    Returns the label AUC on the rows it did not know (binary; ``max(auc, 1 - auc)``) or the
    accuracy (more classes), and the majority-class share for comparison.
    """
    from sklearn.linear_model import LogisticRegression

    flat = features.detach().reshape(features.shape[0], -1).to(torch.float64).numpy()
    y = labels.reshape(-1).cpu().numpy()
    if known < 2 or known >= len(y):
        raise PrivacyError(f"known = {known} is out of range; allowed: [2, {len(y) - 1}]")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).numpy()
    classes = np.unique(y)
    per_class = max(1, known // len(classes))  # the same number of known rows per class
    taught = np.concatenate([order[y[order] == c][:per_class] for c in classes])
    rest = np.setdiff1d(np.arange(len(y)), taught)
    head = LogisticRegression(max_iter=1000).fit(flat[taught], y[taught])
    out: dict[str, Any] = {"completion_known": len(taught)}
    if len(np.unique(y)) == 2:
        out["completion_auc"] = _auc(y[rest], head.decision_function(flat[rest]))
    else:
        out["completion_accuracy"] = float((head.predict(flat[rest]) == y[rest]).mean())
    out["completion_chance"] = float(np.bincount(y[rest]).max() / len(rest))
    return out


def representation_leak(
    steps: Sequence[tuple[int, Tensor, Tensor]],
    labels: Tensor,
    classes: int,
    *,
    known: int = 40,
    seed: int = 0,
) -> dict[str, Any]:
    """What a party learns of the labels from its **own representations** of the rows, the
    last epoch's (``steps``: one (epoch, ids, outputs) per training step). The u-shaped
    server computes its segment's output for every row at every step; the client's head
    turns it into the prediction, so it separates the classes, and label protection (which
    acts on the gradients the server gets back) never touches it. Three attackers:

    * ``representation_auc`` (binary, no label needed): the rows' centred outputs projected
      on their top singular vector (``max(auc, 1 - auc)``, like every AUC here);
    * ``representation_cluster_accuracy``: k-means as :func:`cluster_label_attack`;
    * model completion (:func:`model_completion`): a head fitted on ``known`` labelled rows.
    """
    last = rounds_of(steps)[-1]
    ids, flat = last[0], last[1].detach().to(torch.float64)
    rows, where = torch.unique(ids, return_inverse=True)  # a row twice in an epoch: its mean
    sums = torch.zeros(len(rows), flat.shape[1], dtype=torch.float64).index_add_(0, where, flat)
    counts = torch.bincount(where, minlength=len(rows)).to(torch.float64)
    means = sums / counts[:, None]
    truth = labels[rows]
    found = cluster_label_attack([(rows, means)], labels, classes, seed=seed)
    out: dict[str, Any] = {"representation_cluster_accuracy": found["cluster_label_accuracy"]}
    if classes == 2:
        centred = means - means.mean(dim=0)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        out["representation_auc"] = _auc(truth.cpu().numpy(), (centred @ vh[0]).numpy())
    out.update(model_completion(means, truth, known=known, seed=seed))
    return out


def output_leak_auc(outputs: Tensor, labels: Tensor) -> float:
    """Label AUC of the outputs a party received at evaluation: score = logit 1 - logit 0.
    An output without columns carries nothing: 0.5."""
    flat = outputs.detach().reshape(outputs.shape[0], -1).to(torch.float64)
    if flat.shape[1] == 0:
        return 0.5
    if flat.shape[1] < 2:
        raise PrivacyError("output_leak_auc needs two output columns (binary labels)")
    return _auc(labels.cpu().numpy(), (flat[:, 1] - flat[:, 0]).numpy())


__all__ = [
    "ATTACKS",
    "PER_STEP_ATTACKS",
    "batch_spread_over_run",
    "cluster_label_attack",
    "label_leak_over_run",
    "label_leak_whole_run",
    "model_completion",
    "output_leak_auc",
    "representation_leak",
    "rounds_of",
    "row_mean_over_run",
]
