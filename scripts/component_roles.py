"""What do a trained sequence model's K components model: one object each, or the whole scene?

Written to study the flying-MNIST stage-1 runs (RESULTS.md), where the validation AMI fell while
the loss kept falling. For the first ``--sequences`` test sequences it prints, per EM step:

* ``AMI``: the paper's score (scored pixels, argmax γ against the true digits);
* ``AMI bright/faint``: the same argmax γ against a split of each frame's scored pixels at
  their median grey value, high when the components divide the ink by intensity rather
  than by digit;
* ``ψ specialisation``: for each component the share of its prediction (ψ clipped at 0) that
  lies on digit 1 rather than digit 2, and the absolute difference of that share between the
  two components, averaged over sequences: 1 when each component predicts one digit only,
  0 when both predict both digits alike (K = 2, two objects);
* ``ψ off the ink``: the sum of ψ over pixels darker than 0.05, per component.

Usage:
    python scripts/component_roles.py CHECKPOINT.keras [DATA.h5] [--sequences 100]
"""

import argparse

import keras
import numpy as np

from neural_em import evaluate, metrics

DARK = 0.05  # grey value below which a pixel counts as background for "ψ off the ink"


def component_roles(gamma, psi, targets, groups, steps):
    """Per-step statistics of what each component models.

    Args:
        gamma: (B, S, K, H, W, 1); psi: (B, S, K, H, W, 1); targets, groups: (B, S, H, W, 1).
        steps: 0-based step indices to report.
    Returns:
        list of dicts, one per step, with 'step' (1-based), 'ami', 'ami_intensity',
        'specialisation' and 'off_ink' (K,).
    """
    batch = gamma.shape[0]
    assignment = gamma.argmax(axis=2).reshape(batch, gamma.shape[1], -1).astype(np.int64)  # (B, S, H·W)
    rows = []
    for step in steps:
        image = targets[:, step, ..., 0].reshape(batch, -1)  # (B, H·W)
        truth = groups[:, step, ..., 0].reshape(batch, -1).astype(np.int64)  # (B, H·W)
        scored = truth > 0  # (B, H·W)
        medians = np.array([np.median(row[mask]) if mask.any() else 0.0 for row, mask in zip(image, scored)])
        intensity = np.where(image >= medians[:, None], 2, 1)  # (B, H·W): bright half, median included
        prediction = np.clip(psi[:, step, ..., 0], 0.0, None).reshape(batch, psi.shape[2], -1)  # (B, K, H·W)
        on_first = (prediction * (truth == 1)[:, None]).sum(axis=2)  # (B, K)
        on_second = (prediction * (truth == 2)[:, None]).sum(axis=2)  # (B, K)
        share_first = on_first / np.maximum(on_first + on_second, 1e-6)  # (B, K)
        rows.append({
            "step": step + 1,
            "ami": metrics.adjusted_mutual_info(truth, assignment[:, step], scored).mean(),
            "ami_intensity": metrics.adjusted_mutual_info(intensity, assignment[:, step], scored).mean(),
            "specialisation": np.abs(share_first[:, 0] - share_first[:, 1]).mean(),
            "off_ink": (prediction * (image < DARK)[:, None]).sum(axis=2).mean(axis=0),  # (K,)
        })
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a last.keras of a K=2 sequence model")
    parser.add_argument("data", nargs="?", default="data/flying_mnist_20.h5", help="data set file (two objects)")
    parser.add_argument("--sequences", type=int, default=100, help="test sequences to look at")
    parser.add_argument("--noise-prob", type=float, default=0.2, help="masked-uniform noise, as in training")
    args = parser.parse_args(argv)

    model = keras.saving.load_model(args.checkpoint, compile=False)
    if model.k != 2:
        parser.error(f"{args.checkpoint} has K={model.k}; these statistics are for K=2 and two objects")
    evaluation = evaluate.evaluate_model(model, args.data, "test", batch_size=args.sequences,
                                         max_sequences=args.sequences, noise_type="masked_uniform",
                                         noise_prob=args.noise_prob, progress=False)
    example = evaluation.example
    steps = example["gamma"].shape[1]
    chosen = sorted({0, 4, 9, 14, steps - 1} & set(range(steps)))
    print(f"{args.checkpoint}: {args.sequences} test sequences of {args.data}, "
          f"AMI over the steps {evaluation.scores['ami_weighted'].mean():.3f}")
    print("step   AMI  AMI bright/faint  ψ specialisation  ψ off the ink (per component)")
    for row in component_roles(example["gamma"], example["psi"], example["targets"], example["groups"], chosen):
        print(f"{row['step']:4d}  {row['ami']:.3f}  {row['ami_intensity']:16.3f}  {row['specialisation']:16.3f}  "
              f"{np.array2string(row['off_ink'], precision=1)}")


if __name__ == "__main__":
    main()
