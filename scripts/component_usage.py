"""How many of a trained model's K components hold object pixels, step by step?

Written to study the flying-shapes runs (RESULTS.md), where the EM iterations empty components
over the sequence: with spare components this sheds them, with too few it merges objects. For
the first ``--sequences`` test sequences and each chosen step it gives every component its share
of the scored (object) pixels, the pixels where it has the largest γ, and prints a Markdown table:

* ``u components``: the share of sequences in which exactly u components hold at least
  ``--min-share`` of the object pixels;
* ``mean shares, largest first``: the components' shares sorted in each sequence, then averaged.

The same weights can be run with other numbers of components (``--k 5 3``): the model is loaded
once and copied with ``NeuralEM.with_settings(k=…)`` for each K other than its own.

Usage:
    python scripts/component_usage.py CHECKPOINT.keras [DATA.h5] [--k 5 3] [--steps 1 5 20]
"""

import argparse

import keras
import numpy as np

from neural_em import evaluate
from neural_em.data.pipeline import dataset_info


def component_shares(gamma, groups, step):
    """Each component's share of the object pixels at one step.

    Args:
        gamma: (B, S, K, H, W, 1) responsibilities.
        groups: (B, S, H, W, 1) true object ids, 0 for background (not scored).
        step: 0-based step index.
    Returns:
        (B, K) shares; each row sums to 1 (0 where a frame has no object pixels).
    """
    winner = gamma[:, step].argmax(axis=1)[..., 0]  # (B, H, W)
    scored = groups[:, step, ..., 0] != 0  # (B, H, W)
    counts = np.stack([((winner == k) & scored).sum(axis=(1, 2)) for k in range(gamma.shape[2])], axis=1)  # (B, K)
    return counts / np.maximum(scored.sum(axis=(1, 2)), 1)[:, None]


def usage(shares, min_share=0.02):
    """Summarises shares over sequences.

    Args:
        shares: (B, K) from ``component_shares``.
        min_share: a component counts as used when it holds at least this share.
    Returns:
        (fractions, mean_sorted): (K,) share of sequences using exactly 1..K components, and
        (K,) the mean of each sequence's shares sorted largest first.
    """
    used = (shares >= min_share).sum(axis=1)  # (B,)
    fractions = np.array([np.mean(used == u) for u in range(1, shares.shape[1] + 1)])
    return fractions, np.sort(shares, axis=1)[:, ::-1].mean(axis=0)


def usage_table(gamma, groups, steps, min_share=0.02):
    """The Markdown table ``main`` prints: one row per 1-based step in ``steps``."""
    k = gamma.shape[2]
    lines = ["| step | 1 component | " + " | ".join(str(u) for u in range(2, k + 1)) + " | mean shares, largest first |",
             "| ---: " * (k + 1) + "| --- |"]
    for step in steps:
        fractions, mean_sorted = usage(component_shares(gamma, groups, step - 1), min_share)
        lines.append(f"| {step} | " + " | ".join(f"{f:.0%}" for f in fractions) + " | "
                     + " / ".join(f"{s:.2f}" for s in mean_sorted) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a saved .keras model (e.g. a run's last.keras)")
    parser.add_argument("data", nargs="?", default="data/flying_shapes_3.h5", help="data set file")
    parser.add_argument("--k", type=int, nargs="+", help="numbers of components to run (default: the model's)")
    parser.add_argument("--steps", type=int, nargs="+", help="1-based steps to report (default: 1, 5 and the last)")
    parser.add_argument("--sequences", type=int, default=100, help="first test sequences to look at")
    parser.add_argument("--min-share", type=float, default=0.02, help="share of the object pixels that counts as used")
    parser.add_argument("--noise-type", default="bitflip", help="input noise, as in training")
    parser.add_argument("--noise-prob", type=float, default=0.2, help="input noise probability, as in training")
    args = parser.parse_args(argv)
    if any(k < 1 for k in args.k or []):
        parser.error(f"--k must be positive, got {args.k}")

    trained = keras.saving.load_model(args.checkpoint, compile=False)
    last = trained.steps_for(dataset_info(args.data, "test").frames)
    steps = args.steps or sorted({1, min(5, last), last})
    if not all(1 <= step <= last for step in steps):  # checked before any (minutes-long) evaluation
        parser.error(f"--steps must lie in 1..{last} for {args.data}, got {steps}")
    for k in args.k or [trained.k]:
        model = trained if k == trained.k else trained.with_settings(k=k)
        example = evaluate.evaluate_model(model, args.data, "test", max_sequences=args.sequences,
                                          noise_type=args.noise_type, noise_prob=args.noise_prob,
                                          progress=False).example
        gamma, groups = example["gamma"], example["groups"]  # (B, S, K, H, W, 1), (B, S, H, W, 1)
        print(f"\n{args.checkpoint} with K={k}: first {gamma.shape[0]} test sequences of {args.data}, "
              f"sequences using u components (at least {args.min_share:g} of the object pixels)\n")
        print(usage_table(gamma, groups, steps, args.min_share))


if __name__ == "__main__":
    main()
