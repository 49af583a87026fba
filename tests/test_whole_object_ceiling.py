"""scripts/whole_object_ceiling.py: the best AMI of K components that keep objects whole."""

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_mutual_info_score

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "whole_object_ceiling.py"
spec = importlib.util.spec_from_file_location("whole_object_ceiling", SCRIPT)
whole_object_ceiling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(whole_object_ceiling)


def test_set_partitions_counts_are_stirling_numbers():
    # S(5,1) + S(5,2) + S(5,3) = 1 + 15 + 25; S(4,1..4) sum to the Bell number 15
    assert len(list(whole_object_ceiling.set_partitions([1, 2, 3, 4, 5], 3))) == 41
    assert len(list(whole_object_ceiling.set_partitions([1, 2, 3, 4], 4))) == 15
    for partition in whole_object_ceiling.set_partitions([1, 2, 3, 4, 5], 3):
        assert sorted(itertools.chain(*partition)) == [1, 2, 3, 4, 5] and len(partition) <= 3


def _brute_force(row, k):
    """Best scikit-learn AMI over every labelling of the frame's objects with k labels."""
    scored = row[row != 0]
    objects = np.unique(scored)
    best = -np.inf
    for labels in itertools.product(range(k), repeat=len(objects)):
        predicted = np.array(labels)[np.searchsorted(objects, scored)]
        best = max(best, adjusted_mutual_info_score(scored, predicted, average_method="max"))
    return best


def test_ceiling_matches_brute_force_with_scikit_learn():
    rng = np.random.default_rng(0)
    sizes = np.array([0, 30, 12, 7, 3, 20])  # background, then five objects of unequal size
    frames = np.stack([rng.permutation(np.repeat(np.arange(6), sizes)) for _ in range(4)])  # (4, 72)
    frames[3][frames[3] == 2] = 0  # a frame where object 2 is hidden
    for k in (2, 3):
        ceiling, objects = whole_object_ceiling.whole_object_ceiling(frames, k)
        np.testing.assert_allclose(ceiling, [_brute_force(row, k) for row in frames], atol=1e-10)
        np.testing.assert_array_equal(objects, [5, 5, 5, 4])
        assert np.all(ceiling < 1.0)
    ceiling, _ = whole_object_ceiling.whole_object_ceiling(frames, 5)
    np.testing.assert_allclose(ceiling, 1.0)  # as many components as objects: no merge needed


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="integer array of shape"):
        whole_object_ceiling.whole_object_ceiling(np.zeros((2, 3, 4), np.int32), 3)
    with pytest.raises(ValueError, match="k must be at least 1"):
        whole_object_ceiling.whole_object_ceiling(np.ones((2, 3), np.int32), 0)


@pytest.mark.parametrize("flag, value", [("--k", "0"), ("--sequences", "0")])
def test_command_line_refuses_counts_below_one(flag, value, capsys):
    arguments = ["data/any.h5", "--k", "3", "--sequences", "5"]
    arguments[arguments.index(flag) + 1] = value
    with pytest.raises(SystemExit):
        whole_object_ceiling.main(arguments)
    assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err
