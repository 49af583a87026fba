"""Tests for neural_em.plots: files are written, readable, and show the data they were given."""

import numpy as np
import pytest
from PIL import Image

from neural_em import plots

BATCH, STEPS, COMPONENTS, SIZE = 2, 4, 3, 12


def _empty_sample():
    """All-zero features, noisy, psi and a uniform gamma, shaped as docs/DESIGN.md says."""
    features = np.zeros((BATCH, STEPS, SIZE, SIZE, 1), np.float32)
    psi = np.zeros((BATCH, STEPS, COMPONENTS, SIZE, SIZE, 1), np.float32)
    gamma = np.full((BATCH, STEPS, COMPONENTS, SIZE, SIZE, 1), 1 / COMPONENTS, np.float32)
    return features, features.copy(), psi, gamma


def _load(path, image_format):
    """Open a written image, check its format and return it as an RGB array (H, W, 3)."""
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == image_format
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def _changed_columns(before, after):
    """Horizontal extent (as fractions of the width) of the pixels that differ."""
    assert before.shape == after.shape
    changed = np.flatnonzero(np.any(before != after, axis=(0, 2)))
    assert changed.size > 0, "the images are identical"
    width = before.shape[1]
    return changed.min() / width, changed.max() / width


# --------------------------------------------------------------------------- colours


def test_one_hot_gamma_gives_exactly_the_palette_colours():
    gamma = np.zeros((COMPONENTS, COMPONENTS, 2, 1))  # (K, H, W, 1)
    for k in range(COMPONENTS):
        gamma[k, k, :] = 1.0  # component k owns image row k
    colours = plots.color_gamma(gamma)
    palette = plots.component_palette(COMPONENTS)
    assert colours.shape == (COMPONENTS, 2, 3) and colours.dtype == np.uint8
    for k in range(COMPONENTS):
        np.testing.assert_array_equal(colours[k], np.stack([palette[k]] * 2))


@pytest.mark.parametrize("components", [2, 3, 4])
def test_uniform_gamma_gives_the_mean_colour(components):
    gamma = np.full((5, components, 3, 3, 1), 1 / components)  # leading batch axis kept
    colours = plots.color_gamma(gamma)
    expected = np.rint(plots.component_palette(components).mean(axis=0))
    assert colours.shape == (5, 3, 3, 3)
    np.testing.assert_array_equal(colours, np.broadcast_to(expected, colours.shape))


def test_palette_colours_are_distinct():
    for components in (1, 5, 10, 11, 16):
        palette = plots.component_palette(components)
        assert palette.shape == (components, 3) and palette.dtype == np.uint8
        assert len(np.unique(palette, axis=0)) == components


def test_color_gamma_rejects_a_gamma_without_trailing_channel():
    with pytest.raises(ValueError, match=r"gamma .*\(\.\.\., K, H, W, 1\).*\(3, 4, 4\)"):
        plots.color_gamma(np.ones((3, 4, 4)))


# --------------------------------------------------------------------------- overview figure


def test_overview_figure_shows_the_input(tmp_path):
    features, noisy, psi, gamma = _empty_sample()
    empty = _load(plots.overview_figure(features, noisy, psi, gamma, tmp_path / "empty.png"), "PNG")
    features[0, :, 3:8, 3:8] = 1.0  # a bright square in the clean input of sample 0
    square_path = plots.overview_figure(features, noisy, psi, gamma, tmp_path / "square.png")
    square = _load(square_path, "PNG")
    left, right = _changed_columns(empty, square)
    columns = 2 + COMPONENTS + 1  # input, noisy, psi_k, gamma
    assert right < 1.2 / columns, "only the input column should change"


def test_overview_figure_shows_each_components_prediction_in_its_own_column(tmp_path):
    features, noisy, psi, gamma = _empty_sample()
    empty = _load(plots.overview_figure(features, noisy, psi, gamma, tmp_path / "empty.png"), "PNG")
    psi[1, :, -1, 3:8, 3:8] = 1.0  # the last component predicts a square in sample 1
    square = _load(
        plots.overview_figure(features, noisy, psi, gamma, tmp_path / "square.png", sample=1), "PNG"
    )
    left, right = _changed_columns(empty, square)
    columns = 2 + COMPONENTS + 1
    assert (columns - 2.2) / columns < left and right < (columns - 0.9) / columns


def test_overview_figure_rows_follow_the_selected_steps(tmp_path):
    features, noisy, psi, gamma = _empty_sample()
    all_rows_path = plots.overview_figure(features, noisy, psi, gamma, tmp_path / "all.png")
    all_rows = _load(all_rows_path, "PNG")
    two_rows = _load(
        plots.overview_figure(features, noisy, psi, gamma, tmp_path / "two.png", steps=[0, -1]),
        "PNG",
    )
    assert two_rows.shape[0] < all_rows.shape[0]
    without_noisy_path = plots.overview_figure(features, None, psi, gamma, tmp_path / "n.png")
    without_noisy = _load(without_noisy_path, "PNG")
    assert without_noisy.shape[1] < all_rows.shape[1]


def test_overview_figure_creates_parent_folders(tmp_path):
    path = tmp_path / "nested" / "deeper" / "overview.png"
    assert plots.overview_figure(*_empty_sample(), path, steps=[1]) == path
    _load(path, "PNG")


@pytest.mark.parametrize(
    "argument, bad_shape, message",
    [
        ("features", (BATCH, SIZE, SIZE, 1), r"features must have 5 dimensions"),
        ("noisy", (BATCH, STEPS, SIZE, SIZE + 1, 1), r"noisy must have the shape of features"),
        ("psi", (BATCH, STEPS, COMPONENTS, SIZE, SIZE, 3), r"psi must have shape \(B, T, K, H, W"),
        ("gamma", (BATCH, STEPS, COMPONENTS + 1, SIZE, SIZE, 1), r"gamma must have shape"),
    ],
)
def test_overview_figure_rejects_mismatched_shapes(tmp_path, argument, bad_shape, message):
    arrays = dict(zip(["features", "noisy", "psi", "gamma"], _empty_sample()))
    arrays[argument] = np.zeros(bad_shape, np.float32)
    with pytest.raises(ValueError, match=message):
        plots.overview_figure(**arrays, path=tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_overview_figure_rejects_bad_steps_and_sample(tmp_path):
    with pytest.raises(ValueError, match=r"steps \[4\] are out of range for T=4"):
        plots.overview_figure(*_empty_sample(), tmp_path / "x.png", steps=[0, 4])
    with pytest.raises(ValueError, match=r"sample=2 is out of range for a batch of 2"):
        plots.overview_figure(*_empty_sample(), tmp_path / "x.png", sample=2)


# --------------------------------------------------------------------------- GIF


def test_overview_gif_has_one_upscaled_frame_per_step_showing_the_input(tmp_path):
    features, _, psi, gamma = _empty_sample()
    features[0, 2, 4:8, 4:8] = 1.0  # a bright square at step 2 only
    path = plots.overview_gif(features, psi, gamma, tmp_path / "gif" / "overview.gif", fps=5)
    _load(path, "GIF")
    with Image.open(path) as gif:
        assert gif.n_frames == STEPS
        panels = 2 + COMPONENTS  # input, gamma, psi_k
        assert gif.width == panels * (SIZE + 2) * plots.GIF_UPSCALE
        assert gif.info["duration"] == 200
        input_panel_means = []
        for step in range(STEPS):
            gif.seek(step)
            frame = np.asarray(gif.convert("RGB"), dtype=np.float64)
            panel = frame[-(SIZE + 2) * plots.GIF_UPSCALE :, : (SIZE + 2) * plots.GIF_UPSCALE]
            input_panel_means.append(panel.mean())
    brightest = int(np.argmax(input_panel_means))
    assert brightest == 2 and input_panel_means[2] > input_panel_means[0] + 20


def test_overview_gif_rejects_bad_arguments(tmp_path):
    features, _, psi, gamma = _empty_sample()
    with pytest.raises(ValueError, match="fps must be positive"):
        plots.overview_gif(features, psi, gamma, tmp_path / "x.gif", fps=0)
    with pytest.raises(ValueError, match=r"gamma must have 6 dimensions"):
        plots.overview_gif(features, psi, gamma[..., 0], tmp_path / "x.gif")


# --------------------------------------------------------------------------- curves and figures


def test_learning_curves_put_losses_and_scores_on_separate_panels(tmp_path):
    losses = {"train_loss": [(0, 3.0), (1, 2.0), (2, 1.5)], "val_loss": [(0, 3.2), (1, 2.4)]}
    scores = {"val_ami": [(0, 0.2), (1, 0.5)], "val_ari": [(1, 0.4), (0, 0.1)]}
    one_panel = _load(plots.learning_curves(losses, tmp_path / "losses.png"), "PNG")
    two_panels = _load(plots.learning_curves({**losses, **scores}, tmp_path / "both.png"), "PNG")
    assert two_panels.shape[1] > 1.5 * one_panel.shape[1]


@pytest.mark.parametrize("first, last", [(5, 8), (1, 20)])  # a short run's epochs; the steps of a sequence
def test_epochs_and_steps_get_whole_number_ticks(first, last):
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    steps = np.arange(first, last + 1)
    plots._draw_curves(ax, {"val_ami": np.stack([steps, np.linspace(0.5, 0.6, len(steps))], axis=1)})
    ticks = [tick for tick in ax.get_xticks() if first <= tick <= last]
    assert len(ticks) >= 2
    assert all(float(tick).is_integer() for tick in ticks), ticks


def test_learning_curves_reject_malformed_metrics(tmp_path):
    with pytest.raises(ValueError, match=r"metrics\['val_loss'\] must be a list of \(step, val"):
        plots.learning_curves({"val_loss": [1.0, 2.0]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="non-empty dict"):
        plots.learning_curves({}, tmp_path / "x.png")


def test_ami_per_step_draws_series_and_the_trained_steps_line(tmp_path):
    rng = np.random.default_rng(0)
    ami = np.clip(np.linspace(0.3, 0.9, 12) + 0.1 * rng.standard_normal((40, 12)), 0, 1)
    plain = _load(plots.ami_per_step(ami, tmp_path / "plain.png"), "PNG")
    marked = _load(plots.ami_per_step(ami, tmp_path / "marked.png", trained_steps=6), "PNG")
    assert np.any(plain != marked)
    two_series = {"direct": ami, "stage-wise": ami[:, :8]}
    _load(plots.ami_per_step(two_series, tmp_path / "two.png"), "PNG")


@pytest.mark.parametrize(
    "ami, label, message",
    [
        (np.zeros(5), None, r"ami must have shape \(N, T\).*\(5,\)"),
        ({"a": np.zeros((2, 3)), "b": np.zeros((3,))}, None, r"ami\['b'\] must have shape"),
        ({"a": np.zeros((2, 3))}, "a", "label applies to a single array"),
    ],
)
def test_ami_per_step_rejects_bad_input(tmp_path, ami, label, message):
    with pytest.raises(ValueError, match=message):
        plots.ami_per_step(ami, tmp_path / "x.png", label=label)


def test_next_step_bce_writes_one_line_per_k(tmp_path):
    results = {1: {3: 20.0, 4: 27.0, 5: 33.0}, 5: {3: 15.0, 4: 19.0, 5: 22.0}}
    one_k = _load(plots.next_step_bce({1: results[1]}, tmp_path / "one.png"), "PNG")
    two_k = _load(plots.next_step_bce(results, tmp_path / "two.png"), "PNG")
    orange = np.array(plots.component_palette(2)[1], dtype=np.int16)  # the second line's colour
    assert not np.any(np.all(one_k == orange, axis=-1))
    assert np.any(np.all(two_k == orange, axis=-1))
    with pytest.raises(ValueError, match=r"results\[5\] must be a non-empty dict"):
        plots.next_step_bce({1: results[1], 5: {}}, tmp_path / "x.png")


def test_next_step_bce_draws_the_per_step_panel_beside_it(tmp_path):
    results = {1: {3: 20.0}, 3: {3: 15.0}}
    alone = _load(plots.next_step_bce(results, tmp_path / "alone.png"), "PNG")
    per_step = {"K = 1": np.linspace(30.0, 20.0, 20), "K = 3": np.linspace(30.0, 12.0, 20)}
    both = _load(plots.next_step_bce(results, tmp_path / "both.png", per_step=per_step), "PNG")
    assert both.shape[0] == alone.shape[0] and both.shape[1] > 1.5 * alone.shape[1]  # a second panel
    with pytest.raises(ValueError, match=r"per_step\['K = 3'\] must be a non-empty \(T,\) array"):
        plots.next_step_bce(results, tmp_path / "x.png", per_step={"K = 3": np.zeros((2, 3))})
