"""Named data sets: which generator makes them, with which defaults, and how to write them.

`generate(name)` writes `data/<name>.h5` in the layout of `store.py`. Output is
deterministic: the same seed and options give the same content, independent of
machine speed or memory, because every chunk of CHUNK_SEQUENCES sequences gets
its own random stream, `np.random.SeedSequence(seed, spawn_key=(split, chunk))`.
"""

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from tqdm.auto import tqdm

from neural_em.data import mnist, shapes
from neural_em.data.store import SPLITS, DatasetWriter

# Sequences generated (and seeded) together. Changing it changes every data set.
CHUNK_SEQUENCES = 1000
# Random stream of the MNIST digit-pool choice; streams 0..2 are the splits.
POOL_STREAM = len(SPLITS)
# Option names of generate() -> split names in the file.
SPLIT_COUNT_OPTIONS = {"train": "training", "valid": "validation", "test": "test"}
MNIST_ONLY_OPTIONS = ("digits", "mnist_dir")
DIGIT_SIZE = 14  # MNIST's 28 pixels down-sampled by 2


class UnknownDatasetError(KeyError):
    """A data set name that is not in DATASETS."""

    def __str__(self):
        # KeyError's default str() wraps the message in quotes.
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A named data set.

    Attributes:
      generator: `shapes.flying_shapes` or `mnist.flying_mnist`.
      description: one line for `python -m neural_em.data list`.
      defaults: every option of `generate` that the data set uses, with its value.
    """

    generator: Callable
    description: str
    defaults: Mapping[str, Any]

    @property
    def uses_mnist(self) -> bool:
        return self.generator is mnist.flying_mnist


_SPLIT_DEFAULTS = dict(train=50_000, valid=10_000, test=10_000, seed=0)
# Speeds are not given in the papers; 1 to 2.5 pixels per frame lets an object
# cross the frame and bounce a few times in 20 steps.
_SPEEDS = dict(min_speed=1.0, max_speed=2.5)


def _shapes(description, **options):
    defaults = dict(_SPLIT_DEFAULTS, size=28, objects=3, frames=1, **_SPEEDS)
    return DatasetSpec(shapes.flying_shapes, description, {**defaults, **options})


def _mnist(description, **options):
    defaults = dict(_SPLIT_DEFAULTS, size=24, objects=2, frames=21, digits="all", **_SPEEDS,
                    group_threshold=0.1)
    return DatasetSpec(mnist.flying_mnist, description, {**defaults, **options})


DATASETS = {
    "shapes": _shapes("static shapes, 28x28 binary, 3 shapes (Reichert & Serre 2013)"),
    "shapes_20x20": _shapes("static shapes at Tagger's size, 20x20 binary, 3 shapes", size=20),
    "flying_shapes_3": _shapes("flying shapes, 28x28 binary, 3 shapes, 21 frames", frames=21),
    "flying_shapes_4": _shapes("flying shapes, 28x28 binary, 4 shapes, 21 frames", frames=21, objects=4),
    "flying_shapes_5": _shapes("flying shapes, 28x28 binary, 5 shapes, 21 frames", frames=21, objects=5),
    "flying_mnist_20": _mnist("flying MNIST, 24x24 grey, 2 digits from a pool of 20, 21 frames", digits="20"),
    "flying_mnist_500": _mnist("flying MNIST, 24x24 grey, 2 digits from a pool of 500, 21 frames",
                               digits="500"),
    "flying_mnist_all": _mnist("flying MNIST, 24x24 grey, 2 digits from all of MNIST, 21 frames"),
    "flying_mnist_all_3digits": _mnist("flying MNIST with 3 digits (generalisation test), 21 frames",
                                       objects=3),
    "flying_mnist_all_51": _mnist("flying MNIST, 2 digits, 51 frames (50-step evaluation, Figure 6)",
                                  frames=51),
    "static_mnist_2": _mnist("static MNIST, 24x24 grey, 2 digits (transfer to static images)", frames=1),
}


def get_spec(name):
    """The DatasetSpec of `name`; raises UnknownDatasetError listing the valid names."""
    if name not in DATASETS:
        raise UnknownDatasetError(f"unknown data set {name!r}; expected one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def default_path(name, data_dir="data"):
    """Where `generate(name)` writes by default: `<data_dir>/<name>.h5`."""
    get_spec(name)
    return Path(data_dir) / f"{name}.h5"


def chunk_rng(seed, stream, chunk):
    """The random generator of one chunk of one stream (a split, or the digit pool)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, chunk)))


def _require_int(option, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{option}={value!r} must be an integer >= {minimum}")


def resolve_options(name, **overrides):
    """Merges overrides into a data set's defaults and checks them.

    Args:
      name: a key of DATASETS.
      **overrides: options of `generate`; None means "use the default".

    Returns:
      dict of every option the data set uses (plus `mnist_dir` for MNIST sets).

    Raises:
      UnknownDatasetError: unknown name.
      ValueError: an option that does not apply, or a value that cannot work.
    """
    spec = get_spec(name)
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if not spec.uses_mnist:
        for option in MNIST_ONLY_OPTIONS:
            if option in overrides:
                raise ValueError(f"option {option}={overrides[option]!r} does not apply to data set "
                                 f"{name!r}: it is a shapes data set, {option} is for MNIST sets only")
    options = {**spec.defaults, **overrides}
    for option in SPLIT_COUNT_OPTIONS:
        _require_int(option, options[option], 1)
    _require_int("seed", options["seed"], 0)
    for option in ("size", "objects", "frames"):
        _require_int(option, options[option], 1)
    sprite_size = DIGIT_SIZE if spec.uses_mnist else max(max(s.shape) for s in shapes.SHAPES)
    shapes.check_scene_options(size=options["size"], objects=options["objects"], frames=options["frames"],
                               sprite_size=sprite_size, min_speed=options["min_speed"],
                               max_speed=options["max_speed"])
    if spec.uses_mnist:
        options["digits"] = str(options["digits"])
        if options["digits"] not in mnist.DIGIT_POOLS:
            raise ValueError(f"digits={options['digits']!r} is not a digit pool; expected one of "
                             f"{', '.join(mnist.DIGIT_POOLS)}")
    return options


def generate(name, *, out=None, train=None, valid=None, test=None, seed=None, objects=None,
             frames=None, size=None, digits=None, mnist_dir=None, progress=True):
    """Generates a named data set and writes it as HDF5.

    Args:
      name: a key of DATASETS.
      out: output file; default `default_path(name)`.
      train, valid, test: number of sequences per split.
      seed: random seed (non-negative integer).
      objects: objects (shapes or digits) per frame.
      frames: frames per sequence; 1 gives static images.
      size: frame height and width in pixels.
      digits: MNIST digit pool, '20', '500' or 'all' (MNIST sets only).
      mnist_dir: folder of MNIST IDX files (MNIST sets only); default
        tensorflow-datasets, see `mnist.load_mnist`.
      progress: show a progress bar over chunks on stderr.

    Returns:
      Path of the file written.

    Raises:
      UnknownDatasetError, ValueError: bad name or options (checked before any work).
      mnist.MnistNotFoundError: MNIST could not be loaded.
    """
    spec = get_spec(name)
    options = resolve_options(name, train=train, valid=valid, test=test, seed=seed, objects=objects,
                              frames=frames, size=size, digits=digits, mnist_dir=mnist_dir)
    out = Path(out) if out is not None else default_path(name)
    seed = options.pop("seed")
    counts = {split: options[option] for option, split in SPLIT_COUNT_OPTIONS.items()}
    generator_options = {key: value for key, value in options.items()
                         if key not in SPLIT_COUNT_OPTIONS and key not in MNIST_ONLY_OPTIONS}
    recorded_options = dict(options, chunk_sequences=CHUNK_SEQUENCES)

    split_pools = None
    if spec.uses_mnist:
        digits_source = mnist.load_mnist(recorded_options.pop("mnist_dir", None))
        split_pools = mnist.digit_pools(digits_source, options["digits"], chunk_rng(seed, POOL_STREAM, 0))
        recorded_options["mnist_source"] = digits_source.source
        recorded_options["mnist_splits"] = [s for s in ("train", "test") if getattr(digits_source, s) is not None]

    total_chunks = sum(-(-count // CHUNK_SEQUENCES) for count in counts.values())
    with DatasetWriter(out, generator=name, options=recorded_options, seed=seed) as writer, \
            tqdm(total=total_chunks, disable=not progress, desc=name, unit="chunk") as progress_bar:
        for split, count in counts.items():
            writer.create_split(split, num_sequences=count, frames=options["frames"], height=options["size"],
                                width=options["size"], channels=1, scale=255 if spec.uses_mnist else 1)
            for chunk, start in enumerate(range(0, count, CHUNK_SEQUENCES)):
                rng = chunk_rng(seed, SPLITS.index(split), chunk)
                chunk_size = min(CHUNK_SEQUENCES, count - start)
                pool_args = (split_pools[split],) if spec.uses_mnist else ()
                features, groups = spec.generator(rng, chunk_size, *pool_args, **generator_options)
                writer.write(split, start, features, groups)  # (T, n, H, W, 1) each
                progress_bar.update()
    return out
