"""scripts/component_roles.py: the statistics that tell object-per-component from whole-scene hedging."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "component_roles.py"
spec = importlib.util.spec_from_file_location("component_roles", SCRIPT)
component_roles = importlib.util.module_from_spec(spec)
spec.loader.exec_module(component_roles)


def _scene():
    """One 1×4 frame: digit 1 on pixels 0-1 (grey 1.0, 0.4), digit 2 on pixel 2 (1.0), pixel 3 empty."""
    targets = np.array([1.0, 0.4, 1.0, 0.0]).reshape(1, 1, 1, 4, 1)  # (B, S, H, W, 1)
    groups = np.array([1, 1, 2, 0]).reshape(1, 1, 1, 4, 1)
    return targets, groups


def test_one_digit_per_component_is_fully_specialised():
    targets, groups = _scene()
    psi = np.array([[1.0, 0.4, 0.0, 0.0], [0.0, 0.0, 1.0, 0.3]]).reshape(1, 1, 2, 1, 4, 1)  # (B, S, K, H, W, 1)
    gamma = np.array([[1, 1, 0, 0.5], [0, 0, 1, 0.5]], float).reshape(1, 1, 2, 1, 4, 1)
    (row,) = component_roles.component_roles(gamma, psi, targets, groups, [0])
    assert row["step"] == 1
    assert row["ami"] == pytest.approx(1.0)
    assert row["specialisation"] == pytest.approx(1.0)
    np.testing.assert_allclose(row["off_ink"], [0.0, 0.3])  # only pixel 3 is darker than 0.05


def test_both_components_predicting_the_scene_split_by_intensity():
    targets, groups = _scene()
    scene = np.array([1.0, 0.4, 1.0, 0.0])
    psi = np.stack([scene, scene]).reshape(1, 1, 2, 1, 4, 1)
    # bright pixels (0, 2) to component 0, the faint one (1) to component 1
    gamma = np.array([[1, 0, 1, 0.5], [0, 1, 0, 0.5]], float).reshape(1, 1, 2, 1, 4, 1)
    (row,) = component_roles.component_roles(gamma, psi, targets, groups, [0])
    assert row["specialisation"] == pytest.approx(0.0)
    assert row["ami_intensity"] == pytest.approx(1.0)  # the split is the median split of the grey values
    assert row["ami"] < 0.5
