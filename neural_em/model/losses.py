"""The training loss of Neural EM (Eq. 5) and the next-step upper bound.

L = Σ_i Σ_k [ γ_ik · (−log P(x_i | ψ_ik)) + w · (1 − γ_ik) · KL(P(x_i) ‖ P(x_i | ψ_ik)) ]

summed over pixels and components and averaged over the batch, for each EM
step; the steps are combined with the loss step weights. All functions work on
any backend through ``keras.ops``.
"""

import numpy as np
from keras import ops

CLIP = 1e-6
PRIORS = {"bernoulli": 0.0, "gaussian": (0.0, 1.0)}  # P(x_i): Bernoulli(p), N(μ, σ)


def _clip(p):
    return ops.clip(p, CLIP, 1.0 - CLIP)


def intra_cluster_loss(psi, target, distribution):
    """−log P(x | ψ) per pixel value: binary cross-entropy, or squared error / 2 (σ = 1).

    Args:
        psi: (..., K, H, W, C) predictions.
        target: (..., 1, H, W, C) clean images.
    Returns:
        (..., K, H, W, C).
    """
    if distribution == "bernoulli":
        psi = _clip(psi)
        return -(target * ops.log(psi) + (1.0 - target) * ops.log(1.0 - psi))
    return ops.square(psi - target) / 2.0


def inter_cluster_loss(psi, distribution):
    """KL(P(x) ‖ P(x | ψ)) per pixel value, to the pixel prior.

    Bernoulli: prior p = 0 (clipped to 1e-6). Gaussian: prior N(0, 1) against
    N(ψ, 1), as the published code computes it: log(σ₂/σ₁) + (σ₁² + (ψ − μ₂)²) / 2σ₂² − ½.
    """
    if distribution == "bernoulli":
        prior = _clip(ops.convert_to_tensor(PRIORS["bernoulli"], dtype=psi.dtype))
        psi = _clip(psi)
        return prior * ops.log(prior / psi) + (1.0 - prior) * ops.log((1.0 - prior) / (1.0 - psi))
    prior_mean, prior_std = PRIORS["gaussian"]
    return np.log(prior_std) + (1.0 + ops.square(psi - prior_mean)) / (2.0 * prior_std**2) - 0.5


def em_loss(psi, gamma, target, distribution="bernoulli", inter_weight=1.0, gradient_gamma=True):
    """Eq. 5 for one EM step.

    Args:
        psi: (B, K, H, W, C) predictions.
        gamma: (B, K, H, W, 1) posteriors.
        target: (B, 1, H, W, C) clean images (the next frame for sequences).
        distribution: "bernoulli" or "gaussian".
        inter_weight: w, the weight of the inter-cluster term.
        gradient_gamma: if False, no gradient flows through γ.
    Returns:
        (total, intra, inter), each a scalar averaged over the batch.
    """
    if not gradient_gamma:
        gamma = ops.stop_gradient(gamma)
    batch = ops.cast(ops.shape(psi)[0], psi.dtype)
    intra = ops.sum(intra_cluster_loss(psi, target, distribution) * gamma) / batch
    inter = ops.sum(inter_cluster_loss(psi, distribution) * (1.0 - gamma)) / batch
    return intra + inter_weight * inter, intra, inter


def upper_bound_loss(psi, target, distribution="bernoulli"):
    """Next-step loss of max_k ψ: uses no E-step information from the frame it predicts.

    Args:
        psi: (B, K, H, W, C) predictions; target: (B, 1, H, W, C).
    Returns:
        Scalar, summed over pixels and averaged over the batch.
    """
    best = ops.max(psi, axis=1, keepdims=True)  # (B, 1, H, W, C)
    batch = ops.cast(ops.shape(psi)[0], psi.dtype)
    return ops.sum(intra_cluster_loss(best, target, distribution)) / batch


def loss_step_weights(spec, nr_steps):
    """Weights of the EM steps in the loss.

    Args:
        spec: "last" (static images), "all" (sequences) or a list of nr_steps numbers.
        nr_steps: number of EM steps.
    Returns:
        A float32 numpy array of shape (nr_steps,).
    """
    if isinstance(spec, str):
        if spec == "last":
            weights = np.zeros(nr_steps, np.float32)
            weights[-1] = 1.0
            return weights
        if spec == "all":
            return np.ones(nr_steps, np.float32)
        raise ValueError(f"loss_step_weights must be 'last', 'all' or a list of {nr_steps} numbers, got {spec!r}.")
    weights = np.asarray(spec, np.float32)
    if weights.shape != (nr_steps,) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(
            f"loss_step_weights {list(spec)!r} must be {nr_steps} non-negative numbers (one per EM step) "
            "with a positive sum."
        )
    return weights
