"""Figures and animations of Neural EM groupings: numpy arrays in, image files out.

- `overview_figure`: the layout of the paper's Figures 3, 4 and 7 for one sample
  (rows = EM steps; columns = input, noisy input, each component's prediction, gamma).
- `overview_gif`: the same sample animated over the steps.
- `learning_curves`: losses and scores over epochs.
- `ami_per_step`: Figure 6 (median AMI per step with the interquartile band).
- `next_step_bce`: Figure 5 (next-step BCE against the number of objects, one line per K).
- `color_gamma`: the soft assignments rendered as one colour per component.

Figures use matplotlib's object API (`Figure` + `FigureCanvasAgg`) rather than pyplot, so
importing or calling this module never touches pyplot's global backend or figure registry.
GIFs are assembled with Pillow directly. Shapes follow docs/DESIGN.md: features (B, T, H, W, C),
psi (B, T, K, H, W, C), gamma (B, T, K, H, W, 1), values in [0, 1].
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "ami_per_step",
    "color_gamma",
    "component_palette",
    "learning_curves",
    "next_step_bce",
    "overview_figure",
    "overview_gif",
]

MAX_OVERVIEW_ROWS = 10  # more rows than this make the panels too small to read
PANEL_INCHES = 1.1  # side of one image panel in the overview figure
DPI = 100
GIF_UPSCALE = 4  # 28x28 frames are too small to see at their native size
GIF_BACKGROUND = (255, 255, 255)
NEUTRAL_BORDER = (90, 90, 90)  # frames the panels that belong to no single component

SCORE_WORDS = {"ami", "ari", "confidence", "score"}
LOSS_WORDS = {"loss", "bce", "bound", "kl", "mse", "intra", "inter"}
FAMILY_ORDER = ("losses", "scores", "other")

PathArg = str | PathLike


# --------------------------------------------------------------------------- validation


def _as_array(name: str, value, layout: str) -> np.ndarray:
    """Convert `value` to a float array and check its number of dimensions.

    Args:
        name: argument name, used in the error message.
        value: array-like (numpy, TensorFlow or JAX arrays all work).
        layout: axis names, e.g. "BTHWC", one letter per expected dimension.

    Returns:
        The float32 array.
    """
    array = np.asarray(value, dtype=np.float32)
    if array.ndim != len(layout):
        expected = "(" + ", ".join(layout) + ")"
        raise ValueError(
            f"{name} must have {len(layout)} dimensions {expected}, got shape {array.shape}"
        )
    return array


def _check_overview_arrays(
    features: np.ndarray, noisy: np.ndarray | None, psi: np.ndarray, gamma: np.ndarray
) -> None:
    """Check that features, noisy, psi and gamma describe the same batch of sequences.

    Args:
        features: (B, T, H, W, C) clean frames.
        noisy: (B, T, H, W, C) noisy frames, or None.
        psi: (B, T, K, H, W, C) predictions.
        gamma: (B, T, K, H, W, 1) soft assignments.
    """
    batch, steps, height, width, channels = features.shape
    if channels not in (1, 3):
        raise ValueError(
            f"features must have 1 (grey) or 3 (RGB) channels in (B, T, H, W, C), "
            f"got shape {features.shape}"
        )
    if noisy is not None and noisy.shape != features.shape:
        raise ValueError(
            f"noisy must have the shape of features {features.shape}, got shape {noisy.shape}"
        )
    components = psi.shape[2]
    expected_psi = (batch, steps, components, height, width, channels)
    if psi.shape != expected_psi:
        raise ValueError(
            f"psi must have shape (B, T, K, H, W, C) = {expected_psi} to match features "
            f"{features.shape}, got shape {psi.shape}"
        )
    expected_gamma = (batch, steps, components, height, width, 1)
    if gamma.shape != expected_gamma:
        raise ValueError(
            f"gamma must have shape (B, T, K, H, W, 1) = {expected_gamma} to match psi "
            f"{psi.shape}, got shape {gamma.shape}"
        )


def _check_sample(sample: int, batch: int) -> None:
    """Raise ValueError unless `sample` indexes a batch of `batch` sequences."""
    if not 0 <= sample < batch:
        raise ValueError(f"sample={sample} is out of range for a batch of {batch} sequences")


def _select_steps(steps, num_steps: int) -> list[int]:
    """The step indices to show: the given ones, or at most MAX_OVERVIEW_ROWS evenly spaced.

    Args:
        steps: None or a sequence of indices into the T axis (negative counts from the end).
        num_steps: T.

    Returns:
        Non-negative step indices, in the given order.
    """
    if steps is None:
        evenly_spaced = np.linspace(0, num_steps - 1, min(num_steps, MAX_OVERVIEW_ROWS))
        return sorted({int(round(step)) for step in evenly_spaced})
    chosen = [int(step) for step in steps]
    if not chosen:
        raise ValueError("steps must name at least one step, got an empty sequence")
    outside = [step for step in chosen if not -num_steps <= step < num_steps]
    if outside:
        raise ValueError(f"steps {outside} are out of range for T={num_steps} steps")
    return [step % num_steps for step in chosen]


# --------------------------------------------------------------------------- colours


def component_palette(num_components: int) -> np.ndarray:
    """One distinct colour per mixture component.

    Args:
        num_components: K >= 1.

    Returns:
        (K, 3) uint8 RGB colours: matplotlib's tab10 for K <= 10, evenly spaced hues beyond.
    """
    if num_components < 1:
        raise ValueError(f"num_components must be at least 1, got {num_components}")
    if num_components <= 10:
        rgb = np.asarray(colormaps["tab10"].colors[:num_components])  # (K, 3)
    else:
        hues = np.linspace(0.0, 1.0, num_components, endpoint=False)
        rgb = colormaps["hsv"](hues)[:, :3]  # (K, 3), alpha dropped
    return np.rint(rgb * 255).astype(np.uint8)


def color_gamma(gamma) -> np.ndarray:
    """Render soft assignments as colours: pixel colour = sum_k gamma_k * colour_k.

    Args:
        gamma: (..., K, H, W, 1) soft assignments, summing to 1 over K.

    Returns:
        (..., H, W, 3) uint8 RGB image(s), colours from `component_palette(K)`.
    """
    gamma = np.asarray(gamma, dtype=np.float64)
    if gamma.ndim < 4 or gamma.shape[-1] != 1:
        raise ValueError(f"gamma must have shape (..., K, H, W, 1), got shape {gamma.shape}")
    palette = component_palette(gamma.shape[-4]).astype(np.float64)  # (K, 3)
    mixed = np.einsum("...khw,kc->...hwc", gamma[..., 0], palette)  # (..., H, W, 3)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _to_rgb(images: np.ndarray) -> np.ndarray:
    """Turn grey or RGB images with values in [0, 1] into uint8 RGB.

    Args:
        images: (..., H, W, C) with C = 1 or 3.

    Returns:
        (..., H, W, 3) uint8.
    """
    clipped = np.clip(images, 0.0, 1.0)
    if clipped.shape[-1] == 1:
        clipped = np.repeat(clipped, 3, axis=-1)  # (..., H, W, 3)
    return np.rint(clipped * 255).astype(np.uint8)


# --------------------------------------------------------------------------- panels


class _Column(NamedTuple):
    """One column of an overview: a title, its image at every step and a border colour."""

    title: str
    images: np.ndarray  # (T, H, W, 3) uint8
    border: tuple[int, int, int]  # RGB 0..255


def _image_column(title: str, frames: np.ndarray) -> _Column:
    """A column showing frames (T, H, W, C) of one sequence as they are."""
    return _Column(title, _to_rgb(frames), NEUTRAL_BORDER)


def _psi_columns(psi: np.ndarray, title_format: str) -> list[_Column]:
    """One column per component's prediction, framed in that component's colour.

    Args:
        psi: (T, K, H, W, C) predictions of one sequence.
        title_format: title with a `{k}` placeholder for the 1-based component number.

    Returns:
        K columns.
    """
    palette = component_palette(psi.shape[1])  # (K, 3)
    return [
        _Column(title_format.format(k=k + 1), _to_rgb(psi[:, k]), tuple(int(c) for c in colour))
        for k, colour in enumerate(palette)
    ]


def _gamma_column(title: str, gamma: np.ndarray) -> _Column:
    """A column of soft assignments (T, K, H, W, 1) rendered as component colours."""
    return _Column(title, color_gamma(gamma), NEUTRAL_BORDER)


# --------------------------------------------------------------------------- matplotlib I/O


def _new_figure(size_inches: tuple[float, float]) -> Figure:
    """A Figure drawn by the Agg canvas, independent of pyplot's global state."""
    figure = Figure(figsize=size_inches, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _prepare_path(path: PathArg) -> Path:
    """Return `path` as a Path after creating its parent folders."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _save(figure: Figure, path: PathArg) -> Path:
    """Write the figure (format from the file suffix, PNG by default) and return its path."""
    out = _prepare_path(path)
    figure.savefig(out, dpi=DPI)
    return out


def _series_colours(count: int) -> list[tuple[float, float, float]]:
    """`count` distinct matplotlib colours (RGB in 0..1), the same ones as the components."""
    return [tuple(rgb) for rgb in component_palette(count) / 255.0]


# --------------------------------------------------------------------------- overview


def overview_figure(
    features, noisy, psi, gamma, path: PathArg, *, steps=None, sample: int = 0
) -> Path:
    """The paper's Figures 3/4/7 for one sample: a grid of steps by panels.

    Rows are EM steps (frames, for sequences); columns are the clean input, the noisy input,
    each component's prediction psi_k (framed in the component's colour) and gamma rendered as
    colours (pixel colour = sum_k gamma_k * colour_k). Rows are labelled with their index
    along the T axis. For next-step prediction pass as `features` the frames each step was
    scored against (x(t+1)), so that every row lines up.

    Args:
        features: (B, T, H, W, C) clean frames in [0, 1], C = 1 or 3.
        noisy: (B, T, H, W, C) noisy frames fed to the network, or None to leave the column out.
        psi: (B, T, K, H, W, C) predictions.
        gamma: (B, T, K, H, W, 1) soft assignments.
        path: output file (PNG, or any format matplotlib knows from the suffix).
        steps: indices along T to show; default all, or 10 evenly spaced ones if T > 10.
        sample: which sequence of the batch to show.

    Returns:
        The path written.
    """
    features = _as_array("features", features, "BTHWC")
    noisy = None if noisy is None else _as_array("noisy", noisy, "BTHWC")
    psi = _as_array("psi", psi, "BTKHWC")
    gamma = _as_array("gamma", gamma, "BTKHW1")
    _check_overview_arrays(features, noisy, psi, gamma)
    _check_sample(sample, features.shape[0])
    shown_steps = _select_steps(steps, features.shape[1])

    columns = [_image_column("input", features[sample])]
    if noisy is not None:
        columns.append(_image_column("noisy input", noisy[sample]))
    columns += _psi_columns(psi[sample], r"$\psi_{{{k}}}$")
    columns.append(_gamma_column(r"$\gamma$", gamma[sample]))

    figure = _new_figure(
        (PANEL_INCHES * len(columns) + 0.4, PANEL_INCHES * len(shown_steps) + 0.3)
    )
    axes = figure.subplots(len(shown_steps), len(columns), squeeze=False)
    for row, step in enumerate(shown_steps):
        for column, ax in zip(columns, axes[row]):
            _draw_panel(ax, column.images[step], column.border)
        axes[row, 0].set_ylabel(f"t = {step}")
    for column, ax in zip(columns, axes[0]):
        ax.set_title(column.title, fontsize=10)
    return _save(figure, path)


def _draw_panel(ax, image: np.ndarray, border: tuple[int, int, int]) -> None:
    """Show one (H, W, 3) uint8 image without ticks, framed in `border` (RGB 0..255)."""
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(np.asarray(border) / 255.0)
        spine.set_linewidth(2.5)


# --------------------------------------------------------------------------- GIF


def overview_gif(features, psi, gamma, path: PathArg, *, sample: int = 0, fps: float = 4) -> Path:
    """Animate one sample over the steps: input | gamma colours | each psi_k, side by side.

    Every frame is upscaled (nearest neighbour, x4) and carries a header with the step index
    and the panel names, so that no two frames are identical (Pillow would merge them).

    Args:
        features: (B, T, H, W, C) frames in [0, 1], C = 1 or 3.
        psi: (B, T, K, H, W, C) predictions.
        gamma: (B, T, K, H, W, 1) soft assignments.
        path: output GIF file.
        sample: which sequence of the batch to show.
        fps: frames (steps) per second.

    Returns:
        The path written; the GIF has T frames and loops forever.
    """
    features = _as_array("features", features, "BTHWC")
    psi = _as_array("psi", psi, "BTKHWC")
    gamma = _as_array("gamma", gamma, "BTKHW1")
    _check_overview_arrays(features, None, psi, gamma)
    _check_sample(sample, features.shape[0])
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")

    columns = [
        _image_column("input", features[sample]),
        _gamma_column("gamma", gamma[sample]),
        *_psi_columns(psi[sample], "psi {k}"),
    ]
    num_steps = features.shape[1]
    frames = [_gif_frame(columns, step, num_steps) for step in range(num_steps)]
    out = _prepare_path(path)
    frames[0].save(
        out,
        format="GIF",
        save_all=True,
        append_images=frames[1:],
        duration=round(1000 / fps),
        loop=0,
    )
    return out


def _framed(image: np.ndarray, border: tuple[int, int, int]) -> np.ndarray:
    """Surround an (H, W, 3) uint8 image by a one-pixel border; returns (H + 2, W + 2, 3)."""
    height, width, _ = image.shape
    framed = np.empty((height + 2, width + 2, 3), dtype=np.uint8)
    framed[:] = border
    framed[1:-1, 1:-1] = image
    return framed


def _gif_frame(columns: list[_Column], step: int, num_steps: int) -> Image.Image:
    """One animation frame: the columns' images at `step`, upscaled, under a text header."""
    strip = np.concatenate(
        [_framed(column.images[step], column.border) for column in columns], axis=1
    )  # (H + 2, len(columns) * (W + 2), 3)
    strip = strip.repeat(GIF_UPSCALE, axis=0).repeat(GIF_UPSCALE, axis=1)  # x4 both sides
    tile_width = strip.shape[1] // len(columns)

    font = ImageFont.load_default()
    line_height = font.getbbox("Ag")[3] + 4
    header_height = 2 * line_height + 2
    frame = Image.new("RGB", (strip.shape[1], strip.shape[0] + header_height), GIF_BACKGROUND)
    frame.paste(Image.fromarray(strip), (0, header_height))

    draw = ImageDraw.Draw(frame)
    draw.text((2, 1), f"step {step} / {num_steps - 1}", fill=(0, 0, 0), font=font)
    for index, column in enumerate(columns):
        label_position = (index * tile_width + 2, line_height + 1)
        draw.text(label_position, column.title, fill=(0, 0, 0), font=font)
    return frame


# --------------------------------------------------------------------------- curves


def _metric_family(name: str) -> str:
    """Which panel a metric belongs on: 'scores' (AMI, ARI, ...), 'losses' or 'other'."""
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    if words & SCORE_WORDS:
        return "scores"
    if words & LOSS_WORDS:
        return "losses"
    return "other"


def _metric_points(name: str, pairs) -> np.ndarray:
    """A metric's (step, value) pairs as an (n, 2) float array, sorted by step."""
    points = np.asarray(pairs, dtype=np.float64)
    if points.size == 0:
        return np.empty((0, 2))
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(
            f"metrics[{name!r}] must be a list of (step, value) pairs, "
            f"got an array of shape {points.shape}"
        )
    return points[np.argsort(points[:, 0], kind="stable")]  # (n, 2)


def learning_curves(metrics: Mapping[str, list[tuple[float, float]]], path: PathArg) -> Path:
    """Plot metrics over epochs: one panel for losses, one for scores (AMI, ARI, confidence).

    Metrics are assigned to panels by the words in their names ('val_loss' -> losses,
    'val_ami' -> scores); names with neither kind of word go to a third panel.

    Args:
        metrics: name -> list of (step, value) pairs, as logged during training.
        path: output image file.

    Returns:
        The path written.
    """
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError(
            f"metrics must be a non-empty dict of name -> [(step, value)], got {metrics!r}"
        )
    by_family: dict[str, dict[str, np.ndarray]] = {}
    for name, pairs in metrics.items():
        by_family.setdefault(_metric_family(name), {})[name] = _metric_points(name, pairs)
    families = [family for family in FAMILY_ORDER if family in by_family]

    figure = _new_figure((4.5 * len(families), 3.5))
    axes = figure.subplots(1, len(families), squeeze=False)[0]
    for ax, family in zip(axes, families):
        _draw_curves(ax, by_family[family])
        ax.set_title(family)
        ax.set_xlabel("epoch")
    return _save(figure, path)


def _tick_whole_numbers(ax) -> None:
    """Put x ticks on whole numbers in strides of 1, 2, 5 or 10.

    Epochs and steps are counts: a run of a few epochs would otherwise get ticks at 5.5, 6.5, ...
    """
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))


def _draw_curves(ax, curves: dict[str, np.ndarray]) -> None:
    """Draw each named (n, 2) array of (step, value) points as a line with a legend entry."""
    for (name, points), colour in zip(curves.items(), _series_colours(len(curves))):
        marker = "o" if len(points) <= 30 else None  # markers only while they stay legible
        ax.plot(points[:, 0], points[:, 1], marker=marker, markersize=3, color=colour, label=name)
    _tick_whole_numbers(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


# --------------------------------------------------------------------------- Figure 6


def _ami_series(ami, label: str | None) -> dict[str, np.ndarray]:
    """Normalise `ami_per_step`'s input to label -> (N, T) array, checking every shape."""
    if isinstance(ami, Mapping):
        if label is not None:
            raise ValueError("label applies to a single array; with a dict the keys are the labels")
        if not ami:
            raise ValueError("ami must be an (N, T) array or a non-empty dict label -> (N, T)")
        series = {str(name): np.asarray(scores, dtype=np.float64) for name, scores in ami.items()}
    else:
        series = {label: np.asarray(ami, dtype=np.float64)}
    for name, scores in series.items():
        if scores.ndim != 2 or 0 in scores.shape:
            where = "ami" if name is None else f"ami[{name!r}]"
            raise ValueError(
                f"{where} must have shape (N, T) with N, T >= 1, got shape {scores.shape}"
            )
    return series


def ami_per_step(
    ami, path: PathArg, *, label: str | None = None, trained_steps: int | None = None
) -> Path:
    """Figure 6: median AMI per step over a test set, with the 25-75% band shaded.

    Args:
        ami: (N, T) AMI of N sequences at each of T steps, or a dict label -> (N, T) array
            to compare several series (T may differ between them). NaNs are ignored.
        path: output image file.
        label: legend label for a single array.
        trained_steps: draw a dashed vertical line at this step (how many steps the model
            was trained for), to show whether the grouping keeps improving beyond it.

    Returns:
        The path written. Steps are numbered 1..T on the x axis.
    """
    series = _ami_series(ami, label)
    if trained_steps is not None and trained_steps < 1:
        raise ValueError(f"trained_steps must be a positive step count, got {trained_steps}")
    figure = _new_figure((6.0, 3.5))
    ax = figure.add_subplot()
    for (name, scores), colour in zip(series.items(), _series_colours(len(series))):
        steps = np.arange(1, scores.shape[1] + 1)  # (T,)
        lower, median, upper = np.nanpercentile(scores, [25, 50, 75], axis=0)  # each (T,)
        ax.fill_between(steps, lower, upper, color=colour, alpha=0.25, linewidth=0)
        ax.plot(steps, median, color=colour, label=name)
    if trained_steps is not None:
        trained_label = f"trained for {trained_steps} steps"
        ax.axvline(trained_steps, linestyle="--", color="0.3", label=trained_label)
    ax.set_xlim(1, max(scores.shape[1] for scores in series.values()))
    _tick_whole_numbers(ax)
    ax.set_xlabel("step")
    ax.set_ylabel("AMI")
    ax.set_title("AMI per step: median, 25-75% band shaded", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8)
    return _save(figure, path)


# --------------------------------------------------------------------------- Figure 5


def _k_label(components) -> str:
    """Legend label for one K; K = 1 is the recurrent-autoencoder baseline of Figure 5."""
    if int(components) == 1:
        return "K = 1 (recurrent autoencoder)"
    return f"RNN-EM, K = {components}"


def next_step_bce(results: Mapping, path: PathArg, *, per_step: Mapping | None = None) -> Path:
    """Figure 5: next-step BCE (upper bound, max_k psi) against the number of objects.

    Args:
        results: K -> {number of objects -> BCE}, e.g. {1: {3: 21.0, 5: 33.1}, 5: {...}}.
        path: output image file.
        per_step: optional label -> (T,) BCE at each step; drawn as a second panel, which
            shows where over the sequence the grouping pays off.

    Returns:
        The path written. One line per K.
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError(
            f"results must be a non-empty dict K -> {{num_objects -> bce}}, got {results!r}"
        )
    for components, by_objects in results.items():
        if not isinstance(by_objects, Mapping) or not by_objects:
            raise ValueError(
                f"results[{components!r}] must be a non-empty dict num_objects -> bce, "
                f"got {by_objects!r}"
            )
    curves = {}
    for name, values in (per_step or {}).items():
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 1 or values.size == 0:
            raise ValueError(f"per_step[{name!r}] must be a non-empty (T,) array, got shape {values.shape}")
        curves[str(name)] = np.stack([np.arange(1, values.size + 1), values], axis=1)  # (T, 2)

    figure = _new_figure((10.0, 3.5) if curves else (5.0, 3.5))
    ax = figure.add_subplot(1, 2 if curves else 1, 1)
    all_objects: set[int] = set()
    for components, colour in zip(sorted(results), _series_colours(len(results))):
        objects = sorted(results[components])
        bce = [float(results[components][count]) for count in objects]
        ax.plot(objects, bce, marker="o", color=colour, label=_k_label(components))
        all_objects.update(int(count) for count in objects)
    ax.set_xticks(sorted(all_objects))
    ax.set_xlabel("number of objects")
    ax.set_ylabel("next-step BCE (upper bound)")
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.25)  # room for the legend: with one object count all points share one x
    ax.legend(fontsize=8)
    if curves:
        steps_ax = figure.add_subplot(1, 2, 2)
        _draw_curves(steps_ax, curves)
        steps_ax.set_xlabel("step")
        steps_ax.set_ylabel("next-step BCE (upper bound)")
        steps_ax.set_title("per step", fontsize=10)
    return _save(figure, path)
