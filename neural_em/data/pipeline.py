"""Training and evaluation batches streamed from a data set file.

Two front ends give the same batches (dicts, batch first):

    {"features": float32 (B, T, H, W, C) clean, in [0, 1],
     "noisy":    float32 (B, T, H, W, C) after input noise; for single images (T = 1)
                 with `static_steps=S`, (B, S, H, W, C): a fresh corruption per EM step,
     "groups":   int32   (B, T, H, W, C) only with `with_groups=True`}

- `make_tf_dataset`: a `tf.data.Dataset` (TensorFlow is imported inside the function, so
  this module imports without it);
- `H5Batches`: a `keras.utils.PyDataset` for backends without TensorFlow (e.g. JAX).

Both read blocks of sequences from the file, never a whole split. The sequences of a batch
and the order of batches follow one plan per epoch (`BatchPlan`), so for a given seed and
epoch both front ends hold the same sequences in the same batches. Shuffling visits the
stored blocks (HDF5 chunks) in a random order and mixes the sequences of `shuffle_blocks`
blocks at a time, so each chunk is decompressed about once per epoch. Within a batch the
sequences are kept in file order, which is what makes reading them cheap.

Input noise (SPEC §1) is drawn anew for every batch and every epoch from a seed derived
from (seed, epoch, batch index): reproducible, but independent of the order in which
batches are fetched. `add_noise` (numpy) and `add_noise_tf` (TensorFlow, stateless ops)
implement the same definition; they draw different random numbers.
"""

import itertools
import os
from typing import NamedTuple

import keras
import numpy as np

from neural_em.data.store import open_dataset

NOISE_TYPES = ("bitflip", "masked_uniform", "none")

# First entry of the seed sequences, so that the shuffle and noise streams never coincide.
_SHUFFLE_STREAM = 1
_NOISE_STREAM = 2


# ----------------------------------------------------------------------------------------
# Input noise
# ----------------------------------------------------------------------------------------


def check_noise(noise_type, prob) -> str:
    """Validates a noise setting and returns the canonical noise type.

    Args:
        noise_type: "bitflip", "masked_uniform", "none" or None (same as "none").
        prob: probability p in [0, 1] that a pixel is corrupted.

    Returns:
        The noise type, with None mapped to "none".
    """
    noise_type = "none" if noise_type is None else noise_type
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"unknown noise type {noise_type!r}; valid: {NOISE_TYPES} or None")
    if isinstance(prob, bool) or not isinstance(prob, (int, float, np.number)) or not 0.0 <= prob <= 1.0:
        raise ValueError(f"noise probability must be a number in [0, 1], got {prob!r}")
    return noise_type


def check_static_steps(static_steps):
    """Validates ``static_steps`` (None or an integer >= 1) and returns it."""
    if static_steps is not None and (isinstance(static_steps, bool) or not isinstance(static_steps, (int, np.integer))
                                     or static_steps < 1):
        raise ValueError(f"static_steps must be None or an integer >= 1, got {static_steps!r}")
    return static_steps


def check_first_epoch(first_epoch):
    """Validates ``first_epoch`` (an integer >= 0) and returns it as an int."""
    if isinstance(first_epoch, bool) or not isinstance(first_epoch, (int, np.integer)) or first_epoch < 0:
        raise ValueError(f"first_epoch must be an integer >= 0, got {first_epoch!r}")
    return int(first_epoch)


def add_noise(features: np.ndarray, noise_type, prob: float, rng: np.random.Generator) -> np.ndarray:
    """Corrupts images with input noise (numpy).

    - "bitflip": x XOR Bernoulli(p), for binary images;
    - "masked_uniform": a Bernoulli(p) mask picks pixels that are replaced by U(0, 1);
    - "none" / None: unchanged.

    Args:
        features: float array with values in [0, 1], any shape.
        noise_type: see above.
        prob: p in [0, 1].
        rng: the source of randomness.

    Returns:
        float32 array of the shape of `features`.
    """
    noise_type = check_noise(noise_type, prob)
    features = np.asarray(features, dtype=np.float32)
    if noise_type == "none":
        return features.copy()
    corrupt = rng.random(features.shape, dtype=np.float32) < prob
    if noise_type == "bitflip":
        replacement = 1.0 - features
    else:
        replacement = rng.random(features.shape, dtype=np.float32)
    return np.where(corrupt, replacement, features)


def add_noise_tf(features, noise_type, prob: float, seed):
    """`add_noise` in TensorFlow with stateless random ops.

    Args:
        features: float32 tensor with values in [0, 1].
        noise_type, prob: as in `add_noise`.
        seed: int32/int64 tensor of shape (2,), the stateless random seed.

    Returns:
        float32 tensor of the shape of `features`.
    """
    import tensorflow as tf

    noise_type = check_noise(noise_type, prob)
    if noise_type == "none":
        return tf.identity(features)
    mask_seed, value_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    corrupt = tf.random.stateless_uniform(tf.shape(features), seed=mask_seed) < prob
    if noise_type == "bitflip":
        replacement = 1.0 - features
    else:
        replacement = tf.random.stateless_uniform(tf.shape(features), seed=value_seed)
    return tf.where(corrupt, replacement, features)


def noise_seed_sequence(seed: int, epoch: int, batch_index: int) -> np.random.SeedSequence:
    """The seed of the input noise of one batch."""
    return np.random.SeedSequence([_NOISE_STREAM, seed, epoch, batch_index])


# ----------------------------------------------------------------------------------------
# Which sequences go into which batch
# ----------------------------------------------------------------------------------------


class DatasetInfo(NamedTuple):
    """What a model needs to know about a split: N, T, (H, W, C) and whether it is binary."""

    num_sequences: int
    frames: int
    image_shape: tuple
    binary: bool


def dataset_info(path, split: str = "training") -> DatasetInfo:
    """The `DatasetInfo` of split `split` of the file at `path`."""
    with open_dataset(path) as dataset:
        reader = dataset.split(split)
        return DatasetInfo(reader.num_sequences, reader.frames, reader.image_shape, reader.binary)


class BatchPlan:
    """The sequence indices of every batch of every epoch.

    Args:
        num_sequences: sequences to draw from (the first `num_sequences` of the split).
        batch_size: B.
        block_size: sequences per stored block (chunk).
        shuffle: if False, batches are consecutive runs in file order, every epoch.
        seed: seed of the shuffle; epoch e uses the stream (seed, e).
        shuffle_blocks: how many blocks are mixed together (the shuffle buffer).
        drop_remainder: drop a last batch smaller than B.
    """

    def __init__(
        self,
        num_sequences: int,
        batch_size: int,
        *,
        block_size: int,
        shuffle: bool,
        seed: int,
        shuffle_blocks: int = 16,
        drop_remainder: bool = False,
    ):
        for name, value in (("batch_size", batch_size), ("shuffle_blocks", shuffle_blocks)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if drop_remainder and num_sequences < batch_size:
            raise ValueError(
                f"drop_remainder=True with {num_sequences} sequences and batch_size={batch_size} "
                "leaves no batch"
            )
        self.num_sequences = num_sequences
        self.batch_size = batch_size
        self.block_size = block_size
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_blocks = shuffle_blocks
        self.num_batches = (
            num_sequences // batch_size if drop_remainder else -(-num_sequences // batch_size)
        )
        # (epoch, order) in one attribute, so that reader threads never see a mixed pair.
        self._cached = (None, None)

    def __len__(self) -> int:
        return self.num_batches

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of the sequences that epoch `epoch` visits, shape (N,)."""
        if not self.shuffle:
            return np.arange(self.num_sequences)
        cached_epoch, order = self._cached
        if cached_epoch != epoch:
            order = self._shuffled_order(epoch)
            self._cached = (epoch, order)
        return order

    def batch(self, epoch: int, index: int) -> np.ndarray:
        """Sorted sequence indices of batch `index` of epoch `epoch`, shape (<= B,)."""
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch index {index} outside [0, {self.num_batches})")
        members = self.order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        return np.sort(members)

    def _shuffled_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence([_SHUFFLE_STREAM, self.seed, epoch]))
        block_starts = rng.permutation(np.arange(0, self.num_sequences, self.block_size))
        windows = []
        for first in range(0, len(block_starts), self.shuffle_blocks):
            members = np.concatenate([
                np.arange(start, min(start + self.block_size, self.num_sequences))
                for start in block_starts[first : first + self.shuffle_blocks]
            ])  # (<= shuffle_blocks * block_size,)
            windows.append(rng.permutation(members))
        return np.concatenate(windows)  # (N,)


def _open_plan(path, split, batch_size, *, shuffle, seed, shuffle_blocks, drop_remainder, max_sequences):
    """Checks the file and split, and makes the batch plan and the static shapes."""
    if max_sequences is not None and (
        isinstance(max_sequences, bool) or not isinstance(max_sequences, (int, np.integer)) or max_sequences < 1
    ):
        raise ValueError(f"max_sequences must be a positive integer or None, got {max_sequences!r}")
    with open_dataset(path) as dataset:
        reader = dataset.split(split)
        num_sequences = reader.num_sequences
        if max_sequences is not None:
            num_sequences = min(num_sequences, int(max_sequences))
        plan = BatchPlan(
            num_sequences,
            batch_size,
            block_size=reader.block_size,
            shuffle=shuffle,
            seed=seed,
            shuffle_blocks=shuffle_blocks,
            drop_remainder=drop_remainder,
        )
        return plan, (reader.frames,) + reader.image_shape


def _read_batch(reader, indices: np.ndarray, with_groups: bool) -> dict:
    batch = {"features": reader.features(indices)}  # (B, T, H, W, C)
    if with_groups:
        batch["groups"] = reader.groups(indices)  # (B, T, H, W, C)
    return batch


# ----------------------------------------------------------------------------------------
# tf.data
# ----------------------------------------------------------------------------------------


def make_tf_dataset(
    path,
    split: str,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    noise_type="bitflip",
    noise_prob: float = 0.1,
    repeat: bool = False,
    with_groups: bool = False,
    drop_remainder: bool = False,
    max_sequences: int | None = None,
    shuffle_blocks: int = 16,
    reshuffle_each_iteration: bool = True,
    static_steps: int | None = None,
    first_epoch: int = 0,
):
    """A `tf.data.Dataset` of batches streamed from a data set file.

    Every pass over the dataset is a new epoch: the k-th iteration (or repetition, with
    `repeat=True`) uses epoch k's order and noise, as `tf.data`'s own shuffle does.

    Args:
        path: the data set file.
        split: "training", "validation" or "test".
        batch_size: B.
        shuffle: shuffle the sequences (see `BatchPlan`); otherwise file order.
        seed: seed of the shuffle and the noise.
        noise_type, noise_prob: input noise (see `add_noise`).
        repeat: repeat forever, a new epoch each time.
        with_groups: add the ground-truth "groups" to each batch.
        drop_remainder: drop a last batch smaller than B (then B is a static shape).
        max_sequences: use only the first n sequences of the split.
        shuffle_blocks: stored blocks mixed together when shuffling.
        reshuffle_each_iteration: if False, every pass repeats epoch 0 exactly, the same
            order and the same noise (for validation losses that compare across epochs).
        static_steps: for data sets of single images (T = 1): corrupt each image
            independently this many times, so "noisy" is (B, static_steps, H, W, C), one copy
            per EM step, as the published code does; None: one copy. Ignored for sequences.
        first_epoch: the epoch whose order and noise the first pass uses (the epochs already
            trained, when a run resumes, so that it sees what an uninterrupted run would).

    Returns:
        A dataset of dicts {"features", "noisy"[, "groups"]}, each (B, T, H, W, C) with
        T, H, W, C static ("noisy" has static_steps frames for single images, see above).
    """
    import tensorflow as tf

    noise_type = check_noise(noise_type, noise_prob)
    check_static_steps(static_steps)
    plan, sequence_shape = _open_plan(
        path, split, batch_size, shuffle=shuffle, seed=seed, shuffle_blocks=shuffle_blocks,
        drop_remainder=drop_remainder, max_sequences=max_sequences,
    )
    epochs = itertools.count(check_first_epoch(first_epoch)) if reshuffle_each_iteration else itertools.repeat(0)

    def generate_batches():
        epoch = next(epochs)
        with open_dataset(path) as dataset:
            reader = dataset.split(split)
            for index in range(len(plan)):
                batch = _read_batch(reader, plan.batch(epoch, index), with_groups)
                noise_seed = noise_seed_sequence(seed, epoch, index).generate_state(2, np.uint32)
                batch["noise_seed"] = noise_seed.astype(np.int64)  # (2,)
                yield batch

    batch_shape = (batch_size if drop_remainder else None,) + sequence_shape  # (B, T, H, W, C)
    signature = {
        "features": tf.TensorSpec(batch_shape, tf.float32),
        "noise_seed": tf.TensorSpec((2,), tf.int64),
    }
    if with_groups:
        signature["groups"] = tf.TensorSpec(batch_shape, tf.int32)

    @tf.autograph.experimental.do_not_convert  # plain TF ops; AutoGraph chokes on the enclosing generator
    def with_noise(batch):
        noise_seed = batch.pop("noise_seed")
        clean = batch["features"]  # (B, T, H, W, C)
        if static_steps and sequence_shape[0] == 1:
            clean = tf.repeat(clean, static_steps, axis=1)  # (B, S, H, W, C)
        batch["noisy"] = add_noise_tf(clean, noise_type, noise_prob, noise_seed)
        return batch

    dataset = tf.data.Dataset.from_generator(generate_batches, output_signature=signature)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(len(plan)))
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.map(with_noise, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------------------
# keras.utils.PyDataset
# ----------------------------------------------------------------------------------------


class H5Batches(keras.utils.PyDataset):
    """The batches of `make_tf_dataset` as a `keras.utils.PyDataset` (no TensorFlow needed).

    Batch i of epoch e holds the same sequences as in `make_tf_dataset`; its noise comes
    from a numpy Generator seeded with (seed, e, i). `on_epoch_end` moves to the next epoch
    (unless `reshuffle_each_iteration=False`); `epoch` can also be set directly.

    Args:
        path, split, batch_size, shuffle, seed, noise_type, noise_prob, with_groups,
        drop_remainder, max_sequences, shuffle_blocks, reshuffle_each_iteration,
            static_steps, first_epoch: as in `make_tf_dataset`.
        **kwargs: passed to `keras.utils.PyDataset` (workers, use_multiprocessing,
            max_queue_size).
    """

    def __init__(
        self,
        path,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        noise_type="bitflip",
        noise_prob: float = 0.1,
        with_groups: bool = False,
        drop_remainder: bool = False,
        max_sequences: int | None = None,
        shuffle_blocks: int = 16,
        reshuffle_each_iteration: bool = True,
        static_steps: int | None = None,
        first_epoch: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.noise_type = check_noise(noise_type, noise_prob)
        self.noise_prob = noise_prob
        self.static_steps = check_static_steps(static_steps)
        self.path = path
        self.split = split
        self.seed = seed
        self.with_groups = with_groups
        self.reshuffle_each_iteration = reshuffle_each_iteration
        self.plan, self.sequence_shape = _open_plan(
            path, split, batch_size, shuffle=shuffle, seed=seed, shuffle_blocks=shuffle_blocks,
            drop_remainder=drop_remainder, max_sequences=max_sequences,
        )
        self.epoch = check_first_epoch(first_epoch) if reshuffle_each_iteration else 0
        # Opened on first use in each process: h5py handles cannot cross a fork or pickle.
        self._dataset, self._dataset_pid = None, None

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.plan):
            raise IndexError(f"batch index {index} outside [0, {len(self.plan)})")
        batch = _read_batch(self._reader(), self.plan.batch(self.epoch, index), self.with_groups)
        rng = np.random.default_rng(noise_seed_sequence(self.seed, self.epoch, index))
        clean = batch["features"]  # (B, T, H, W, C)
        if self.static_steps and clean.shape[1] == 1:
            clean = np.repeat(clean, self.static_steps, axis=1)  # (B, S, H, W, C)
        batch["noisy"] = add_noise(clean, self.noise_type, self.noise_prob, rng)
        return batch

    def on_epoch_end(self):
        if self.reshuffle_each_iteration:
            self.epoch += 1

    def close(self):
        if self._dataset is not None:
            self._dataset.close()
            self._dataset = None

    def _reader(self):
        if self._dataset is None or self._dataset_pid != os.getpid():
            self._dataset, self._dataset_pid = open_dataset(self.path), os.getpid()
        return self._dataset.split(self.split)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_dataset"], state["_dataset_pid"] = None, None
        return state
