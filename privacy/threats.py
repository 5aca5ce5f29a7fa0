"""Who attacks, what they know, what they see: one threat model per audit.

`sl-pipeline audit` prints the models of the attacks it ran beside their figures, and
``docs/privacy.md`` repeats them; a figure means nothing without the attacker it measures.
"""

from __future__ import annotations

THREAT_MODELS: dict[str, dict[str, str]] = {
    "reconstruction": {
        "who": "an honest-but-curious server (or relay) that receives the cut-layer activations",
        "knows": "the architecture, the defense's settings, and auxiliary data of the same kind "
        "(the client's training rows, disjoint from the attacked test rows) on which it can "
        "query the trained client segment; the labels too, where the topology sends them",
        "sees": "every release of each attacked test row over the run (one per evaluation "
        "pass), and it can query the client segment as it was at each pass; the strongest of: "
        "releases averaged through the final encoder, or each pass's release through that "
        "pass's encoder, concatenated; decoder tuned with a validation split, early stopping "
        "and noise augmentation; compared with the mean, class-mean and nearest auxiliary image",
    },
    "unsplit": {
        "who": "an honest-but-curious server with no auxiliary data (UnSplit, Erdogan et al. 2022)",
        "knows": "the client segment's architecture only: no weights, no data",
        "sees": "the averaged releases of 64 test images; it fits inputs and surrogate weights "
        "together, with a smoothness prior; compared with a mid-grey image",
    },
    "label_leakage": {
        "who": "a feature party in the vertical topology (it holds no labels)",
        "knows": "its own features and segment, and that labels are binary",
        "sees": "the cut gradient of every training batch it took part in, over every epoch "
        "(after the label holder's protection); eight attacks, the strongest reported: each "
        "example's scores averaged over the epochs (norm rank, sign-aligned cosine to each "
        "epoch's top singular vector, its absolute value, the rank of the component along it, "
        "the energy off it, that beside the signed component, the absolute cosine to each "
        "batch's own top singular vector), and each example's gradients averaged over the run "
        "before scoring (the protection's fresh noise averages away), projected on the top "
        "singular vector of those means; at evaluation it receives nothing (no output, no score)",
    },
    "label_clustering": {
        "who": "an honest-but-curious u-shaped server (the client keeps labels and head)",
        "knows": "the number of classes, and a few labels to name its clusters",
        "sees": "the gradient of its output for every training example, every epoch (after "
        "the client's label protection); k-means per epoch, clusters matched to labels at best; "
        "for binary labels also the feature party's eight attacks over the whole run",
    },
    "fsha": {
        "who": "a malicious server running the feature-space hijacking attack (FSHA)",
        "knows": "the client segment's architecture and public data of the same kind",
        "sees": "the client's activations every step, and it chooses the gradients it returns: "
        "a WGAN-GP critic's, pulling them into its pilot encoder's space, for 2000 client "
        "steps; then it decodes them with the pilot's decoder; compared with the nearest "
        "public row",
    },
    "model_completion": {
        "who": "a feature party in the vertical topology (Fu et al. 2022)",
        "knows": "its own trained segment and features, and the labels of a few rows (40)",
        "sees": "nothing more: it fits a small head on its own representations",
    },
    "representation": {
        "who": "an honest-but-curious u-shaped server (the client keeps labels and head)",
        "knows": "the number of classes; for model completion the labels of a few rows (40)",
        "sees": "its own segment's output for every training row in the last epoch (what it "
        "computes from the client's release and sends to the client's head): label protection "
        "acts on the gradients it gets back and never touches these; the top singular vector "
        "of the centred outputs (binary, no label), k-means, and a head fitted on 40 labels",
    },
    "canary": {
        "who": "an adversary that inserts a canary record (a mislabelled outlier)",
        "knows": "the architecture, the initial weights and every other training record",
        "sees": "the trained split model; it guesses from the canary's loss whether the canary "
        "was trained on",
    },
    "activation_epsilon": {
        "who": "any party that receives the client's activations (server, relay)",
        "knows": "every other record and the client segment's weights at each release",
        "sees": "each record's noised releases, counted on the wire; the figure treats the "
        "encoder as fixed: it trains on the same records without DP, and no figure bounds "
        "that channel",
    },
    "dpsgd_epsilon": {
        "who": "a party that sees the client segment's weights alone (Opacus' figure)",
        "knows": "every other record and the initial weights, not which steps a row was in",
        "sees": "the weights after every step; not the activations, which DP-SGD does not "
        "noise, and not against the server, which links a row's releases by their "
        "activations and voids the sampling amplification (python -m workers.tools.audit_link "
        "reports the epsilon without it)",
    },
    "dcor": {
        "who": "no attacker: a statistic of dependence",
        "knows": "-",
        "sees": "one defended release of each test row",
    },
}

__all__ = ["THREAT_MODELS"]
