"""Flying MNIST: grey 24×24 sequences of down-sampled digits bouncing off the walls.

MNIST comes from tensorflow-datasets (`tfds.load('mnist')`, imported only when
needed) or from a folder of the standard IDX files
(`train-images-idx3-ubyte[.gz]`, `t10k-images-idx3-ubyte[.gz]`). Digits are
down-sampled 28 -> 14 by the mean of each 2×2 block.

Digit pools ('20', '500', 'all') restrict which digit images a data set uses;
see `digit_pools` for which MNIST split feeds which data set split.
"""

import gzip
import struct
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from neural_em.data.shapes import bouncing_trajectories, check_scene_options

DIGIT_POOLS = ("20", "500", "all")
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_IMAGE_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
SPLITS = ("training", "validation", "test")


class MnistNotFoundError(FileNotFoundError):
    """Neither tensorflow-datasets nor an IDX folder could provide MNIST."""


class MnistDigits(NamedTuple):
    """MNIST digit images, 28×28 uint8; a split is None when its source lacks it.

    Attributes:
      train: (60000, 28, 28) uint8 or None.
      test: (10000, 28, 28) uint8 or None.
      source: where they came from, e.g. 'tensorflow-datasets' or 'idx:/path'.
    """

    train: Optional[np.ndarray]
    test: Optional[np.ndarray]
    source: str


class DigitScenes(NamedTuple):
    """What a batch of digit sequences contains, before rendering.

    Attributes:
      digit_ids: (N, objects) int, index into the digit pool.
      positions: (T, N, objects, 2) int top-left pixel (row, column) per frame.
    """

    digit_ids: np.ndarray
    positions: np.ndarray


def read_idx_images(path):
    """Reads an IDX image file (optionally gzip-compressed).

    Args:
      path: file path; a name ending in '.gz' is decompressed.

    Returns:
      (count, rows, columns) uint8 array.

    Raises:
      ValueError: the file is not a valid IDX3 unsigned-byte image file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            data = stream.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: cannot read MNIST IDX file ({error})") from error
    if len(data) < 16:
        raise ValueError(f"{path}: too short for an IDX image header (16 bytes), got {len(data)} bytes")
    magic, count, rows, columns = struct.unpack(">IIII", data[:16])
    if magic != IDX_IMAGES_MAGIC:
        raise ValueError(f"{path}: IDX magic number is {magic}, expected {IDX_IMAGES_MAGIC} "
                         "(unsigned-byte images with 3 dimensions)")
    expected_bytes = 16 + count * rows * columns
    if len(data) != expected_bytes:
        raise ValueError(f"{path}: header announces {count}×{rows}×{columns} images "
                         f"({expected_bytes} bytes), file has {len(data)} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, columns)


def _idx_image_path(folder, stem):
    """The IDX file `stem` or `stem.gz` in `folder`, or None if neither exists."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_mnist_idx(folder):
    """Loads whichever MNIST image files (train and/or t10k) a folder holds.

    Args:
      folder: directory with `train-images-idx3-ubyte[.gz]` and/or
        `t10k-images-idx3-ubyte[.gz]`.

    Returns:
      MnistDigits, with None for a missing split.

    Raises:
      MnistNotFoundError: the folder is missing or holds neither file.
    """
    folder = Path(folder)
    paths = {split: _idx_image_path(folder, stem) for split, stem in IDX_IMAGE_FILES.items()}
    if not folder.is_dir() or all(path is None for path in paths.values()):
        names = " or ".join(f"{stem}[.gz]" for stem in IDX_IMAGE_FILES.values())
        raise MnistNotFoundError(f"MNIST folder {folder} has no {names}")
    images = {split: None if path is None else read_idx_images(path) for split, path in paths.items()}
    return MnistDigits(train=images["train"], test=images["test"], source=f"idx:{folder}")


def load_mnist_tfds():
    """Loads MNIST through tensorflow-datasets (downloads it on first use).

    Returns:
      MnistDigits with both splits.
    """
    import tensorflow_datasets as tfds  # heavy, and only needed without an IDX folder

    train, test = tfds.as_numpy(tfds.load("mnist", split=["train", "test"], batch_size=-1))
    return MnistDigits(train=train["image"][..., 0], test=test["image"][..., 0],
                       source="tensorflow-datasets")


def load_mnist(mnist_dir=None, *, fallback_dir="data/mnist"):
    """Loads MNIST digits from an IDX folder, tensorflow-datasets or a fallback folder.

    Args:
      mnist_dir: folder of IDX files; when given, it is the only source tried.
      fallback_dir: folder tried when mnist_dir is None and tensorflow-datasets fails.

    Returns:
      MnistDigits (28×28 uint8).

    Raises:
      MnistNotFoundError: no source worked; the message names both ways to fix it.
    """
    how_to_fix = ("Either make tensorflow-datasets work (pip install tensorflow-datasets; "
                  "tfds.load('mnist') downloads it once, with internet access) or pass "
                  "--mnist-dir DIR with the standard MNIST IDX files "
                  "(train-images-idx3-ubyte[.gz], t10k-images-idx3-ubyte[.gz]).")
    if mnist_dir is not None:
        try:
            return load_mnist_idx(mnist_dir)
        except MnistNotFoundError as error:
            raise MnistNotFoundError(f"{error}. {how_to_fix}") from error
    try:
        return load_mnist_tfds()
    except Exception as tfds_error:  # any failure (missing package, no network) falls back
        try:
            return load_mnist_idx(fallback_dir)
        except MnistNotFoundError as idx_error:
            raise MnistNotFoundError(
                f"MNIST not found: tensorflow-datasets failed ({type(tfds_error).__name__}: "
                f"{tfds_error}) and {idx_error}. {how_to_fix}") from idx_error


def downsample(images):
    """Halves the resolution by averaging each 2×2 block (rounded to nearest).

    Args:
      images: (N, H, W) uint8 with even H and W.

    Returns:
      (N, H/2, W/2) uint8.
    """
    n, height, width = images.shape
    if height % 2 or width % 2:
        raise ValueError(f"downsample needs even image sides, got {height}×{width}")
    blocks = images.reshape(n, height // 2, 2, width // 2, 2).astype(np.uint16)  # (N, H/2, 2, W/2, 2)
    block_sums = blocks.sum(axis=(2, 4))  # (N, H/2, W/2), at most 4·255
    return ((block_sums + 2) // 4).astype(np.uint8)  # integer rounding, the same on every machine


def digit_pools(digits, pool, rng):
    """Chooses the down-sampled digit images each data set split may use.

    For '20' and '500' the pool is the first 20 / 500 of a seeded permutation
    of the MNIST training digits (the test digits when training digits are not
    available), so the 20-pool is contained in the 500-pool for the same seed;
    every split draws from that one pool. For 'all', training and validation
    use all MNIST training digits and the test split all MNIST test digits;
    when only one MNIST split is available, every split uses it.

    Args:
      digits: MnistDigits.
      pool: '20', '500' or 'all'.
      rng: np.random.Generator for the choice of pool.

    Returns:
      dict split name ('training', 'validation', 'test') -> (P, 14, 14) uint8.
    """
    pool = str(pool)
    if pool not in DIGIT_POOLS:
        raise ValueError(f"digits={pool!r} is not a digit pool; expected one of {', '.join(DIGIT_POOLS)}")
    train = digits.train if digits.train is not None else digits.test
    test = digits.test if digits.test is not None else digits.train
    if pool == "all":
        train_small = downsample(train)
        test_small = train_small if test is train else downsample(test)
        return {"training": train_small, "validation": train_small, "test": test_small}
    pool_size = int(pool)
    if pool_size > len(train):
        raise ValueError(f"digits={pool} needs {pool_size} MNIST images, {digits.source} has {len(train)}")
    chosen = rng.permutation(len(train))[:pool_size]  # (P,)
    pooled = downsample(train[chosen])  # (P, 14, 14)
    return {split: pooled for split in SPLITS}


def sample_digit_scenes(rng, n, pool_size, digit_shape, *, size=24, objects=2, frames=21,
                        min_speed=1.0, max_speed=2.5):
    """Draws digits (uniformly from the pool, with replacement) and their bouncing trajectories.

    Args:
      rng: np.random.Generator.
      n: number of sequences N.
      pool_size: number of digit images P to choose from.
      digit_shape: (height, width) of a digit image.
      size: frame height and width.
      objects: digits per frame.
      frames: frames per sequence T; 1 gives static images.
      min_speed, max_speed: speed range in pixels per frame.

    Returns:
      DigitScenes with digit_ids (N, objects) and integer positions (T, N, objects, 2).
    """
    check_scene_options(size=size, objects=objects, frames=frames, sprite_size=max(digit_shape),
                        min_speed=min_speed, max_speed=max_speed)
    digit_ids = rng.integers(0, pool_size, size=(n, objects))  # (N, O)
    extent = np.broadcast_to(size - np.asarray(digit_shape), (n, objects, 2))  # (N, O, 2)
    trajectories = bouncing_trajectories(rng, extent, frames, min_speed=min_speed, max_speed=max_speed)
    positions = np.rint(trajectories.positions).astype(np.int64)  # (T, N, O, 2)
    return DigitScenes(digit_ids=digit_ids, positions=positions)


def render_digit_layer(scenes, digits_pool, obj, size):
    """Renders one digit alone in every frame of every sequence.

    Args:
      scenes: DigitScenes.
      digits_pool: (P, h, w) uint8 digit images.
      obj: which digit, 0 <= obj < objects.
      size: frame height and width.

    Returns:
      (T, N, size, size) uint8, the digit on a black frame.
    """
    frames, n = scenes.positions.shape[:2]
    digit_height, digit_width = digits_pool.shape[1:]
    position = scenes.positions[:, :, obj]  # (T, N, 2)
    rows = position[:, :, 0, None, None] + np.arange(digit_height)[:, None]  # (T, N, h, 1)
    columns = position[:, :, 1, None, None] + np.arange(digit_width)  # (T, N, 1, w)
    frame_index = np.arange(frames)[:, None, None, None]  # (T, 1, 1, 1)
    sequence_index = np.arange(n)[None, :, None, None]  # (1, N, 1, 1)
    layer = np.zeros((frames, n, size, size), dtype=np.uint8)
    layer[frame_index, sequence_index, rows, columns] = digits_pool[scenes.digit_ids[:, obj]]
    return layer


def compose_grey(layers, group_threshold):
    """Takes the pixelwise max of the digit layers and labels pixels only one digit lights.

    Args:
      layers: iterable of (T, N, H, W) uint8 layers, one per digit, in object
        order (the first gets group 1).
      group_threshold: a digit lights a pixel when its intensity exceeds
        group_threshold · 255; fainter strokes count as background.

    Returns:
      features: (T, N, H, W, 1) uint8 grey values 0..255.
      groups: (T, N, H, W, 1) uint8, digit index 1..objects where exactly one
        digit lights the pixel, else 0 (background or overlap).
    """
    features = lit_count = owner = None
    for label, layer in enumerate(layers, start=1):
        if features is None:
            features = np.zeros(layer.shape, dtype=np.uint8)  # (T, N, H, W)
            lit_count = np.zeros(layer.shape, dtype=np.uint8)
            owner = np.zeros(layer.shape, dtype=np.uint8)
        np.maximum(features, layer, out=features)
        lit = layer > group_threshold * 255  # (T, N, H, W)
        lit_count += lit
        owner[lit] = label  # only read where lit_count == 1, so the last writer is the only one
    groups = np.where(lit_count == 1, owner, 0).astype(np.uint8)  # (T, N, H, W)
    return features[..., None], groups[..., None]


def flying_mnist(rng, n, digits_pool, *, size=24, objects=2, frames=21, min_speed=1.0,
                 max_speed=2.5, group_threshold=0.1):
    """Generates grey sequences of MNIST digits flying and bouncing off the walls.

    Each digit image (its whole 14×14 box) starts at a uniformly random
    position fully inside the frame and moves with a random constant velocity
    (direction uniform, speed uniform in [min_speed, max_speed] pixels per
    frame), reflecting off the walls. A frame is the pixelwise max of the
    digits. frames=1 gives static images.

    Args:
      rng: np.random.Generator.
      n: number of sequences N.
      digits_pool: (P, h, w) uint8 digit images to draw from.
      size: frame height and width.
      objects: digits per frame.
      frames: frames per sequence T.
      min_speed, max_speed: speed range in pixels per frame.
      group_threshold: see `compose_grey`.

    Returns:
      features, groups: (T, N, size, size, 1) uint8, see `compose_grey`.
    """
    digits_pool = np.asarray(digits_pool)
    if digits_pool.ndim != 3 or digits_pool.dtype != np.uint8 or len(digits_pool) == 0:
        raise ValueError(f"digits_pool must be a non-empty (P, h, w) uint8 array, got shape "
                         f"{digits_pool.shape} and dtype {digits_pool.dtype}")
    if not 0.0 <= group_threshold < 1.0:
        raise ValueError(f"group_threshold={group_threshold} must be in [0, 1)")
    scenes = sample_digit_scenes(rng, n, len(digits_pool), digits_pool.shape[1:], size=size,
                                 objects=objects, frames=frames, min_speed=min_speed, max_speed=max_speed)
    layers = (render_digit_layer(scenes, digits_pool, obj, size) for obj in range(objects))
    return compose_grey(layers, group_threshold)
