"""How high can the AMI of K components go when there are more objects than components?

With K < the number of objects, some objects must share a component. This script finds, for
every frame, the best AMI (the paper's score: max-normalised, background and overlap left out)
of a grouping that keeps every object whole and puts the objects into at most K groups: it
tries every such partition of the frame's objects (41 for 5 objects and K = 3) and keeps the
best. A model that splits objects could in principle score otherwise, but a model that only
merges cannot score above it, so it tells how much of a gap to the paper is the K = 3 limit
itself rather than training. Frames score as ``evaluate`` scores them: step t against the
groups of frame t + 1.

Usage:
    python scripts/whole_object_ceiling.py data/flying_shapes_5.h5 --k 3 [--sequences 1000]
"""

import argparse

import numpy as np

from neural_em import metrics
from neural_em.data import store


def set_partitions(items, max_blocks):
    """Every partition of `items` into at most `max_blocks` non-empty blocks, as lists of lists."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest, max_blocks):
        for i in range(len(partition)):  # put `first` into an existing block
            yield partition[:i] + [[first] + partition[i]] + partition[i + 1:]
        if len(partition) < max_blocks:  # or into a block of its own
            yield [[first]] + partition


def whole_object_ceiling(groups, k, *, average_method="max"):
    """Best AMI of each frame over the groupings that keep objects whole in at most k groups.

    Args:
        groups: int (N, P) ground-truth group of each pixel; 0 (background, overlap) is not scored.
        k: the number of components.
        average_method: AMI normaliser, as in ``metrics.adjusted_mutual_info``.
    Returns:
        float64 (N,) the best AMI per frame, and int (N,) the number of objects per frame.
    """
    groups = np.asarray(groups)
    if groups.ndim != 2 or not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(f"groups must be an integer array of shape (N, P), got {groups.dtype} {groups.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    mask = groups != 0  # (N, P)
    object_ids = np.unique(groups[mask])
    best = np.full(len(groups), -np.inf)
    for partition in set_partitions(list(object_ids), k):
        component_of = np.zeros(groups.max(initial=0) + 1, np.int64)  # object id -> component
        for component, block in enumerate(partition):
            component_of[block] = component
        ami = metrics.adjusted_mutual_info(groups, component_of[groups], mask, average_method)  # (N,)
        best = np.maximum(best, ami)
    objects = np.array([len(np.unique(row[row != 0])) for row in groups])  # (N,)
    return best, objects


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="an .h5 data set written by `python -m neural_em.data generate`")
    parser.add_argument("--k", type=int, required=True, help="number of components")
    parser.add_argument("--split", default="test")
    parser.add_argument("--sequences", type=int, default=1000, help="first N sequences of the split")
    args = parser.parse_args(argv)
    for name in ("k", "sequences"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")

    with store.open_dataset(args.data) as dataset:
        split = dataset.split(args.split)
        groups = split.groups(slice(0, args.sequences))  # (N, T, H, W, 1)
    if groups.shape[1] < 2:
        raise SystemExit(f"{args.data}: expected sequences of at least 2 frames, got {groups.shape[1]}")
    scored = groups[:, 1:]  # (N, S, H, W, 1): step t is scored against frame t + 1
    num, steps = scored.shape[:2]
    ceiling, objects = whole_object_ceiling(scored.reshape(num * steps, -1), args.k)
    ceiling, objects = ceiling.reshape(num, steps), objects.reshape(num, steps)  # (N, S)
    print(f"{args.data} ({args.split}, first {num} sequences, {steps} steps), K={args.k}: "
          "best AMI of a grouping that keeps objects whole")
    print(f"mean over the steps      {ceiling.mean():.4f} ± {ceiling.mean(axis=1).std():.4f} (std over sequences)")
    print(f"last step                {ceiling[:, -1].mean():.4f} ± {ceiling[:, -1].std():.4f}")
    for count in np.unique(objects):
        selected = objects == count
        print(f"frames with {count} visible objects: {selected.mean():6.1%}, mean {ceiling[selected].mean():.4f}")


if __name__ == "__main__":
    main()
