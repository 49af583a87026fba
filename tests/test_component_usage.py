"""scripts/component_usage.py: how many components hold object pixels, on hand-made and saved models."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "component_usage.py"
spec = importlib.util.spec_from_file_location("component_usage", SCRIPT)
component_usage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(component_usage)


def _frames():
    """Two sequences of one step, 1×5 frames, K = 3 (winners below), object ids in ``groups``."""
    winners = np.array([[0, 0, 1, 2, 2],   # object pixels 0-3: component 0 holds 2, 1 holds 1, 2 holds 1
                        [1, 1, 1, 1, 0]])  # object pixels 0-3 all to component 1; pixel 4 is background
    gamma = np.eye(3)[winners].transpose(0, 2, 1).reshape(2, 1, 3, 1, 5, 1)  # (B, S, K, H, W, 1)
    groups = np.array([[1, 1, 2, 2, 0], [1, 2, 2, 3, 0]]).reshape(2, 1, 1, 5, 1)  # (B, S, H, W, 1)
    return gamma, groups


def test_shares_count_the_object_pixels_each_component_wins():
    gamma, groups = _frames()
    shares = component_usage.component_shares(gamma, groups, 0)
    np.testing.assert_allclose(shares, [[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]])  # background pixel 4 ignored


def test_usage_counts_sequences_by_components_used():
    gamma, groups = _frames()
    fractions, mean_sorted = component_usage.usage(component_usage.component_shares(gamma, groups, 0))
    np.testing.assert_allclose(fractions, [0.5, 0.0, 0.5])  # one sequence uses 3, the other 1
    np.testing.assert_allclose(mean_sorted, [0.75, 0.125, 0.125])
    fractions, _ = component_usage.usage(np.array([[0.5, 0.25, 0.25]]), min_share=0.3)
    np.testing.assert_allclose(fractions, [1.0, 0.0, 0.0])


def test_table_has_a_row_per_step():
    gamma, groups = _frames()
    table = component_usage.usage_table(gamma, groups, [1]).splitlines()
    assert table[0] == "| step | 1 component | 2 | 3 | mean shares, largest first |"
    assert table[2] == "| 1 | 50% | 0% | 50% | 0.75 / 0.12 / 0.12 |"


def test_main_prints_a_table_for_each_k(flying, capsys):
    component_usage.main([str(flying.model), str(flying.data), "--k", "3", "2", "--steps", "1", "3",
                          "--sequences", "6"])
    out = capsys.readouterr().out
    assert "with K=3: first 6 test sequences" in out and "with K=2: first 6 test sequences" in out
    rows = [line for line in out.splitlines() if line.startswith("| 1 |") or line.startswith("| 3 |")]
    assert len(rows) == 4
    for row in rows:  # the shares of sequences using 1..K components add up to 100%
        percentages = [float(cell.strip().rstrip("%")) for cell in row.split("|")[2:-2]]
        assert sum(percentages) == pytest.approx(100, abs=1.5)


def test_main_rejects_steps_beyond_the_sequence(flying, capsys):
    with pytest.raises(SystemExit):
        component_usage.main([str(flying.model), str(flying.data), "--steps", "9", "--sequences", "6"])
    assert "--steps must lie in 1..3" in capsys.readouterr().err  # 4 frames: 3 next-step predictions
