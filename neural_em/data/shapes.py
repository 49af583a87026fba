"""Static and flying shapes: binary frames of squares and triangles (SPEC §4).

Every object is a small sprite pasted at an integer top-left position. Flying
objects move on straight lines with a constant velocity and bounce off the
walls; `bouncing_trajectories` is shared with the flying MNIST generator.

Arrays are time first, like the published HDF5 files: (T, N, H, W, 1) uint8.
Group maps hold 1..objects where exactly one object covers a pixel and 0 for
background and overlap.
"""

from typing import NamedTuple

import numpy as np

# Bitmaps from Reichert & Serre (2013), 1 = on.
SQUARE = np.array(
    [
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0, 1, 1],
        [1, 1, 0, 0, 0, 1, 1],
        [1, 1, 0, 0, 0, 1, 1],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1],
    ],
    dtype=np.uint8,
)
UP_TRIANGLE = np.array(
    [
        [int(bit) for bit in row]
        for row in (
            "000001100000",
            "000011110000",
            "000111111000",
            "001110011100",
            "011100001110",
            "111111111111",
            "111111111111",
        )
    ],
    dtype=np.uint8,
)
DOWN_TRIANGLE = UP_TRIANGLE[::-1].copy()
SHAPES = (SQUARE, UP_TRIANGLE, DOWN_TRIANGLE)

MAX_OBJECTS = 255  # group labels are stored as uint8


class Trajectories(NamedTuple):
    """Continuous top-left positions of bouncing objects.

    Attributes:
      positions: (T, N, objects, 2) float64 (row, column), always within
        [0, extent] so that the object stays fully inside the frame.
      velocities: (N, objects, 2) float64 initial velocity in pixels per frame;
        a bounce flips the sign of one component, the magnitude never changes.
    """

    positions: np.ndarray
    velocities: np.ndarray


class ShapeScenes(NamedTuple):
    """What a batch of shape sequences contains, before rendering.

    Attributes:
      shape_ids: (N, objects) int, index into `SHAPES`.
      positions: (T, N, objects, 2) int top-left pixel (row, column) per frame.
    """

    shape_ids: np.ndarray
    positions: np.ndarray


def check_scene_options(*, size, objects, frames, sprite_size, min_speed, max_speed):
    """Raises ValueError naming the first option that cannot make a valid scene.

    Args:
      size: frame height and width in pixels.
      objects: objects per frame.
      frames: frames per sequence.
      sprite_size: the largest sprite side, the smallest possible `size`.
      min_speed, max_speed: speed range in pixels per frame.
    """
    if int(size) < sprite_size:
        raise ValueError(f"size={size} is too small: objects are up to {sprite_size} pixels wide, "
                         f"so size must be >= {sprite_size}")
    if not 1 <= int(objects) <= MAX_OBJECTS:
        raise ValueError(f"objects={objects} must be between 1 and {MAX_OBJECTS} "
                         "(group labels are uint8)")
    if int(frames) < 1:
        raise ValueError(f"frames={frames} must be >= 1")
    if not 0 <= min_speed <= max_speed:
        raise ValueError(f"speed range [min_speed={min_speed}, max_speed={max_speed}] must satisfy "
                         "0 <= min_speed <= max_speed")


def bouncing_trajectories(rng, extent, frames, *, min_speed, max_speed):
    """Samples straight-line motion that reflects off the frame's walls.

    Start positions are uniform over the valid integer positions; the direction
    is uniform on the circle and the speed uniform in [min_speed, max_speed].
    Reflection is computed in closed form: the unbounded position start + t·v is
    folded into [0, extent] by a triangle wave of period 2·extent, which mirrors
    the position and flips the velocity component at each wall.

    Args:
      rng: np.random.Generator.
      extent: (N, objects, 2) int, the largest valid top-left (row, column) of
        each object, i.e. frame size minus object size.
      frames: number of frames T.
      min_speed, max_speed: speed range in pixels per frame.

    Returns:
      Trajectories with positions (T, N, objects, 2) and velocities (N, objects, 2).
    """
    extent = np.asarray(extent, dtype=np.int64)
    start = rng.integers(0, extent + 1).astype(np.float64)  # (N, O, 2)
    angle = rng.uniform(0.0, 2.0 * np.pi, size=extent.shape[:-1])  # (N, O)
    speed = rng.uniform(min_speed, max_speed, size=extent.shape[:-1])  # (N, O)
    velocities = speed[..., None] * np.stack([np.sin(angle), np.cos(angle)], axis=-1)  # (N, O, 2)

    time = np.arange(frames, dtype=np.float64)[:, None, None, None]  # (T, 1, 1, 1)
    unbounded = start + time * velocities  # (T, N, O, 2)
    # An object as large as the frame cannot move; keep the period positive for it.
    period = np.maximum(2 * extent, 1)  # (N, O, 2)
    phase = np.mod(unbounded, period)  # (T, N, O, 2) in [0, 2·extent)
    positions = np.where(extent > 0, extent - np.abs(phase - extent), 0.0)  # (T, N, O, 2)
    return Trajectories(positions=positions, velocities=velocities)


def sample_shape_scenes(rng, n, *, size=28, objects=3, frames=1, min_speed=1.0, max_speed=2.5):
    """Draws shapes (uniformly, with replacement) and their bouncing trajectories.

    Args:
      rng: np.random.Generator.
      n: number of sequences N.
      size: frame height and width.
      objects: shapes per frame.
      frames: frames per sequence T; 1 gives static images.
      min_speed, max_speed: speed range in pixels per frame (unused for T = 1).

    Returns:
      ShapeScenes with shape_ids (N, objects) and integer positions (T, N, objects, 2).
    """
    check_scene_options(size=size, objects=objects, frames=frames,
                        sprite_size=max(max(s.shape) for s in SHAPES),
                        min_speed=min_speed, max_speed=max_speed)
    sprite_shapes = np.array([s.shape for s in SHAPES])  # (3, 2)
    shape_ids = rng.integers(0, len(SHAPES), size=(n, objects))  # (N, O)
    extent = size - sprite_shapes[shape_ids]  # (N, O, 2)
    trajectories = bouncing_trajectories(rng, extent, frames, min_speed=min_speed, max_speed=max_speed)
    # Rounding stays inside [0, extent] because both ends are integers.
    positions = np.rint(trajectories.positions).astype(np.int64)  # (T, N, O, 2)
    return ShapeScenes(shape_ids=shape_ids, positions=positions)


def _sprite_pixel_offsets():
    """(row, column) offsets of every on pixel of each shape, padded to one length.

    Padding repeats a shape's first on pixel: writing True twice to the same
    pixel is harmless, and a common length lets all shapes be pasted at once.

    Returns:
      (len(SHAPES), P, 2) int array, P = the most on pixels of any shape.
    """
    offsets = [np.argwhere(shape) for shape in SHAPES]
    longest = max(len(o) for o in offsets)
    padded = [np.concatenate([o, np.repeat(o[:1], longest - len(o), axis=0)]) for o in offsets]
    return np.stack(padded)  # (3, P, 2)


_SPRITE_OFFSETS = _sprite_pixel_offsets()


def render_object_mask(scenes, obj, size):
    """Renders the pixels covered by one object in every frame of every sequence.

    Args:
      scenes: ShapeScenes.
      obj: which object, 0 <= obj < objects.
      size: frame height and width.

    Returns:
      (T, N, size, size) bool mask.
    """
    frames, n = scenes.positions.shape[:2]
    offsets = _SPRITE_OFFSETS[scenes.shape_ids[:, obj]]  # (N, P, 2)
    pixels = scenes.positions[:, :, obj, None, :] + offsets[None]  # (T, N, P, 2)
    frame_index = np.arange(frames)[:, None, None]  # (T, 1, 1)
    sequence_index = np.arange(n)[None, :, None]  # (1, N, 1)
    mask = np.zeros((frames, n, size, size), dtype=bool)
    mask[frame_index, sequence_index, pixels[..., 0], pixels[..., 1]] = True
    return mask


def compose_binary(object_masks):
    """ORs object masks into frames and labels pixels that exactly one object covers.

    Args:
      object_masks: iterable of (T, N, H, W) bool masks, one per object, in
        object order (the first gets group 1).

    Returns:
      features: (T, N, H, W, 1) uint8 in {0, 1}.
      groups: (T, N, H, W, 1) uint8, object index 1..objects, or 0 for
        background and for pixels covered by two or more objects.
    """
    coverage = None
    owner = None
    for label, mask in enumerate(object_masks, start=1):
        if coverage is None:
            coverage = np.zeros(mask.shape, dtype=np.uint8)  # (T, N, H, W)
            owner = np.zeros(mask.shape, dtype=np.uint8)
        coverage += mask
        owner[mask] = label  # only read where coverage == 1, so the last writer is the only one
    features = (coverage > 0).astype(np.uint8)[..., None]  # (T, N, H, W, 1)
    groups = np.where(coverage == 1, owner, 0).astype(np.uint8)[..., None]  # (T, N, H, W, 1)
    return features, groups


def flying_shapes(rng, n, *, size=28, objects=3, frames=21, min_speed=1.0, max_speed=2.5):
    """Generates binary sequences of shapes flying and bouncing off the walls.

    Each shape starts at a uniformly random position fully inside the frame and
    moves with a random constant velocity (direction uniform, speed uniform in
    [min_speed, max_speed] pixels per frame); positions are continuous and
    rounded for rendering. Shapes pass through each other.

    Args:
      rng: np.random.Generator.
      n: number of sequences N.
      size: frame height and width.
      objects: shapes per frame.
      frames: frames per sequence T (21 gives 20 next-step predictions).
      min_speed, max_speed: speed range in pixels per frame.

    Returns:
      features, groups: (T, N, size, size, 1) uint8, see `compose_binary`.
    """
    scenes = sample_shape_scenes(rng, n, size=size, objects=objects, frames=frames,
                                 min_speed=min_speed, max_speed=max_speed)
    masks = (render_object_mask(scenes, obj, size) for obj in range(objects))
    return compose_binary(masks)


def static_shapes(rng, n, *, size=28, objects=3):
    """Generates static binary images of shapes (Reichert & Serre 2013).

    Args:
      rng: np.random.Generator.
      n: number of images N.
      size: image height and width (28; Tagger used 20).
      objects: shapes per image.

    Returns:
      features, groups: (1, N, size, size, 1) uint8, see `compose_binary`.
    """
    return flying_shapes(rng, n, size=size, objects=objects, frames=1)
