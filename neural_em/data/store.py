"""HDF5 storage of data sets in the layout of the authors' published code.

One file holds up to three splits, the groups `training`, `validation` and `test`. Each
holds two datasets of shape (T, N, H, W, C), time first (T = 1 for static images):

- `features`: uint8 with a `scale` attribute (1 for binary 0/1 images, 255 for grey), or,
  in the published files, float32 already in [0, 1] without the attribute;
- `groups`: the ground-truth object of each pixel (0 = background or overlap, 1..n the
  objects), uint8 here, float or integer in the published files.

Files are written atomically by `DatasetWriter` and read lazily by `open_dataset`, which
hands out batch-first arrays (n, T, H, W, C) a block of sequences at a time, never a whole
split.

Content hash (`content_sha256`): for each split present, in the order of `SPLITS`, and for
`features` then `groups`, the SHA-256 is fed the line `"<split>/<name> <dtype> <shape>\\n"`
(dtype as numpy's `dtype.str`, shape as the stored (T, N, H, W, C) tuple) followed by the
stored bytes in sequence-major order: sequence 0's (T, H, W, C) bytes in C order, then
sequence 1's, and so on. The order does not depend on chunking, so it can be computed a
block at a time.
"""

import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

SPLITS = ("training", "validation", "test")
FORMAT_VERSION = 1
COMPRESSIONS = ("lzf", "gzip")

# Sequences per chunk aim at about this many uncompressed bytes: big enough to compress
# well and to amortise per-chunk overhead, small enough that a shuffled batch touches
# little data it does not use.
DEFAULT_CHUNK_BYTES = 1 << 20
# Decompressed chunks kept per open dataset, so that the batches of a shuffle window
# (see pipeline.py) decompress each chunk once.
DEFAULT_CACHE_BYTES = 64 << 20
# A prime well above the number of cached chunks keeps HDF5's chunk hash table free of
# collisions (see H5Pset_chunk_cache).
_CACHE_SLOTS = 10007


class DatasetFormatError(ValueError):
    """An HDF5 file does not have the layout or dtypes this module reads."""


class UnknownSplitError(KeyError):
    """A split name that is not in the file."""

    def __str__(self):
        # KeyError's default str() wraps the message in quotes.
        return str(self.args[0])


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------


class DatasetWriter:
    """Atomic writer of a data set file.

    Writes to a temporary file beside `path` (`<path>.partial-<pid>`) and renames it over
    `path` only when the `with` block exits without error; on error the temporary file is
    deleted and any existing file at `path` is left untouched. Creates the parent directory.

    Usage:
        with DatasetWriter(path, generator="shapes", options={...}, seed=1) as writer:
            writer.create_split("training", num_sequences=N, frames=1, height=28, width=28)
            writer.write("training", 0, features, groups)  # (T, n, H, W, C) uint8 each
    """

    def __init__(self, path, *, generator: str, options: dict, seed: int, compression: str = "gzip"):
        """Args:
        path: destination file.
        generator: name of the generator that made the data (stored as attr `generator`).
        options: generator options; must be JSON-serialisable (stored as attr `options`).
        seed: random seed of the generator (stored as attr `seed`).
        compression: "gzip" (level 1, the default) or "lzf". Measured on this project's
            kinds of data (binary flying shapes, grey flying MNIST), gzip-1 both reads
            faster (h5py's lzf filter decompresses at ~300 MB/s) and makes smaller files.
        """
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression={compression!r} is not supported; expected one of {COMPRESSIONS}")
        try:
            self._options_json = json.dumps(options, sort_keys=True)
        except (TypeError, ValueError) as error:
            raise ValueError(f"options for {path} must be JSON-serialisable: {error}") from error
        if not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.path = Path(path)
        self.temporary_path = self.path.with_name(f"{self.path.name}.partial-{os.getpid()}")
        self._generator = str(generator)
        self._seed = int(seed)
        self._compression = compression
        self._file = None
        # split -> bool array (N,): which sequences have been written.
        self._written = {}

    def __enter__(self) -> "DatasetWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(self.temporary_path, "w")
        return self

    def create_split(
        self,
        split: str,
        *,
        num_sequences: int,
        frames: int,
        height: int,
        width: int,
        channels: int = 1,
        scale: int = 1,
        chunk_sequences: int | None = None,
    ) -> None:
        """Creates the `features` and `groups` datasets of one split, shape (T, N, H, W, C).

        Args:
            split: one of `SPLITS`.
            num_sequences, frames, height, width, channels: N, T, H, W, C (all >= 1).
            scale: the value that stands for 1.0: 1 for binary images, 255 for grey.
            chunk_sequences: sequences per chunk; default: about DEFAULT_CHUNK_BYTES a chunk.
        """
        self._require_open()
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        if split in self._written:
            raise ValueError(f"split {split!r} was already created in {self.temporary_path}")
        sizes = dict(num_sequences=num_sequences, frames=frames, height=height, width=width, channels=channels)
        for name, value in sizes.items():
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(scale, (int, np.integer)) or not 1 <= scale <= 255:
            raise ValueError(f"scale must be an integer in [1, 255] (1 binary, 255 grey), got {scale!r}")

        sequence_bytes = frames * height * width * channels
        if chunk_sequences is None:
            chunk_sequences = max(1, DEFAULT_CHUNK_BYTES // sequence_bytes)
        chunk_sequences = min(int(chunk_sequences), num_sequences)
        shape = (frames, num_sequences, height, width, channels)
        chunks = (frames, chunk_sequences, height, width, channels)
        group = self._file.create_group(split)
        for name in ("features", "groups"):
            group.create_dataset(
                name,
                shape=shape,
                dtype=np.uint8,
                chunks=chunks,
                compression=self._compression,
                compression_opts=1 if self._compression == "gzip" else None,
                shuffle=False,
            )
        group["features"].attrs["scale"] = int(scale)
        self._written[split] = np.zeros(num_sequences, dtype=bool)

    def write(self, split: str, start: int, features, groups) -> None:
        """Writes sequences [start, start + n) of a split.

        Args:
            split: a split made by `create_split`.
            start: index of the first sequence.
            features: uint8 (T, n, H, W, C), values in [0, scale]. Booleans and other
                integer dtypes are accepted if their values fit.
            groups: uint8 (T, n, H, W, C), same shape.
        """
        self._require_open()
        if split not in self._written:
            raise KeyError(f"split {split!r} was not created; created: {sorted(self._written)}")
        features_dataset = self._file[split]["features"]
        frames, num_sequences, *image_shape = features_dataset.shape
        scale = int(features_dataset.attrs["scale"])
        features = _as_uint8(features, "features", split, maximum=scale)
        groups = _as_uint8(groups, "groups", split, maximum=255)
        if features.shape != groups.shape:
            raise ValueError(
                f"{split}: features shape {features.shape} differs from groups shape {groups.shape}"
            )
        if features.ndim != 5 or features.shape[0] != frames or list(features.shape[2:]) != image_shape:
            raise ValueError(
                f"{split}: expected arrays of shape (T, n, H, W, C) = "
                f"({frames}, n, {', '.join(map(str, image_shape))}), got {features.shape}"
            )
        count = features.shape[1]
        if not 0 <= start <= num_sequences - count:
            raise ValueError(
                f"{split}: sequences [{start}, {start + count}) are outside [0, {num_sequences})"
            )
        features_dataset[:, start : start + count] = features
        self._file[split]["groups"][:, start : start + count] = groups
        self._written[split][start : start + count] = True

    def __exit__(self, exc_type, exc_value, traceback):
        try:
            if exc_type is None:
                self._check_complete()
                self._file.attrs["generator"] = self._generator
                self._file.attrs["options"] = self._options_json
                self._file.attrs["seed"] = self._seed
                self._file.attrs["format_version"] = FORMAT_VERSION
                self._file.attrs["content_sha256"] = _hash_file(self._file)
            self._file.close()
            if exc_type is None:
                os.replace(self.temporary_path, self.path)
        finally:
            if self._file.id.valid:  # closing failed or an error came first
                self._file.close()
            self.temporary_path.unlink(missing_ok=True)  # a no-op after a successful rename
            self._file = None
        return False

    def _require_open(self):
        if self._file is None:
            raise RuntimeError(f"use DatasetWriter({str(self.path)!r}) inside a `with` block")

    def _check_complete(self):
        if not self._written:
            raise ValueError(f"no split was created for {self.path}")
        for split, written in self._written.items():
            if not written.all():
                missing = np.flatnonzero(~written)
                raise ValueError(
                    f"{self.path}: split {split!r} is incomplete: {missing.size} of {written.size} "
                    f"sequences never written (first missing: {missing[0]})"
                )


def _as_uint8(array, name, split, *, maximum):
    """Checks that `array` holds integers in [0, maximum] and returns it as uint8."""
    array = np.asarray(array)
    if array.dtype == np.uint8 and maximum == 255:
        return array
    if not (array.dtype == bool or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{split}/{name}: expected uint8 (or integer) values, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > maximum):
        raise ValueError(
            f"{split}/{name}: values must lie in [0, {maximum}], got [{array.min()}, {array.max()}]"
        )
    return array.astype(np.uint8, copy=False)


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------


def open_dataset(path, *, cache_bytes: int = DEFAULT_CACHE_BYTES) -> "H5Dataset":
    """Opens a data set file for reading and checks its layout.

    Args:
        path: an HDF5 file written by `DatasetWriter` or in the published layout.
        cache_bytes: HDF5 chunk cache per dataset (decompressed chunks kept in memory).

    Returns:
        An `H5Dataset` (a context manager).

    Raises:
        FileNotFoundError: no file at `path`.
        DatasetFormatError: not an HDF5 file, no split group, a split without `features`
            or `groups`, arrays that are not 5-D, differing shapes, unsupported dtypes.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data set file not found: {path}")
    if not path.is_file() or not h5py.is_hdf5(path):
        raise DatasetFormatError(f"{path} is not an HDF5 file")
    file = h5py.File(path, "r", rdcc_nbytes=cache_bytes, rdcc_nslots=_CACHE_SLOTS)
    try:
        return H5Dataset(path, file)
    except Exception:
        file.close()
        raise


class H5Dataset:
    """An open data set file. Use as a context manager, or call `close()`.

    Attributes:
        path: the file.
        attrs: the file's attributes as a dict (`options` JSON-decoded); empty for the
            published files.
        splits: names of the splits present, in the order of `SPLITS`.
    """

    def __init__(self, path: Path, file: h5py.File):
        self.path = path
        self._file = file
        self.splits = tuple(split for split in SPLITS if split in file)
        if not self.splits:
            raise DatasetFormatError(
                f"{path}: no split group found; expected at least one of {SPLITS}, "
                f"found keys {sorted(file.keys())}"
            )
        self._readers = {split: SplitReader(path, split, file[split]) for split in self.splits}
        self.attrs = _decode_attrs(path, file.attrs)

    def split(self, name: str) -> "SplitReader":
        """Returns the reader of split `name` (one of `self.splits`)."""
        if name not in self._readers:
            raise UnknownSplitError(f"{self.path}: no split {name!r}; available: {list(self.splits)}")
        return self._readers[name]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "H5Dataset":
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False


class SplitReader:
    """Lazy reader of one split.

    Attributes:
        name: the split name.
        num_sequences, frames: N and T.
        image_shape: (H, W, C).
        scale: stored value that stands for 1.0 (1 for binary or float data, 255 for grey uint8).
        binary: whether the features are 0/1 images (attribute `binary` if stored; else
            scale == 1 for uint8; for float files, judged from the first block of sequences).
        block_size: sequences per stored chunk (the cheapest unit to read).
    """

    def __init__(self, path: Path, name: str, group: h5py.Group):
        self.name = name
        for key in ("features", "groups"):
            if key not in group or not isinstance(group[key], h5py.Dataset):
                raise DatasetFormatError(f"{path}: split {name!r} has no dataset {key!r}")
        self._features = group["features"]
        self._groups = group["groups"]
        where = f"{path}: {name}/features"
        if self._features.ndim != 5:
            raise DatasetFormatError(
                f"{where} has {self._features.ndim} dimensions, expected 5 (T, N, H, W, C)"
            )
        if self._groups.shape != self._features.shape:
            raise DatasetFormatError(
                f"{path}: {name}/groups shape {self._groups.shape} differs from "
                f"features shape {self._features.shape}"
            )
        features_dtype, groups_dtype = self._features.dtype, self._groups.dtype
        if features_dtype == np.uint8:
            if "scale" not in self._features.attrs:
                raise DatasetFormatError(
                    f"{where} is uint8 without a 'scale' attribute (1 for binary, 255 for grey)"
                )
            self.scale = int(self._features.attrs["scale"])
        elif np.issubdtype(features_dtype, np.floating):
            self.scale = 1
        else:
            raise DatasetFormatError(f"{where} has unsupported dtype {features_dtype}; expected uint8 or float")
        if not (np.issubdtype(groups_dtype, np.integer) or np.issubdtype(groups_dtype, np.floating)):
            raise DatasetFormatError(
                f"{path}: {name}/groups has unsupported dtype {groups_dtype}; expected integer or float"
            )

        self.frames, self.num_sequences, height, width, channels = self._features.shape
        self.image_shape = (height, width, channels)
        chunks = self._features.chunks
        self.block_size = chunks[1] if chunks else min(self.num_sequences, 64)
        self._binary = self._features.attrs.get("binary")

    @property
    def binary(self) -> bool:
        if self._binary is None:
            if self._features.dtype == np.uint8:
                self._binary = self.scale == 1
            else:
                first_block = self._features[:, : self.block_size]  # (T, b, H, W, C)
                self._binary = bool(np.isin(first_block, (0, 1)).all())
        return bool(self._binary)

    def features(self, index) -> np.ndarray:
        """Features of the sequences at `index`, float32 in [0, 1], shape (n, T, H, W, C).

        Args:
            index: a slice, or a 1-D array of strictly increasing sequence indices.
        """
        stored = self._read(self._features, index)  # (T, n, H, W, C)
        features = stored.astype(np.float32)
        if self.scale != 1:
            features *= np.float32(1.0 / self.scale)
        return np.ascontiguousarray(features.swapaxes(0, 1))  # (n, T, H, W, C)

    def groups(self, index) -> np.ndarray:
        """Ground-truth groups of the sequences at `index`, int32, shape (n, T, H, W, C)."""
        stored = self._read(self._groups, index)  # (T, n, H, W, C)
        if np.issubdtype(stored.dtype, np.floating):
            stored = np.rint(stored)
        return np.ascontiguousarray(stored.astype(np.int32).swapaxes(0, 1))  # (n, T, H, W, C)

    def _read(self, dataset: h5py.Dataset, index) -> np.ndarray:
        """Stored values of the sequences at `index`, time first (T, n, H, W, C)."""
        if isinstance(index, slice):
            if index.step in (None, 1):
                return dataset[:, index]
            index = np.arange(self.num_sequences)[index]
        index = np.asarray(index)
        if index.ndim != 1 or not (index.size == 0 or np.issubdtype(index.dtype, np.integer)):
            raise ValueError(f"{self.name}: index must be a slice or a 1-D integer array, got {index!r}")
        if index.size == 0:
            return np.zeros((self.frames, 0) + self.image_shape, dataset.dtype)
        if np.any(np.diff(index) <= 0):
            raise ValueError(f"{self.name}: index must be strictly increasing, got {index}")
        if index[0] < 0 or index[-1] >= self.num_sequences:
            raise IndexError(
                f"{self.name}: index range [{index[0]}, {index[-1]}] outside [0, {self.num_sequences})"
            )
        # Read each run of consecutive indices as one slab: one hyperslab per run is much
        # cheaper for HDF5 than a point selection per sequence.
        run_starts = np.flatnonzero(np.diff(index) != 1) + 1
        runs = np.split(index, run_starts)
        return np.concatenate([dataset[:, run[0] : run[-1] + 1] for run in runs], axis=1)


def _decode_attrs(path, attrs) -> dict:
    """HDF5 attributes as plain Python values, with `options` JSON-decoded."""
    decoded = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        decoded[key] = value
    if "options" in decoded:
        try:
            decoded["options"] = json.loads(decoded["options"])
        except (TypeError, ValueError) as error:
            raise DatasetFormatError(f"{path}: attribute 'options' is not valid JSON: {error}") from error
    return decoded


# ----------------------------------------------------------------------------------------
# Content hash
# ----------------------------------------------------------------------------------------


def content_hash(path) -> str:
    """Recomputes the SHA-256 of a file's features and groups (see the module docstring).

    Equals the `content_sha256` attribute of files made by `DatasetWriter`.
    """
    with open_dataset(path) as dataset:
        return _hash_file(dataset._file)


def _hash_file(file: h5py.File) -> str:
    digest = hashlib.sha256()
    for split in SPLITS:
        if split not in file:
            continue
        for name in ("features", "groups"):
            dataset = file[split][name]
            frames, num_sequences = dataset.shape[:2]
            digest.update(f"{split}/{name} {dataset.dtype.str} {tuple(dataset.shape)}\n".encode())
            block = dataset.chunks[1] if dataset.chunks else 256
            for start in range(0, num_sequences, block):
                slab = dataset[:, start : start + block]  # (T, b, H, W, C)
                digest.update(np.ascontiguousarray(slab.swapaxes(0, 1)).tobytes())  # (b, T, H, W, C)
    return digest.hexdigest()
