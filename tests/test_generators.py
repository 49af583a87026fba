"""Tests of the data set generators: shapes, flying MNIST, the registry and the CLI."""

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neural_em import metrics
from neural_em.data import mnist, registry, shapes
from neural_em.data.__main__ import main
from neural_em.data.store import content_hash, open_dataset

MNIST_DIR = Path("/work/shared/data/mnist")
needs_mnist = pytest.mark.skipif(not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                                 reason=f"no MNIST IDX files in {MNIST_DIR}")


def tiny_counts(n=4):
    return dict(train=n, valid=2, test=2, progress=False)


# ---------------------------------------------------------------------------- shapes


def test_bitmaps_match_spec():
    square = np.ones((7, 7), np.uint8)
    square[2:5, 2:5] = 0
    up_rows = ["000001100000", "000011110000", "000111111000", "001110011100",
               "011100001110", "111111111111", "111111111111"]
    up = np.array([[int(c) for c in row] for row in up_rows], np.uint8)
    np.testing.assert_array_equal(shapes.SQUARE, square)
    np.testing.assert_array_equal(shapes.UP_TRIANGLE, up)
    np.testing.assert_array_equal(shapes.DOWN_TRIANGLE, np.flipud(up))
    assert [s.shape for s in shapes.SHAPES] == [(7, 7), (7, 12), (7, 12)]


def simulate_bounces(start, velocity, extent, frames):
    """Step-by-step reference: move, and mirror at a wall (one bounce per step at most)."""
    position, velocity = float(start), float(velocity)
    positions = [position]
    for _ in range(frames - 1):
        position += velocity
        if position > extent:
            position, velocity = 2 * extent - position, -velocity
        elif position < 0:
            position, velocity = -position, -velocity
        positions.append(position)
    return np.array(positions)


def test_bouncing_trajectories_match_step_by_step_reflection():
    rng = np.random.default_rng(1)
    extent = rng.integers(3, 17, size=(6, 2, 2))  # (N, O, 2), every extent > max speed
    trajectories = shapes.bouncing_trajectories(rng, extent, 30, min_speed=1.0, max_speed=2.5)
    positions, velocities = trajectories
    assert positions.shape == (30, 6, 2, 2)
    speed = np.linalg.norm(velocities, axis=-1)
    assert np.all((speed >= 1.0) & (speed <= 2.5))
    for index in np.ndindex(6, 2, 2):
        reference = simulate_bounces(positions[(0,) + index], velocities[index], extent[index], 30)
        np.testing.assert_allclose(positions[(slice(None),) + index], reference, atol=1e-9)


def test_velocity_constant_between_bounces():
    rng = np.random.default_rng(2)
    extent = np.full((20, 3, 2), 16)
    positions, velocities = shapes.bouncing_trajectories(rng, extent, 21, min_speed=1.0, max_speed=2.5)
    steps = np.diff(positions, axis=0)  # (T-1, N, O, 2)
    assert np.all(np.abs(steps) <= np.abs(velocities) + 1e-9)
    changed = ~np.isclose(steps[1:], steps[:-1])  # (T-2, N, O, 2)
    # A step can only change when the position in between is within one step of a wall.
    middle = positions[1:-1]
    near_wall = (middle < np.abs(velocities)) | (middle > extent - np.abs(velocities))
    assert changed.any(), "no bounce happened: the test would prove nothing"
    assert np.all(near_wall[changed])
    assert np.all((positions >= 0) & (positions <= extent))


@pytest.mark.parametrize("frames,max_speed", [(1, 2.5), (21, 2.5), (21, 6.0)])
def test_every_shape_whole_and_inside_in_every_frame(frames, max_speed):
    rng = np.random.default_rng(3)
    scenes = shapes.sample_shape_scenes(rng, 50, size=28, objects=5, frames=frames, max_speed=max_speed)
    sprite_sizes = np.array([s.shape for s in shapes.SHAPES])[scenes.shape_ids]  # (N, O, 2)
    assert np.all(scenes.positions >= 0)
    assert np.all(scenes.positions <= 28 - sprite_sizes)
    on_pixels = np.array([s.sum() for s in shapes.SHAPES])[scenes.shape_ids]  # (N, O)
    for obj in range(5):
        mask = shapes.render_object_mask(scenes, obj, 28)  # (T, N, H, W)
        np.testing.assert_array_equal(mask.sum(axis=(2, 3)), np.broadcast_to(on_pixels[:, obj], mask.shape[:2]))


def test_rendered_shape_is_the_bitmap_at_its_position():
    rng = np.random.default_rng(4)
    scenes = shapes.sample_shape_scenes(rng, 10, size=20, objects=1, frames=3)
    mask = shapes.render_object_mask(scenes, 0, 20)
    for t, n in np.ndindex(3, 10):
        bitmap = shapes.SHAPES[scenes.shape_ids[n, 0]]
        row, column = scenes.positions[t, n, 0]
        expected = np.zeros((20, 20), bool)
        expected[row:row + bitmap.shape[0], column:column + bitmap.shape[1]] = bitmap
        np.testing.assert_array_equal(mask[t, n], expected)


def test_flying_shapes_groups_consistent_with_objects():
    features, groups = shapes.flying_shapes(np.random.default_rng(5), 40, objects=4, frames=6)
    assert features.shape == groups.shape == (6, 40, 28, 28, 1)
    assert features.dtype == groups.dtype == np.uint8
    scenes = shapes.sample_shape_scenes(np.random.default_rng(5), 40, objects=4, frames=6)
    masks = np.stack([shapes.render_object_mask(scenes, obj, 28) for obj in range(4)])  # (O, T, N, H, W)
    coverage = masks.sum(axis=0)
    np.testing.assert_array_equal(features[..., 0], coverage > 0)
    expected_groups = np.where(coverage == 1, masks.argmax(axis=0) + 1, 0)
    np.testing.assert_array_equal(groups[..., 0], expected_groups)
    assert (coverage >= 2).any(), "no overlap in the sample: the overlap rule went untested"
    assert np.all(features[groups > 0] == 1)


def test_static_shapes_are_single_frames_with_at_most_three_objects():
    features, groups = shapes.static_shapes(np.random.default_rng(6), 30, size=20)
    assert features.shape == (1, 30, 20, 20, 1)
    assert set(np.unique(features)) <= {0, 1}
    assert set(np.unique(groups)) <= {0, 1, 2, 3}


def _reference_static_image(rng, size=28, objects=3):
    """One image drawn the way the published shapes.h5 was (SPEC §4): a shape id, then a uniform
    top-left corner fully inside the image, per object; a pixel on in two shapes gets group 0."""
    counts, groups = np.zeros((size, size), int), np.zeros((size, size), int)
    for label in range(1, objects + 1):
        bitmap = shapes.SHAPES[rng.integers(len(shapes.SHAPES))]
        row = rng.integers(size - bitmap.shape[0] + 1)
        column = rng.integers(size - bitmap.shape[1] + 1)
        window = (slice(row, row + bitmap.shape[0]), slice(column, column + bitmap.shape[1]))
        counts[window] += bitmap
        groups[window][bitmap != 0] = label
    groups[counts > 1] = 0
    return counts > 0, groups


def test_static_shapes_have_the_statistics_of_the_published_generator():
    # How often shapes overlap decides how hard grouping is (and so the AMI one can reach).
    n = 3000
    features, groups = shapes.static_shapes(np.random.default_rng(7), n)
    ours_on = features[0, ..., 0].sum(axis=(1, 2))  # (N,)
    ours_overlap = metrics.occluded_pixels(features[0], groups[0])  # (N,)
    rng = np.random.default_rng(8)
    ref_features, ref_groups = map(np.stack, zip(*(_reference_static_image(rng) for _ in range(n))))  # (N, H, W)
    ref_on = ref_features.sum(axis=(1, 2))  # (N,)
    ref_overlap = metrics.occluded_pixels(ref_features[..., None], ref_groups[..., None])  # (N,)
    # About 71% of images have overlapping shapes; the standard error of a difference is about 0.012.
    assert abs(np.mean(ours_overlap > 0) - np.mean(ref_overlap > 0)) < 0.05
    assert abs(ours_overlap.mean() - ref_overlap.mean()) < 1.0  # pixels; means are about 10.4
    assert abs(ours_on.mean() - ref_on.mean()) < 2.0  # pixels; means are about 125


def test_scene_options_are_checked():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="size=11"):
        shapes.flying_shapes(rng, 2, size=11)
    with pytest.raises(ValueError, match="objects=0"):
        shapes.flying_shapes(rng, 2, objects=0)
    with pytest.raises(ValueError, match="objects=256"):
        shapes.flying_shapes(rng, 2, objects=256)


# ----------------------------------------------------------------------------- MNIST


def write_idx(path, images, magic=mnist.IDX_IMAGES_MAGIC):
    header = struct.pack(">IIII", magic, *images.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as stream:
        stream.write(header + images.tobytes())


@pytest.mark.parametrize("name", ["t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, name):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 4, 6), dtype=np.uint8)
    write_idx(tmp_path / name, images)
    np.testing.assert_array_equal(mnist.read_idx_images(tmp_path / name), images)
    digits = mnist.load_mnist_idx(tmp_path)
    assert digits.train is None
    np.testing.assert_array_equal(digits.test, images)


def test_idx_bad_magic_names_file(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(path, np.zeros((1, 2, 2), np.uint8), magic=2049)
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*magic"):
        mnist.read_idx_images(path)


def test_missing_mnist_folder_error_names_folder_and_both_ways(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        mnist.load_mnist(tmp_path / "absent")
    message = str(error.value)
    assert str(tmp_path / "absent") in message
    assert "tensorflow-datasets" in message and "--mnist-dir" in message


def test_downsample_is_rounded_block_mean():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    small = mnist.downsample(images)
    block_mean = images.reshape(5, 14, 2, 14, 2).astype(float).mean(axis=(2, 4))
    np.testing.assert_array_equal(small, np.floor(block_mean + 0.5).astype(np.uint8))
    np.testing.assert_array_equal(mnist.downsample(np.array([[[0, 1], [1, 1]]], np.uint8)), [[[1]]])


def test_digit_pools():
    train = np.random.default_rng(0).integers(0, 256, size=(600, 28, 28), dtype=np.uint8)
    test = np.random.default_rng(1).integers(0, 256, size=(50, 28, 28), dtype=np.uint8)
    both = mnist.MnistDigits(train=train, test=test, source="fake")
    pools_20 = mnist.digit_pools(both, "20", np.random.default_rng(7))
    pools_500 = mnist.digit_pools(both, "500", np.random.default_rng(7))
    assert pools_20["training"].shape == (20, 14, 14)
    assert all(pools_20[split] is pools_20["training"] for split in mnist.SPLITS)
    np.testing.assert_array_equal(pools_500["test"][:20], pools_20["test"])  # 20 ⊂ 500 for one seed
    train_small = mnist.downsample(train)
    assert all(any((digit == train_small).all(axis=(1, 2))) for digit in pools_20["training"])
    pools_all = mnist.digit_pools(both, "all", np.random.default_rng(7))
    np.testing.assert_array_equal(pools_all["validation"], train_small)
    np.testing.assert_array_equal(pools_all["test"], mnist.downsample(test))
    test_only = mnist.digit_pools(both._replace(train=None), "all", np.random.default_rng(7))
    np.testing.assert_array_equal(test_only["training"], mnist.downsample(test))
    with pytest.raises(ValueError, match="digits='30'"):
        mnist.digit_pools(both, "30", np.random.default_rng(7))


def test_flying_mnist_frames_and_groups():
    pool = np.random.default_rng(0).integers(0, 256, size=(5, 14, 14), dtype=np.uint8)
    pool[:, :3] = 0  # faint or empty rows, like the margins of real digits
    threshold = 0.1
    features, groups = mnist.flying_mnist(np.random.default_rng(8), 30, pool, objects=3, frames=5,
                                          group_threshold=threshold)
    assert features.shape == groups.shape == (5, 30, 24, 24, 1)
    scenes = mnist.sample_digit_scenes(np.random.default_rng(8), 30, 5, (14, 14), objects=3, frames=5)
    layers = np.stack([mnist.render_digit_layer(scenes, pool, obj, 24) for obj in range(3)])  # (O, T, N, H, W)
    digit_sums = pool.sum(axis=(1, 2), dtype=np.int64)[scenes.digit_ids]  # (N, O), the digit is never clipped
    expected_sums = np.broadcast_to(digit_sums.T[:, None], layers.shape[:3])  # (O, T, N)
    np.testing.assert_array_equal(layers.sum(axis=(3, 4), dtype=np.int64), expected_sums)
    np.testing.assert_array_equal(features[..., 0], layers.max(axis=0))
    lit = layers > threshold * 255
    expected_groups = np.where(lit.sum(axis=0) == 1, lit.argmax(axis=0) + 1, 0)
    np.testing.assert_array_equal(groups[..., 0], expected_groups)
    assert np.all(features[groups > 0] > threshold * 255)


# -------------------------------------------------------------------------- registry


def test_generate_writes_the_layout(tmp_path):
    path = registry.generate("flying_shapes_4", out=tmp_path / "f.h5", frames=3, **tiny_counts(5))
    with open_dataset(path) as dataset:
        assert dataset.splits == ("training", "validation", "test")
        training = dataset.split("training")
        assert (training.num_sequences, training.frames, training.image_shape) == (5, 3, (28, 28, 1))
        assert training.binary
        assert training.groups(slice(None)).max() <= 4
        assert dataset.attrs["options"]["objects"] == 4
        assert dataset.attrs["generator"] == "flying_shapes_4"


def test_generate_is_deterministic_and_seeded(tmp_path):
    first = registry.generate("shapes", out=tmp_path / "a.h5", seed=3, **tiny_counts())
    second = registry.generate("shapes", out=tmp_path / "b.h5", seed=3, **tiny_counts())
    other = registry.generate("shapes", out=tmp_path / "c.h5", seed=4, **tiny_counts())
    assert first.read_bytes() == second.read_bytes()
    assert content_hash(first) == content_hash(second)
    assert content_hash(first) != content_hash(other)


def test_complete_chunks_do_not_depend_on_split_size(tmp_path):
    chunk = registry.CHUNK_SEQUENCES
    small = registry.generate("shapes", out=tmp_path / "a.h5", train=chunk, valid=1, test=1, progress=False)
    large = registry.generate("shapes", out=tmp_path / "b.h5", train=chunk + 7, valid=1, test=1, progress=False)
    with open_dataset(small) as a, open_dataset(large) as b:
        np.testing.assert_array_equal(a.split("training").features(slice(None)),
                                      b.split("training").features(slice(0, chunk)))
        np.testing.assert_array_equal(a.split("test").groups(slice(None)), b.split("test").groups(slice(None)))


@needs_mnist
def test_generated_digits_come_from_the_pool(tmp_path):
    # A 14×14 frame holds exactly one whole digit, so every frame is a digit image.
    path = registry.generate("flying_mnist_20", out=tmp_path / "m.h5", size=14, objects=1, frames=1,
                             mnist_dir=MNIST_DIR, seed=2, train=60, valid=2, test=40, progress=False)
    pools = mnist.digit_pools(mnist.load_mnist(MNIST_DIR), "20", registry.chunk_rng(2, registry.POOL_STREAM, 0))
    pool = pools["training"].reshape(20, -1)
    with open_dataset(path) as dataset:
        assert dataset.split("training").scale == 255
        for split in ("training", "test"):
            images = np.rint(dataset.split(split).features(slice(None)) * 255).astype(np.uint8)
            images = images.reshape(len(images), -1)  # (n, 196)
            matches = (images[:, None] == pool[None]).all(axis=-1)  # (n, 20)
            assert matches.any(axis=1).all()
            assert len(np.unique(images, axis=0)) <= 20


@pytest.mark.parametrize("options,match", [
    (dict(digits="20"), "digits='20'.*does not apply.*'shapes'"),
    (dict(mnist_dir="/tmp"), "mnist_dir"),
    (dict(train=0), "train=0"),
    (dict(valid=-1), "valid=-1"),
    (dict(objects=0), "objects=0"),
    (dict(frames=0), "frames=0"),
    (dict(size=10), "size=10"),
    (dict(seed=-1), "seed=-1"),
])
def test_generate_rejects_bad_options(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        registry.generate("shapes", out=tmp_path / "x.h5", **options)
    assert not (tmp_path / "x.h5").exists()


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError, match="flying_shapes_3.*static_mnist_2"):
        registry.default_path("flying_shapes_7")
    assert registry.default_path("shapes") == Path("data/shapes.h5")


def test_mnist_sets_reject_bad_digit_pool_and_size():
    with pytest.raises(ValueError, match="digits='7'"):
        registry.resolve_options("flying_mnist_20", digits="7")
    with pytest.raises(ValueError, match="size=13"):
        registry.resolve_options("flying_mnist_all", size=13)


# ------------------------------------------------------------------------------- CLI


def test_cli_generate_prints_path(tmp_path, capsys):
    out = tmp_path / "cli.h5"
    code = main(["generate", "shapes_20x20", "--train", "3", "--valid", "2", "--test", "2",
                 "--seed", "5", "--no-progress", "--out", str(out)])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(out)
    with open_dataset(out) as dataset:
        assert dataset.split("validation").image_shape == (20, 20, 1)
        assert dataset.attrs["seed"] == 5


def test_cli_list_names_every_data_set(capsys):
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in registry.DATASETS)


@pytest.mark.parametrize("argv,fragment", [
    (["generate", "no_such_set"], "unknown data set 'no_such_set'"),
    (["generate", "shapes", "--digits", "20"], "digits"),
    (["generate", "shapes", "--train", "0"], "train=0"),
    (["generate", "flying_mnist_20", "--mnist-dir", "/nonexistent/mnist"], "/nonexistent/mnist"),
])
def test_cli_errors_are_one_line_with_exit_code_2(argv, fragment, capsys):
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert fragment in error
    assert error.count("\n") == 1 and "Traceback" not in error


def test_cli_usage_error_exits_2_without_traceback():
    result = subprocess.run([sys.executable, "-m", "neural_em.data", "generate", "shapes", "--bogus", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "--bogus" in result.stderr and result.stderr.count("\n") == 1
