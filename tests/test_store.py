import hashlib
import json

import h5py
import numpy as np
import pytest

from neural_em.data.store import (
    DatasetFormatError,
    DatasetWriter,
    content_hash,
    open_dataset,
)

T, N, H, W, C = 3, 10, 4, 5, 1


def _random_split(rng, *, scale=1, num_sequences=N):
    shape = (T, num_sequences, H, W, C)
    features = rng.integers(0, scale + 1, shape, dtype=np.uint8)  # (T, N, H, W, C)
    groups = rng.integers(0, 4, shape, dtype=np.uint8)
    return features, groups


def _write(path, splits, *, options=None, seed=7, chunk_sequences=None):
    """splits: {name: (features, groups, scale)}, arrays time first."""
    with DatasetWriter(path, generator="test", options=options or {"a": 1}, seed=seed) as writer:
        for name, (features, groups, scale) in splits.items():
            frames, count, height, width, channels = features.shape
            writer.create_split(
                name, num_sequences=count, frames=frames, height=height, width=width,
                channels=channels, scale=scale, chunk_sequences=chunk_sequences,
            )
            writer.write(name, 0, features, groups)


def test_round_trip_binary_is_batch_first_float32(tmp_path):
    features, groups = _random_split(np.random.default_rng(0))
    path = tmp_path / "d.h5"
    _write(path, {"training": (features, groups, 1)})

    with open_dataset(path) as dataset:
        reader = dataset.split("training")
        assert (reader.num_sequences, reader.frames, reader.image_shape) == (N, T, (H, W, C))
        assert reader.binary and reader.scale == 1
        read = reader.features(slice(2, 7))
        assert read.dtype == np.float32 and read.shape == (5, T, H, W, C)
        np.testing.assert_array_equal(read, features[:, 2:7].transpose(1, 0, 2, 3, 4))
        read_groups = reader.groups(np.array([0, 3, 4, 9]))
        assert read_groups.dtype == np.int32
        np.testing.assert_array_equal(read_groups, groups[:, [0, 3, 4, 9]].transpose(1, 0, 2, 3, 4))


def test_grey_features_are_divided_by_scale(tmp_path):
    features, groups = _random_split(np.random.default_rng(1), scale=255)
    path = tmp_path / "grey.h5"
    _write(path, {"test": (features, groups, 255)})

    with open_dataset(path) as dataset:
        reader = dataset.split("test")
        assert reader.scale == 255 and not reader.binary
        np.testing.assert_allclose(
            reader.features(slice(None)), features.transpose(1, 0, 2, 3, 4) / 255.0, rtol=1e-6
        )


def test_blocks_written_out_of_order_equal_one_write(tmp_path):
    features, groups = _random_split(np.random.default_rng(2))
    whole, pieces = tmp_path / "whole.h5", tmp_path / "pieces.h5"
    _write(whole, {"training": (features, groups, 1)})
    with DatasetWriter(pieces, generator="test", options={"a": 1}, seed=7) as writer:
        writer.create_split("training", num_sequences=N, frames=T, height=H, width=W)
        writer.write("training", 6, features[:, 6:], groups[:, 6:])
        writer.write("training", 0, features[:, :6], groups[:, :6])

    with open_dataset(whole) as a, open_dataset(pieces) as b:
        np.testing.assert_array_equal(a.split("training").features(slice(None)), b.split("training").features(slice(None)))
        np.testing.assert_array_equal(a.split("training").groups(slice(None)), b.split("training").groups(slice(None)))
        assert a.attrs["content_sha256"] == b.attrs["content_sha256"]


def test_attributes_and_splits(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "sub" / "dir" / "d.h5"  # parent directories are created
    _write(
        path,
        {"test": (*_random_split(rng), 1), "training": (*_random_split(rng), 1)},
        options={"num_objects": 3, "sizes": [1, 2]},
        seed=42,
    )
    with open_dataset(path) as dataset:
        assert dataset.splits == ("training", "test")  # file order of SPLITS, not creation order
        assert dataset.attrs["generator"] == "test"
        assert dataset.attrs["options"] == {"num_objects": 3, "sizes": [1, 2]}
        assert dataset.attrs["seed"] == 42
        assert dataset.attrs["format_version"] == 1
        assert dataset.attrs["content_sha256"] == content_hash(path)
    assert [p.name for p in path.parent.iterdir()] == ["d.h5"]  # no temporary file left


def test_content_hash_follows_the_documented_definition(tmp_path):
    features, groups = _random_split(np.random.default_rng(4))
    path = tmp_path / "d.h5"
    _write(path, {"validation": (features, groups, 1)}, chunk_sequences=3)

    expected = hashlib.sha256()
    for name, array in (("features", features), ("groups", groups)):
        expected.update(f"validation/{name} |u1 {array.shape}\n".encode())
        for sequence in range(N):
            expected.update(array[:, sequence].tobytes())
    assert content_hash(path) == expected.hexdigest()


def test_content_hash_ignores_chunking_but_not_content(tmp_path):
    features, groups = _random_split(np.random.default_rng(5))
    _write(tmp_path / "a.h5", {"training": (features, groups, 1)}, chunk_sequences=2)
    _write(tmp_path / "b.h5", {"training": (features, groups, 1)}, chunk_sequences=7)
    changed = features.copy()
    changed[0, 0, 0, 0, 0] ^= 1
    _write(tmp_path / "c.h5", {"training": (changed, groups, 1)})
    assert content_hash(tmp_path / "a.h5") == content_hash(tmp_path / "b.h5")
    assert content_hash(tmp_path / "a.h5") != content_hash(tmp_path / "c.h5")


# ------------------------------------------------------------------------------ atomicity


def test_error_inside_with_leaves_no_file(tmp_path):
    path = tmp_path / "d.h5"
    features, groups = _random_split(np.random.default_rng(6))
    with pytest.raises(RuntimeError, match="generator failed"):
        with DatasetWriter(path, generator="test", options={}, seed=0) as writer:
            writer.create_split("training", num_sequences=N, frames=T, height=H, width=W)
            writer.write("training", 0, features, groups)
            raise RuntimeError("generator failed")
    assert list(tmp_path.iterdir()) == []


def test_error_inside_with_leaves_existing_file_byte_identical(tmp_path):
    path = tmp_path / "d.h5"
    _write(path, {"training": (*_random_split(np.random.default_rng(7)), 1)})
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with DatasetWriter(path, generator="test", options={}, seed=1) as writer:
            writer.create_split("training", num_sequences=N, frames=T, height=H, width=W)
            raise RuntimeError("interrupted")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d.h5"]


def test_incomplete_split_is_an_error_and_leaves_no_file(tmp_path):
    path = tmp_path / "d.h5"
    features, groups = _random_split(np.random.default_rng(8))
    with pytest.raises(ValueError, match=r"'training' is incomplete: 4 of 10 .*first missing: 6"):
        with DatasetWriter(path, generator="test", options={}, seed=0) as writer:
            writer.create_split("training", num_sequences=N, frames=T, height=H, width=W)
            writer.write("training", 0, features[:, :6], groups[:, :6])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ published layout


def test_reads_the_published_float_layout(tmp_path):
    rng = np.random.default_rng(9)
    binary = rng.integers(0, 2, (T, N, H, W, C)).astype(np.float32)
    grey = rng.random((T, N, H, W, C), dtype=np.float32)
    groups = rng.integers(0, 4, (T, N, H, W, C)).astype(np.float32)
    path = tmp_path / "published.h5"
    with h5py.File(path, "w") as file:
        for split, features in (("training", binary), ("validation", grey)):
            file.create_dataset(f"{split}/features", data=features)
            file.create_dataset(f"{split}/groups", data=groups)

    with open_dataset(path) as dataset:
        assert dataset.attrs == {}
        assert dataset.splits == ("training", "validation")
        training, validation = dataset.split("training"), dataset.split("validation")
        assert training.binary and not validation.binary
        np.testing.assert_array_equal(training.features(slice(1, 4)), binary[:, 1:4].transpose(1, 0, 2, 3, 4))
        np.testing.assert_array_equal(validation.features(slice(None)), grey.transpose(1, 0, 2, 3, 4))
        read_groups = validation.groups(np.array([2, 5]))
        assert read_groups.dtype == np.int32
        np.testing.assert_array_equal(read_groups, groups[:, [2, 5]].transpose(1, 0, 2, 3, 4))
    assert len(content_hash(path)) == 64


# ------------------------------------------------------------------------------ bad input


def _hand_written(path, **datasets):
    """Writes {"split/name": array} with h5py, bypassing the writer's checks."""
    with h5py.File(path, "w") as file:
        for key, array in datasets.items():
            file.create_dataset(key, data=array)
    return path


GOOD = np.zeros((T, N, H, W, C), np.float32)


@pytest.mark.parametrize(
    "datasets, message",
    [
        ({"other/features": GOOD}, r"no split group found; expected at least one of .*'training'.* found keys \['other'\]"),
        ({"training/features": GOOD}, r"split 'training' has no dataset 'groups'"),
        ({"test/features": GOOD[0], "test/groups": GOOD[0]}, r"test/features has 4 dimensions, expected 5"),
        ({"test/features": GOOD, "test/groups": GOOD[:, :3]}, r"test/groups shape \(3, 3, 4, 5, 1\) differs from features shape \(3, 10, 4, 5, 1\)"),
        ({"test/features": GOOD.astype(np.int16), "test/groups": GOOD}, r"test/features has unsupported dtype int16"),
        ({"test/features": GOOD, "test/groups": GOOD.astype(bool)}, r"test/groups has unsupported dtype bool"),
        ({"test/features": GOOD.astype(np.uint8), "test/groups": GOOD}, r"test/features is uint8 without a 'scale' attribute"),
    ],
)
def test_open_rejects_bad_layouts_naming_file_and_key(tmp_path, datasets, message):
    path = _hand_written(tmp_path / "bad.h5", **datasets)
    with pytest.raises(DatasetFormatError, match=message) as error:
        open_dataset(path)
    assert str(path) in str(error.value)


def test_open_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data set file not found: .*nowhere\.h5"):
        open_dataset(tmp_path / "nowhere.h5")


def test_open_rejects_a_file_that_is_not_hdf5(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("not hdf5")
    with pytest.raises(DatasetFormatError, match=r"notes\.h5 is not an HDF5 file"):
        open_dataset(path)


def test_unknown_split_lists_the_available_ones(tmp_path):
    path = _hand_written(tmp_path / "d.h5", **{"test/features": GOOD, "test/groups": GOOD})
    with open_dataset(path) as dataset, pytest.raises(KeyError, match=r"no split 'training'; available: \['test'\]"):
        dataset.split("training")


def test_index_must_be_increasing_and_in_range(tmp_path):
    path = _hand_written(tmp_path / "d.h5", **{"test/features": GOOD, "test/groups": GOOD})
    with open_dataset(path) as dataset:
        reader = dataset.split("test")
        with pytest.raises(ValueError, match="strictly increasing"):
            reader.features(np.array([3, 1]))
        with pytest.raises(ValueError, match="strictly increasing"):
            reader.features(np.array([1, 1]))
        with pytest.raises(IndexError, match=r"\[0, 10\] outside \[0, 10\)"):
            reader.groups(np.array([0, 10]))
        assert reader.features(np.array([], dtype=int)).shape == (0, T, H, W, C)


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda w, f, g: w.create_split("train", num_sequences=N, frames=T, height=H, width=W),
         r"split 'train' is not one of \('training', 'validation', 'test'\)"),
        (lambda w, f, g: w.create_split("validation", num_sequences=0, frames=T, height=H, width=W),
         r"num_sequences must be a positive integer, got 0"),
        (lambda w, f, g: w.create_split("validation", num_sequences=N, frames=T, height=H, width=W, scale=256),
         r"scale must be an integer in \[1, 255\]"),
        (lambda w, f, g: w.write("test", 0, f[:, :, :2], g[:, :, :2]),
         r"test: expected arrays of shape \(T, n, H, W, C\) = \(3, n, 4, 5, 1\), got \(3, 10, 2, 5, 1\)"),
        (lambda w, f, g: w.write("test", 0, f, g[:, :4]),
         r"test: features shape \(3, 10, 4, 5, 1\) differs from groups shape \(3, 4, 4, 5, 1\)"),
        (lambda w, f, g: w.write("test", 5, f, g),
         r"test: sequences \[5, 15\) are outside \[0, 10\)"),
        (lambda w, f, g: w.write("test", 0, f * 2, g),
         r"test/features: values must lie in \[0, 1\], got \[0, 2\]"),
        (lambda w, f, g: w.write("test", 0, f.astype(np.float32), g),
         r"test/features: expected uint8 \(or integer\) values, got dtype float32"),
    ],
)
def test_writer_rejects_bad_input(tmp_path, write, message):
    features, groups = _random_split(np.random.default_rng(10))
    path = tmp_path / "d.h5"
    with pytest.raises(ValueError, match=message):
        with DatasetWriter(path, generator="test", options={}, seed=0) as writer:
            writer.create_split("test", num_sequences=N, frames=T, height=H, width=W)
            write(writer, features, groups)
    assert not path.exists()


def test_writer_rejects_options_that_are_not_json(tmp_path):
    with pytest.raises(ValueError, match=r"options for .*d\.h5 must be JSON-serialisable"):
        DatasetWriter(tmp_path / "d.h5", generator="test", options={"f": object()}, seed=0)


def test_options_are_stored_as_sorted_json(tmp_path):
    path = tmp_path / "d.h5"
    _write(path, {"test": (*_random_split(np.random.default_rng(11)), 1)}, options={"b": 2, "a": [1]})
    with h5py.File(path, "r") as file:
        assert file.attrs["options"] == json.dumps({"a": [1], "b": 2})
