import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neural_em.data.pipeline import (
    BatchPlan,
    H5Batches,
    add_noise,
    dataset_info,
    make_tf_dataset,
)
from neural_em.data.store import DatasetWriter

T, N, H, W, C = 2, 50, 6, 6, 1
CHUNK = 4  # sequences per stored block: small, so that shuffling mixes several blocks


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    """A binary file whose groups tag each pixel with its sequence index + 1."""
    rng = np.random.default_rng(0)
    features = rng.integers(0, 2, (T, N, H, W, C), dtype=np.uint8)  # (T, N, H, W, C)
    groups = np.broadcast_to(np.arange(1, N + 1, dtype=np.uint8)[None, :, None, None, None], features.shape)
    path = tmp_path_factory.mktemp("data") / "tiny.h5"
    with DatasetWriter(path, generator="test", options={}, seed=0) as writer:
        writer.create_split("training", num_sequences=N, frames=T, height=H, width=W, chunk_sequences=CHUNK)
        writer.write("training", 0, features, groups)
    return path


def _sequence_ids(batch):
    """The sequence indices in a batch, read back from the groups tags."""
    return np.asarray(batch["groups"])[:, 0, 0, 0, 0] - 1  # (B,)


# ------------------------------------------------------------------------------ noise


def _binomial_tolerance(p, n, sigmas=5):
    return sigmas * np.sqrt(p * (1 - p) / n)


def test_bitflip_flips_a_fraction_p_of_pixels():
    rng = np.random.default_rng(1)
    clean = rng.integers(0, 2, (64, 40, 40)).astype(np.float32)
    noisy = add_noise(clean, "bitflip", 0.1, np.random.default_rng(2))
    flipped = noisy != clean
    assert noisy.dtype == np.float32
    assert abs(flipped.mean() - 0.1) < _binomial_tolerance(0.1, clean.size)
    np.testing.assert_array_equal(noisy[flipped], 1 - clean[flipped])


def test_masked_uniform_replaces_a_fraction_p_with_uniform_values():
    clean = np.full((64, 40, 40), 0.5, np.float32)  # U(0, 1) hits 0.5 exactly with tiny probability
    noisy = add_noise(clean, "masked_uniform", 0.2, np.random.default_rng(3))
    replaced = noisy[noisy != clean]
    assert abs(replaced.size / clean.size - 0.2) < _binomial_tolerance(0.2, clean.size)
    assert replaced.min() >= 0.0 and replaced.max() <= 1.0
    # mean of U(0, 1) is 1/2 with std sqrt(1/12) per sample
    assert abs(replaced.mean() - 0.5) < 5 * np.sqrt(1 / 12 / replaced.size)


def test_noise_edge_probabilities_and_none():
    clean = np.random.default_rng(4).integers(0, 2, (8, 8)).astype(np.float32)
    rng = np.random.default_rng(5)
    np.testing.assert_array_equal(add_noise(clean, "bitflip", 0.0, rng), clean)
    np.testing.assert_array_equal(add_noise(clean, "bitflip", 1.0, rng), 1 - clean)
    np.testing.assert_array_equal(add_noise(clean, None, 0.5, rng), clean)
    np.testing.assert_array_equal(add_noise(clean, "none", 0.5, rng), clean)


@pytest.mark.parametrize("prob", [-0.1, 1.5, float("nan"), "0.1", True])
def test_invalid_noise_probability_is_rejected(prob):
    with pytest.raises(ValueError, match=r"noise probability must be a number in \[0, 1\]"):
        add_noise(np.zeros(3), "bitflip", prob, np.random.default_rng(0))


def test_unknown_noise_type_lists_the_valid_ones(data_path):
    with pytest.raises(ValueError, match=r"unknown noise type 'salt'; valid: \('bitflip', 'masked_uniform', 'none'\)"):
        add_noise(np.zeros(3), "salt", 0.1, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"unknown noise type 'salt'"):
        H5Batches(data_path, "training", 8, noise_type="salt")


def test_tf_noise_has_the_same_definition():
    tf = pytest.importorskip("tensorflow")
    from neural_em.data.pipeline import add_noise_tf

    clean = tf.constant(np.random.default_rng(6).integers(0, 2, (64, 40, 40)).astype(np.float32))
    seed = tf.constant([3, 4], tf.int64)
    noisy = add_noise_tf(clean, "bitflip", 0.1, seed).numpy()
    flipped = noisy != clean.numpy()
    assert abs(flipped.mean() - 0.1) < _binomial_tolerance(0.1, flipped.size)
    np.testing.assert_array_equal(noisy[flipped], 1 - clean.numpy()[flipped])
    np.testing.assert_array_equal(add_noise_tf(clean, "bitflip", 0.1, seed).numpy(), noisy)

    half = tf.fill((64, 40, 40), 0.5)
    replaced = add_noise_tf(half, "masked_uniform", 0.2, seed).numpy()
    replaced = replaced[replaced != 0.5]
    assert abs(replaced.size / half.shape.num_elements() - 0.2) < _binomial_tolerance(0.2, half.shape.num_elements())
    assert replaced.min() >= 0.0 and replaced.max() <= 1.0
    with pytest.raises(ValueError, match="noise probability"):
        add_noise_tf(clean, "bitflip", 2.0, seed)


# ------------------------------------------------------------------------------ batch plan


def test_plan_visits_every_sequence_once_per_epoch_in_a_new_order():
    plan = BatchPlan(50, 8, block_size=4, shuffle=True, seed=1, shuffle_blocks=3)
    assert len(plan) == 7
    epochs = [np.concatenate([plan.batch(epoch, i) for i in range(len(plan))]) for epoch in (0, 1)]
    for visited in epochs:
        np.testing.assert_array_equal(np.sort(visited), np.arange(50))
    assert not np.array_equal(epochs[0], epochs[1])
    same_seed = BatchPlan(50, 8, block_size=4, shuffle=True, seed=1, shuffle_blocks=3)
    np.testing.assert_array_equal(same_seed.order(1), plan.order(1))


def test_plan_without_shuffle_and_with_drop_remainder():
    plan = BatchPlan(50, 8, block_size=4, shuffle=False, seed=0, drop_remainder=True)
    assert len(plan) == 6
    np.testing.assert_array_equal(plan.batch(3, 2), np.arange(16, 24))
    with pytest.raises(IndexError, match=r"batch index 6 outside \[0, 6\)"):
        plan.batch(0, 6)
    with pytest.raises(ValueError, match="leaves no batch"):
        BatchPlan(5, 8, block_size=4, shuffle=False, seed=0, drop_remainder=True)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        BatchPlan(5, 0, block_size=4, shuffle=False, seed=0)


# ------------------------------------------------------------------------------ PyDataset


def test_pydataset_batches_keys_shapes_dtypes(data_path):
    batches = H5Batches(data_path, "training", 16, with_groups=True)
    assert len(batches) == 4
    batch = batches[0]
    assert set(batch) == {"features", "noisy", "groups"}
    assert batch["features"].shape == batch["noisy"].shape == batch["groups"].shape == (16, T, H, W, C)
    assert batch["features"].dtype == batch["noisy"].dtype == np.float32
    assert batch["groups"].dtype == np.int32
    assert batches[3]["features"].shape == (2, T, H, W, C)
    assert set(H5Batches(data_path, "training", 16)[0]) == {"features", "noisy"}
    assert dataset_info(data_path) == (N, T, (H, W, C), True)


def test_pydataset_epochs_are_permutations_with_new_noise(data_path):
    batches = H5Batches(data_path, "training", 16, with_groups=True, seed=3)
    first = [batches[i] for i in range(len(batches))]
    batches.on_epoch_end()
    second = [batches[i] for i in range(len(batches))]
    for epoch in (first, second):
        np.testing.assert_array_equal(np.sort(np.concatenate([_sequence_ids(b) for b in epoch])), np.arange(N))
    assert not np.array_equal(_sequence_ids(first[0]), _sequence_ids(second[0]))

    again = H5Batches(data_path, "training", 16, with_groups=True, seed=3)
    for i, batch in enumerate(first):
        for key in batch:
            np.testing.assert_array_equal(again[i][key], batch[key])
    # Same sequences, later epoch: the noise is drawn anew.
    unshuffled = H5Batches(data_path, "training", N, shuffle=False, noise_prob=0.3)
    before = unshuffled[0]["noisy"]
    unshuffled.on_epoch_end()
    assert not np.array_equal(unshuffled[0]["noisy"], before)


def test_pydataset_without_reshuffle_repeats_epoch_zero(data_path):
    batches = H5Batches(data_path, "training", 16, reshuffle_each_iteration=False)
    before = batches[1]
    batches.on_epoch_end()
    for key, value in batches[1].items():
        np.testing.assert_array_equal(value, before[key])


def test_pydataset_first_epoch_resumes_the_epoch_stream(data_path):
    """A run resumed after two epochs sees epoch 2's order and noise, not epoch 0's again."""
    uninterrupted = H5Batches(data_path, "training", 16, with_groups=True, seed=3, noise_prob=0.3)
    uninterrupted.on_epoch_end()
    uninterrupted.on_epoch_end()
    resumed = H5Batches(data_path, "training", 16, with_groups=True, seed=3, noise_prob=0.3, first_epoch=2)
    for i in range(len(resumed)):
        for key, value in resumed[i].items():
            np.testing.assert_array_equal(value, uninterrupted[i][key])
    fresh = H5Batches(data_path, "training", 16, with_groups=True, seed=3, noise_prob=0.3)
    assert not np.array_equal(fresh[0]["noisy"], resumed[0]["noisy"])


@pytest.mark.parametrize("first_epoch", [-1, 1.5, True])
def test_first_epoch_must_be_a_non_negative_integer(data_path, first_epoch):
    with pytest.raises(ValueError, match="first_epoch must be an integer >= 0"):
        H5Batches(data_path, "training", 16, first_epoch=first_epoch)


def test_pydataset_max_sequences_limits_to_the_first_ones(data_path):
    batches = H5Batches(data_path, "training", 8, with_groups=True, max_sequences=12)
    assert len(batches) == 2
    ids = np.concatenate([_sequence_ids(batches[i]) for i in range(2)])
    np.testing.assert_array_equal(np.sort(ids), np.arange(12))
    with pytest.raises(ValueError, match="max_sequences must be a positive integer or None, got 0"):
        H5Batches(data_path, "training", 8, max_sequences=0)


def test_pydataset_rejects_unknown_split(data_path):
    with pytest.raises(KeyError, match=r"no split 'test'; available: \['training'\]"):
        H5Batches(data_path, "test", 8)


def test_pipeline_imports_without_tensorflow_under_jax():
    script = (
        "import sys; import neural_em.data.pipeline; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'"
    )
    environment = dict(os.environ, KERAS_BACKEND="jax")
    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------ tf.data


def _epoch(dataset):
    return [{key: value.numpy() for key, value in batch.items()} for batch in dataset]


def test_tf_dataset_batches_keys_shapes_dtypes(data_path):
    tf = pytest.importorskip("tensorflow")
    dataset = make_tf_dataset(data_path, "training", 16, with_groups=True)
    spec = dataset.element_spec
    assert set(spec) == {"features", "noisy", "groups"}
    assert spec["features"].shape.as_list() == [None, T, H, W, C]
    assert spec["noisy"].dtype == tf.float32 and spec["groups"].dtype == tf.int32
    assert int(dataset.cardinality()) == 4
    batches = _epoch(dataset)
    assert [b["features"].shape[0] for b in batches] == [16, 16, 16, 2]
    np.testing.assert_array_equal(np.sort(np.concatenate([_sequence_ids(b) for b in batches])), np.arange(N))

    dropped = make_tf_dataset(data_path, "training", 16, drop_remainder=True, noise_type=None)
    assert dropped.element_spec["features"].shape.as_list() == [16, T, H, W, C]
    dropped_batches = _epoch(dropped)
    assert len(dropped_batches) == 3
    np.testing.assert_array_equal(dropped_batches[0]["noisy"], dropped_batches[0]["features"])


def test_tf_dataset_matches_pydataset_sequences(data_path):
    pytest.importorskip("tensorflow")
    tf_batches = _epoch(make_tf_dataset(data_path, "training", 16, seed=5, with_groups=True))
    py_batches = H5Batches(data_path, "training", 16, seed=5, with_groups=True)
    for i, batch in enumerate(tf_batches):
        np.testing.assert_array_equal(batch["features"], py_batches[i]["features"])
        np.testing.assert_array_equal(batch["groups"], py_batches[i]["groups"])


def test_tf_dataset_new_epoch_each_pass_reproducible_from_seed(data_path):
    pytest.importorskip("tensorflow")
    dataset = make_tf_dataset(data_path, "training", 16, seed=2, with_groups=True, noise_prob=0.3)
    first, second = _epoch(dataset), _epoch(dataset)
    assert not np.array_equal(_sequence_ids(first[0]), _sequence_ids(second[0]))
    flips = [np.flatnonzero(b["noisy"] != b["features"]) for b in (first[0], second[0])]
    assert not np.array_equal(*flips)

    again = _epoch(make_tf_dataset(data_path, "training", 16, seed=2, with_groups=True, noise_prob=0.3))
    for batch, repeat in zip(first, again):
        for key in batch:
            np.testing.assert_array_equal(repeat[key], batch[key])

    repeated = make_tf_dataset(data_path, "training", 16, seed=2, with_groups=True, noise_prob=0.3, repeat=True)
    eight = _epoch(repeated.take(8))
    for batch, expected in zip(eight, first + second):
        for key in batch:
            np.testing.assert_array_equal(batch[key], expected[key])

    fixed = make_tf_dataset(data_path, "training", 16, seed=2, reshuffle_each_iteration=False)
    np.testing.assert_array_equal(_epoch(fixed)[0]["noisy"], _epoch(fixed)[0]["noisy"])


def test_tf_dataset_first_epoch_matches_the_later_passes_and_the_pydataset(data_path):
    pytest.importorskip("tensorflow")
    options = dict(seed=2, with_groups=True, noise_prob=0.3)
    uninterrupted = make_tf_dataset(data_path, "training", 16, **options)
    _epoch(uninterrupted), _epoch(uninterrupted)
    third = _epoch(uninterrupted)
    resumed = _epoch(make_tf_dataset(data_path, "training", 16, first_epoch=2, **options))
    pydataset = H5Batches(data_path, "training", 16, first_epoch=2, **options)
    for i, (batch, expected) in enumerate(zip(resumed, third)):
        for key in batch:
            np.testing.assert_array_equal(batch[key], expected[key])
        np.testing.assert_array_equal(_sequence_ids(batch), _sequence_ids(pydataset[i]))


def test_tf_dataset_max_sequences(data_path):
    pytest.importorskip("tensorflow")
    batches = _epoch(make_tf_dataset(data_path, "training", 8, with_groups=True, max_sequences=12, shuffle=False))
    np.testing.assert_array_equal(np.concatenate([_sequence_ids(b) for b in batches]), np.arange(12))


@pytest.fixture(scope="module")
def static_path(tmp_path_factory):
    """A file of single binary images (T = 1)."""
    rng = np.random.default_rng(1)
    features = rng.integers(0, 2, (1, 20, H, W, C), dtype=np.uint8)  # (1, N, H, W, C)
    path = tmp_path_factory.mktemp("static") / "static.h5"
    with DatasetWriter(path, generator="test", options={}, seed=0) as writer:
        writer.create_split("training", num_sequences=20, frames=1, height=H, width=W, chunk_sequences=CHUNK)
        writer.write("training", 0, features, np.ones_like(features))
    return path


@pytest.mark.parametrize("front_end", ["tf", "py"])
def test_static_steps_corrupts_each_step_independently(static_path, front_end):
    options = dict(shuffle=False, noise_prob=0.3, static_steps=5)
    if front_end == "tf":
        batch = _epoch(make_tf_dataset(static_path, "training", 20, **options))[0]
    else:
        batch = H5Batches(static_path, "training", 20, **options)[0]
    features, noisy = np.asarray(batch["features"]), np.asarray(batch["noisy"])
    assert features.shape == (20, 1, H, W, C) and noisy.shape == (20, 5, H, W, C)
    flips = noisy != features  # (20, 5, H, W, C): each copy against the one clean image
    np.testing.assert_array_equal(noisy[flips], 1 - np.broadcast_to(features, noisy.shape)[flips])
    assert abs(flips.mean() - 0.3) < _binomial_tolerance(0.3, flips.size)
    # Independent copies: the flips of two steps agree about as often as chance says.
    agree = (flips[:, 0] == flips[:, 1]).mean()
    assert abs(agree - (0.3**2 + 0.7**2)) < _binomial_tolerance(0.58, flips[:, 0].size)


def test_static_steps_leaves_sequences_alone(data_path):
    batch = H5Batches(data_path, "training", 16, static_steps=5)[0]
    assert batch["noisy"].shape == batch["features"].shape == (16, T, H, W, C)


def test_static_steps_must_be_a_positive_integer(static_path):
    with pytest.raises(ValueError, match="static_steps"):
        H5Batches(static_path, "training", 8, static_steps=0)
