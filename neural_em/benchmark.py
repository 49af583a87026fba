"""Benchmarks: ``python -m neural_em.benchmark`` measures and rewrites BENCHMARKS.md.

    python -m neural_em.benchmark                                   # training, memory, evaluation
    python -m neural_em.benchmark --sections generation --mnist-dir ../shared/data/mnist
    python -m neural_em.benchmark --configs shapes --variants default xla --steps 20
    KERAS_BACKEND=jax python -m neural_em.benchmark --sections training memory --batch-size 64 256
    python -m neural_em.benchmark --quick --output /tmp/bench.md     # tiny sizes: a smoke test

Sections (each a table with the machine, backend, library versions and the command
that reproduces it; a run rewrites the sections it measures and keeps the others):

* ``training``: sequences per second of the real training step, ``training.train``
  (``Model.fit`` with Adam) fed by ``training.make_batches`` from an HDF5 file, for the
  ``shapes`` and ``flying_shapes`` configurations and each variant (XLA, unrolled loop,
  mixed precision), against a hand-written TensorFlow reference of the same computation
  (plain ``tf.Variable``s, one ``tf.function`` train step with ``tf.GradientTape`` and a
  hand-written Adam) fed by the same pipeline, timed in the same process. Before timing,
  the model's weights are copied into the reference and the two losses are compared.
* ``memory``: peak memory of a training step, each configuration in its own process.
* ``evaluation``: AMI of a 10k-sequence × 20-step test set with ``neural_em.metrics``
  against scikit-learn image by image.
* ``generation``: wall time and peak memory of generating each default data set (only on
  request: it takes about ten minutes).
"""

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np

from neural_em import metrics, training
from neural_em.data import registry
from neural_em.data.store import open_dataset
from neural_em.model.nem import NeuralEM, build
from neural_em.model.networks import InnerNetwork, network_config

SECTIONS = ("training", "memory", "evaluation", "generation")
DEFAULT_SECTIONS = ("training", "memory", "evaluation")
DEFAULT_OUTPUT = "BENCHMARKS.md"
LIBRARIES = ("tensorflow", "keras", "jax", "jaxlib", "numpy", "scipy", "scikit-learn", "h5py")
MEMORY_STEPS = 2  # timed steps of a memory probe, after the warm-up
CHECK_SEQUENCES = 8  # sequences of the batch on which the model and reference losses are compared
EVAL_BATCH = 100  # sequences scored together in the evaluation benchmark
LOSS_NAMES = ("loss", "intra_loss", "inter_loss", "upper_bound_loss")
IMAGE_SHAPE = (28, 28, 1)  # the images of both configurations' data sets


# ----------------------------------------------------------------------------------------
# Configurations, variants and sizes
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """A training configuration of the paper (SPEC §5), as the benchmark runs it.

    Attributes:
        dataset: the registry name of its data set.
        network: the inner-network preset.
        k: components K.
        nr_steps: EM steps for static images (sequences take frames − 1).
        frames: frames per sequence (1: static images).
        noise_prob: bit-flip probability.
        gradient_gamma: whether gradients flow through γ.
        loss_step_weights: "last" or "all".
        timed_steps: timed training steps when ``--steps`` is not given (more for the fast
            configuration, so each row times at least a few seconds).
    """

    dataset: str
    network: str
    k: int
    nr_steps: int
    frames: int
    noise_prob: float
    gradient_gamma: bool
    loss_step_weights: str
    timed_steps: int = 5

    @property
    def em_steps(self):
        return self.nr_steps if self.frames == 1 else self.frames - 1


# sacred_configs/static_shapes_rnn_em.yaml and flying_shapes_3obj_k3.yaml.
CONFIGS = {
    "shapes": BenchmarkConfig("shapes", "shapes", k=4, nr_steps=15, frames=1, noise_prob=0.1,
                              gradient_gamma=True, loss_step_weights="last", timed_steps=30),
    "flying_shapes": BenchmarkConfig("flying_shapes_3", "flying_shapes", k=3, nr_steps=20, frames=21,
                                     noise_prob=0.2, gradient_gamma=False, loss_step_weights="all", timed_steps=5),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """How the training step is compiled and run.

    Attributes:
        jit_compile: passed to ``Model.compile`` ("auto" is what ``train`` uses by default).
        unroll: unroll the EM loop instead of a symbolic while loop.
        dtype_policy: Keras dtype policy while the model is built and trained.
    """

    jit_compile: object = "auto"
    unroll: bool = False
    dtype_policy: str = "float32"


VARIANTS = {
    "default": Variant(),
    "xla": Variant(jit_compile=True),
    "unrolled": Variant(unroll=True),
    "mixed_precision": Variant(dtype_policy="mixed_float16"),
    "xla_unrolled": Variant(jit_compile=True, unroll=True),
}
DEFAULT_VARIANTS = ("default", "xla", "unrolled", "mixed_precision")  # xla_unrolled compiles for minutes


class Sizes(NamedTuple):
    """How much work each section does."""

    batch_sizes: tuple
    steps: int  # None: each configuration's timed_steps
    warmup: int
    eval_sequences: int
    eval_frames: int
    sklearn_images: int
    generation_counts: dict  # {} = the data sets' default split sizes
    max_seconds: float = None  # stop timing a training row after this many seconds (None: no limit)


FULL_SIZES = Sizes(batch_sizes=(64,), steps=None, warmup=2, eval_sequences=10_000, eval_frames=21,
                   sklearn_images=2000, generation_counts={}, max_seconds=60.0)
QUICK_SIZES = Sizes(batch_sizes=(4,), steps=2, warmup=1, eval_sequences=6, eval_frames=3, sklearn_images=6,
                    generation_counts=dict(train=20, valid=4, test=4))


def get_config(name, quick=False):
    """The BenchmarkConfig called ``name``; tiny (2 EM steps or 3 frames) when ``quick``.

    Raises:
        ValueError: an unknown name, with the known ones.
    """
    if name not in CONFIGS:
        raise ValueError(f"Unknown benchmark configuration {name!r}; expected one of {sorted(CONFIGS)}.")
    config = CONFIGS[name]
    if quick:
        config = dataclasses.replace(config, nr_steps=2, frames=min(config.frames, 3))
    return config


def timed_steps(sizes, config_name):
    """Timed training steps of one configuration: ``--steps`` if given, else its own default."""
    return sizes.steps or CONFIGS[config_name].timed_steps


def parse_skip(text):
    """'CONFIG:VARIANT' -> (config, variant), for ``--skip``."""
    config, _, variant = text.partition(":")
    if config not in CONFIGS or variant not in VARIANTS:
        raise argparse.ArgumentTypeError(f"expected CONFIG:VARIANT with CONFIG in {sorted(CONFIGS)} and VARIANT in "
                                         f"{sorted(VARIANTS)}, got {text!r}")
    return config, variant


def get_variant(name):
    """The Variant called ``name``; raises ValueError naming the known ones."""
    if name not in VARIANTS:
        raise ValueError(f"Unknown benchmark variant {name!r}; expected one of {sorted(VARIANTS)}.")
    return VARIANTS[name]


# ----------------------------------------------------------------------------------------
# Data and the model's training step
# ----------------------------------------------------------------------------------------


def make_benchmark_data(config, folder, train_sequences):
    """A small data set for ``config``: generated once (seed 0) into ``folder``.

    Args:
        config: a BenchmarkConfig (its data set and frame count).
        folder: where the file goes; an existing file of the same name is reused.
        train_sequences: size of the training split (validation and test get one sequence).
    Returns:
        The file's Path.
    """
    path = Path(folder) / f"{config.dataset}_{config.frames}frames_{train_sequences}.h5"
    if not path.exists():
        registry.generate(config.dataset, out=path, train=train_sequences, valid=1, test=1,
                          frames=config.frames, progress=False)
    return path


def training_batches(config, data_path, batch_size, num_batches):
    """The training pipeline ``train`` is fed with: exactly ``num_batches`` full batches."""
    return training.make_batches(data_path, "training", batch_size, shuffle=True, seed=0, noise_type="bitflip",
                                 noise_prob=config.noise_prob, static_steps=config.nr_steps, drop_remainder=True,
                                 max_sequences=batch_size * num_batches)


def fresh_folder(parent, prefix):
    """A new empty folder: ``train`` would resume from a checkpoint left in a reused one."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def build_model(config, variant, image_shape):
    """A built NeuralEM for ``config`` (call inside the variant's dtype policy)."""
    model = NeuralEM(config.network, image_shape, k=config.k, nr_steps=config.nr_steps,
                     gradient_gamma=config.gradient_gamma, loss_step_weights=config.loss_step_weights,
                     unroll=variant.unroll, seed=0)
    return build(model, frames=config.frames)


@contextlib.contextmanager
def dtype_policy(name):
    """Sets the global Keras dtype policy for the duration of a block."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def out_of_time(finish_times, warmup, max_seconds):
    """Whether the timed steps so far (after ``warmup``) have used up ``max_seconds`` (None: never)."""
    return max_seconds is not None and len(finish_times) > warmup and \
        finish_times[-1] - finish_times[warmup - 1] >= max_seconds


class StepTimer(keras.callbacks.Callback):
    """Records when each training step has finished; stops training once the timed steps
    (after ``warmup``) have taken ``max_seconds``."""

    def __init__(self, warmup=1, max_seconds=None):
        super().__init__()
        self.warmup, self.max_seconds = warmup, max_seconds
        self.finished = []

    def on_train_batch_end(self, batch, logs=None):
        float((logs or {}).get("loss", 0.0))  # waits for the step's result
        self.finished.append(time.perf_counter())
        if out_of_time(self.finished, self.warmup, self.max_seconds):
            self.model.stop_training = True


def seconds_after_warmup(finish_times, warmup):
    """Seconds of the steps after the first ``warmup`` (which include compilation).

    Returns:
        (seconds, number of steps timed).
    """
    timed = len(finish_times) - warmup
    if warmup < 1 or timed < 1:
        raise ValueError(f"need at least one warm-up step and one timed step, got {len(finish_times)} "
                         f"steps with warmup={warmup}")
    return finish_times[-1] - finish_times[warmup - 1], timed


def time_model_training(model, config, variant, data_path, batch_size, warmup, steps, folder, max_seconds=None):
    """Runs ``training.train`` for one epoch of warmup + steps batches and times the last ``steps``.

    Args:
        model: a built NeuralEM (``train`` compiles it with Adam and the variant's jit_compile).
        config, variant: the BenchmarkConfig and Variant.
        data_path: the HDF5 file, with at least (warmup + steps) · batch_size training sequences.
        folder: a new checkpoint folder.
        max_seconds: stop after the timed steps have taken this long (slow variants).
    Returns:
        (sequences per second over the timed steps, number of steps timed).
    """
    batches = training_batches(config, data_path, batch_size, warmup + steps)
    timer = StepTimer(warmup, max_seconds)
    training.train(model, folder, batches, None, max_epochs=1, patience=1, jit_compile=variant.jit_compile,
                   verbose=0, callbacks=[timer])
    seconds, timed = seconds_after_warmup(timer.finished, warmup)
    return batch_size * timed / seconds, timed


# ----------------------------------------------------------------------------------------
# The hand-written reference (TensorFlow only, no Keras)
# ----------------------------------------------------------------------------------------


def _tensorflow():
    """TensorFlow, imported on first use: the rest of the benchmark also runs under JAX."""
    import tensorflow as tf

    return tf


class PlannedLayer(NamedTuple):
    """One layer of an inner network, with its per-sample input and output shapes."""

    name: str  # the Keras layer's name in InnerNetwork ("fc_4", "conv_1", "recurrent", ...)
    spec: dict
    input_shape: tuple
    output_shape: tuple


def _output_shape(spec, shape, num_pixel_values):
    """Per-sample output shape of a feed-forward layer spec applied to ``shape``."""
    kind = spec["name"]
    size = num_pixel_values if spec.get("size") is None else spec.get("size")
    if kind == "input_norm":
        return shape
    if kind == "reshape":
        return (math.prod(shape),) if spec["shape"] == -1 else tuple(spec["shape"])
    if kind == "fc":
        return (size,)
    stride = tuple(spec.get("stride", (1, 1)))
    if kind == "conv":  # "same" padding
        return (-(-shape[0] // stride[0]), -(-shape[1] // stride[1]), size)
    if kind == "r_conv":
        return (shape[0] * stride[0], shape[1] * stride[1], size)
    raise ValueError(f"Unknown layer name {kind!r} in {spec!r}; expected fc, conv, r_conv, reshape or input_norm.")


def layer_plan(network, num_pixel_values):
    """The layers of an RNN-EM inner network in order: encoder, recurrent layer, decoder.

    Args:
        network: a preset name or layer-list dict (see ``networks``).
        num_pixel_values: H·W·C.
    Returns:
        tuple of PlannedLayer, named as InnerNetwork names its Keras layers.
    """
    config = network_config(network)
    if config["use_NEM_formulation"]:
        raise ValueError("The reference implements RNN-EM networks only, not the N-EM formulation.")
    plan, shape = [], (num_pixel_values,)
    named_specs = [(f"{spec['name']}_{i}", spec) for i, spec in enumerate(config["input"])]
    named_specs.append(("recurrent", config["recurrent"][0]))
    offset = len(config["input"])
    named_specs += [(f"{spec['name']}_{offset + i}", spec) for i, spec in enumerate(config["output"])]
    for name, spec in named_specs:
        if name == "recurrent":
            output_shape = (spec["size"],)
        else:
            output_shape = _output_shape(spec, shape, num_pixel_values)
        plan.append(PlannedLayer(name, spec, shape, output_shape))
        shape = output_shape
    return tuple(plan)


def parameter_shapes(plan):
    """{name: shape} of every weight of a planned network, named ``<Keras layer>/<weight>``."""
    shapes = {}
    for layer in plan:
        kind, spec = layer.spec["name"], layer.spec
        in_size, out_size = layer.input_shape[-1], layer.output_shape[-1]
        if layer.name == "recurrent":
            prefix = "recurrent/ln"
            shapes["recurrent/input_kernel/kernel"] = (in_size, out_size)
            shapes["recurrent/input_kernel/bias"] = (out_size,)
            shapes["recurrent/recurrent_kernel/kernel"] = (out_size, out_size)
        elif kind == "fc":
            prefix = f"{layer.name}_ln"
            shapes[f"{layer.name}/kernel"] = (in_size, out_size)
            shapes[f"{layer.name}/bias"] = (out_size,)
        elif kind in ("conv", "r_conv"):
            prefix = f"{layer.name}_ln"
            shapes[f"{layer.name}/kernel"] = tuple(spec.get("kernel", (4, 4))) + (in_size, out_size)
            shapes[f"{layer.name}/bias"] = (out_size,)
        else:
            continue
        if spec.get("ln", False):  # slim's layer norm: a scale and an offset per channel
            shapes[f"{prefix}/gamma"] = (out_size,)
            shapes[f"{prefix}/beta"] = (out_size,)
    return shapes


def model_variables_by_name(model):
    """The inner-network variables of a NeuralEM as {``<Keras layer>/<weight>``: Keras variable}."""
    inner = model.cell.inner
    if not isinstance(inner, InnerNetwork):
        raise ValueError("The reference implements RNN-EM networks only, not the N-EM formulation.")
    named = {}
    for layer in [*inner.encoder, *inner.decoder]:
        for variable in layer.weights:
            named[f"{layer.name}/{variable.name}"] = variable
    recurrent = inner.recurrent
    for layer in (recurrent.input_dense, recurrent.recurrent_dense, recurrent.norm):
        for variable in layer.weights if layer is not None else ():
            named[f"recurrent/{layer.name}/{variable.name}"] = variable
    return named


def reference_parameters(model, plan):
    """Plain tf.Variables holding a copy of the model's inner-network weights.

    Raises:
        ValueError: the model's weights do not match the planned architecture.
    """
    tf = _tensorflow()
    expected = parameter_shapes(plan)
    weights = {name: np.asarray(variable.numpy(), np.float32)
               for name, variable in model_variables_by_name(model).items()}
    found = {name: tuple(value.shape) for name, value in weights.items()}
    if found != expected:
        raise ValueError(f"The model's weights {found} do not match the reference's {expected}.")
    return {name: tf.Variable(value, name=name.replace("/", "__")) for name, value in weights.items()}


@dataclasses.dataclass(frozen=True)
class EMSettings:
    """Everything the reference's EM loop needs besides the weights."""

    plan: tuple
    image_shape: tuple  # (H, W, C)
    k: int
    steps: int
    static: bool  # static images: the same frame at every step
    step_weights: tuple
    gradient_gamma: bool
    inter_weight: float
    pred_init: float

    @property
    def units(self):
        return self.plan_by_name("recurrent").output_shape[0]

    def plan_by_name(self, name):
        return next(layer for layer in self.plan if layer.name == name)


def em_settings(model, frames):
    """The EMSettings of a NeuralEM for batches of ``frames`` frames (Bernoulli pixels only)."""
    settings = model.settings
    if settings["distribution"] != "bernoulli":
        raise ValueError(f"The reference implements Bernoulli pixels only, got {settings['distribution']!r}.")
    image_shape = tuple(settings["image_shape"])
    return EMSettings(
        plan=layer_plan(settings["network"], math.prod(image_shape)), image_shape=image_shape, k=model.k,
        steps=model.steps_for(frames), static=frames == 1,
        step_weights=tuple(float(w) for w in model.step_weights(frames)),
        gradient_gamma=bool(settings["gradient_gamma"]), inter_weight=float(settings["inter_weight"]),
        pred_init=float(settings["pred_init"]),
    )


def _batch_size(x):
    """The first dimension of x: a Python int when static.

    Static sizes keep every shape in the EM loop a compile-time constant, which XLA needs
    for the gradients of reshapes and repeats inside a while loop.
    """
    return x.shape[0] if x.shape[0] is not None else _tensorflow().shape(x)[0]


def _activate(x, name):
    """The activation ``name`` of the layer lists, in TensorFlow."""
    tf = _tensorflow()
    functions = {"sigmoid": tf.sigmoid, "tanh": tf.tanh, "relu": tf.nn.relu, "elu": tf.nn.elu,
                 "softplus": tf.nn.softplus, "exp": tf.exp, "linear": tf.identity}
    if name not in functions:
        raise ValueError(f"Unknown activation {name!r}; expected one of {sorted(functions)}.")
    return functions[name](x)


def _layer_norm(x, gamma, beta, epsilon=1e-12):
    """Layer norm as slim's: statistics over all non-batch axes, scale and offset per channel."""
    tf = _tensorflow()
    mean, variance = tf.nn.moments(x, list(range(1, len(x.shape))), keepdims=True)
    return (x - mean) * tf.math.rsqrt(variance + epsilon) * gamma + beta


def _nearest_upsample(x, shape, factors):
    """Nearest-neighbour resize by integer factors: (N, H, W, C) -> (N, H·f0, W·f1, C).

    A broadcast multiply, not a repeat: inside a while loop XLA cannot compile the gradient
    of a repeat (it reshapes to a run-time shape), nor ResizeNearestNeighborGrad on CPU.
    """
    tf = _tensorflow()
    height, width, channels = shape
    spread = tf.reshape(x, (-1, height, 1, width, 1, channels)) * tf.ones((1, 1, factors[0], 1, factors[1], 1))
    return tf.reshape(spread, (-1, height * factors[0], width * factors[1], channels))  # (N, H, f0, W, f1, C) merged


def _reference_layer(params, layer, x):
    """One feed-forward layer: x (N, *input_shape) -> (N, *output_shape)."""
    tf = _tensorflow()
    spec, kind, name = layer.spec, layer.spec["name"], layer.name
    if kind == "input_norm":
        mean, variance = tf.nn.moments(x, list(range(1, len(x.shape))), keepdims=True)
        return (x - mean) / (tf.sqrt(variance) + 1e-6)
    if kind == "reshape":
        return tf.reshape(x, (-1,) + layer.output_shape)
    if kind == "fc":
        x = tf.matmul(x, params[f"{name}/kernel"]) + params[f"{name}/bias"]
    else:
        stride = tuple(spec.get("stride", (1, 1)))
        if kind == "r_conv":
            x = _nearest_upsample(x, layer.input_shape, stride)
            stride = (1, 1)
        x = tf.nn.conv2d(x, params[f"{name}/kernel"], stride, "SAME") + params[f"{name}/bias"]
    if spec.get("ln", False):
        x = _layer_norm(x, params[f"{name}_ln/gamma"], params[f"{name}_ln/beta"])
    return _activate(x, spec.get("act", "linear"))


def _reference_recurrent(params, spec, x, h):
    """s = W·x + b + R·h; output act(LN(s)), state act(s): x (N, in), h (N, units) -> both (N, units)."""
    tf = _tensorflow()
    pre_activation = (tf.matmul(x, params["recurrent/input_kernel/kernel"]) + params["recurrent/input_kernel/bias"]
                      + tf.matmul(h, params["recurrent/recurrent_kernel/kernel"]))
    state = _activate(pre_activation, spec.get("act", "sigmoid"))
    if not spec.get("ln", False):
        return state, state
    normed = _layer_norm(pre_activation, params["recurrent/ln/gamma"], params["recurrent/ln/beta"])
    return _activate(normed, spec.get("act", "sigmoid")), state


def reference_inner_network(params, plan, x, h):
    """The M-step network: x (N, H·W·C), h (N, units) -> ψ (N, H·W·C), h' (N, units)."""
    for layer in plan:
        if layer.name == "recurrent":
            x, h = _reference_recurrent(params, layer.spec, x, h)
        else:
            x = _reference_layer(params, layer, x)
    return x, h


def _bernoulli_e_step(psi, target):
    """γ (B, K, H, W, 1) from ψ (B, K, H, W, C) and the clean target (B, 1, H, W, C)."""
    tf = _tensorflow()
    likelihood = target * psi + (1.0 - target) * (1.0 - psi)  # (B, K, H, W, C)
    likelihood = tf.reduce_sum(likelihood, axis=-1, keepdims=True) + 1e-6  # (B, K, H, W, 1)
    return likelihood / tf.reduce_sum(likelihood, axis=1, keepdims=True)


def _reference_step_losses(psi, gamma, target, settings):
    """Eq. 5 and the upper bound of one EM step: [total, intra, inter, upper bound], (4,)."""
    tf = _tensorflow()
    batch = tf.cast(_batch_size(psi), psi.dtype)
    if not settings.gradient_gamma:
        gamma = tf.stop_gradient(gamma)
    clipped = tf.clip_by_value(psi, 1e-6, 1.0 - 1e-6)
    cross_entropy = -(target * tf.math.log(clipped) + (1.0 - target) * tf.math.log(1.0 - clipped))
    prior = 1e-6  # Bernoulli(0), clipped
    kl_to_prior = prior * tf.math.log(prior / clipped) + (1.0 - prior) * tf.math.log((1.0 - prior) / (1.0 - clipped))
    intra = tf.reduce_sum(cross_entropy * gamma) / batch
    inter = tf.reduce_sum(kl_to_prior * (1.0 - gamma)) / batch
    best = tf.clip_by_value(tf.reduce_max(psi, axis=1, keepdims=True), 1e-6, 1.0 - 1e-6)  # (B, 1, H, W, C)
    bound = -tf.reduce_sum(target * tf.math.log(best) + (1.0 - target) * tf.math.log(1.0 - best)) / batch
    return tf.stack([intra + settings.inter_weight * inter, intra, inter, bound])


def _reference_em_step(params, settings, noisy, target, theta, psi, gamma):
    """One RNN-EM step; noisy and target (B, H, W, C), θ (B·K, units), ψ (B, K, H, W, C), γ (B, K, H, W, 1)."""
    tf = _tensorflow()
    batch, num_values = _batch_size(psi), math.prod(settings.image_shape)
    masked_gamma = gamma if settings.gradient_gamma else tf.stop_gradient(gamma)
    deltas = masked_gamma * (noisy[:, None] - psi)  # (B, K, H, W, C)
    flat_psi, theta = reference_inner_network(params, settings.plan,
                                              tf.reshape(deltas, (batch * settings.k, num_values)), theta)
    psi = tf.reshape(flat_psi, (batch, settings.k) + settings.image_shape)  # (B, K, H, W, C)
    return theta, psi, _bernoulli_e_step(psi, target[:, None])


def reference_loss_terms(params, settings, features, noisy, initial_gamma, unroll=False):
    """The EM loop and the loss, as NeuralEM's ``loss_terms`` computes them.

    Args:
        params: reference_parameters.
        settings: EMSettings.
        features, noisy: (B, T, H, W, C) clean and noisy batches; for static images noisy may
            hold one copy per EM step, (B, S, H, W, C).
        initial_gamma: (B, K, H, W, 1) the starting γ.
        unroll: a Python loop over the EM steps instead of a tf.while_loop.
    Returns:
        dict of scalars named as LOSS_NAMES, averaged over steps with the step weights.
    """
    tf = _tensorflow()
    batch = _batch_size(features)
    inputs, targets = (noisy, features) if settings.static else (noisy[:, :-1], features[:, 1:])  # (B, S, H, W, C)
    step_weights = tf.constant(settings.step_weights, features.dtype)

    input_frames = inputs.shape[1]

    def step(t, theta, psi, gamma, totals):
        frame = 0 if settings.static else t
        noisy_frame = 0 if input_frames == 1 else t
        theta, psi, gamma = _reference_em_step(params, settings, inputs[:, noisy_frame], targets[:, frame], theta, psi,
                                               gamma)
        totals = totals + step_weights[t] * _reference_step_losses(psi, gamma, targets[:, frame][:, None], settings)
        return t + 1, theta, psi, gamma, totals

    state = (0, tf.zeros((batch * settings.k, settings.units)),
             tf.fill((batch, settings.k) + settings.image_shape, settings.pred_init),
             tf.convert_to_tensor(initial_gamma, features.dtype), tf.zeros(4))
    if unroll:
        for _ in range(settings.steps):
            state = step(*state)
    else:
        state = tf.while_loop(lambda t, *_: t < settings.steps, step, state, maximum_iterations=settings.steps)
    totals = state[-1] / sum(settings.step_weights)
    return dict(zip(LOSS_NAMES, tf.unstack(totals)))


def random_initial_gamma(batch, settings, seed):
    """γ = |N(0, 1)| normalised over K (1 when K = 1): (B, K, H, W, 1), stateless."""
    tf = _tensorflow()
    shape = (batch, settings.k) + settings.image_shape[:2] + (1,)
    if settings.k == 1:
        return tf.ones(shape)
    gamma = tf.abs(tf.random.stateless_normal(shape, seed))
    return gamma / tf.reduce_sum(gamma, axis=1, keepdims=True)


class ReferenceAdam:
    """Adam with Keras' defaults (ε = 1e-7), written out on plain variables."""

    def __init__(self, variables, learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        tf = _tensorflow()
        self.variables = list(variables)
        self.learning_rate, self.beta_1, self.beta_2, self.epsilon = learning_rate, beta_1, beta_2, epsilon
        self.first_moments = [tf.Variable(tf.zeros_like(v)) for v in self.variables]
        self.second_moments = [tf.Variable(tf.zeros_like(v)) for v in self.variables]
        self.iterations = tf.Variable(0.0)

    def apply(self, gradients):
        tf = _tensorflow()
        self.iterations.assign_add(1.0)
        t = self.iterations
        rate = self.learning_rate * tf.sqrt(1.0 - self.beta_2**t) / (1.0 - self.beta_1**t)
        for variable, gradient, m, v in zip(self.variables, gradients, self.first_moments, self.second_moments):
            m.assign_add((gradient - m) * (1.0 - self.beta_1))
            v.assign_add((tf.square(gradient) - v) * (1.0 - self.beta_2))
            variable.assign_sub(rate * m / (tf.sqrt(v) + self.epsilon))


def make_reference_train_step(params, settings, *, jit_compile, unroll, learning_rate=1e-3, seed=0):
    """One tf.function train step: random γ, EM loop, loss, gradients, Adam.

    Returns:
        ``train_step(features, noisy) -> dict of loss terms``.
    """
    tf = _tensorflow()
    variables = list(params.values())
    optimizer = ReferenceAdam(variables, learning_rate)
    step_counter = tf.Variable(0, dtype=tf.int64)

    @tf.function(jit_compile=jit_compile)
    def train_step(features, noisy):
        step_counter.assign_add(1)
        seed_pair = tf.stack([tf.constant(seed, tf.int64), step_counter])
        initial_gamma = random_initial_gamma(_batch_size(features), settings, seed_pair)
        with tf.GradientTape() as tape:
            terms = reference_loss_terms(params, settings, features, noisy, initial_gamma, unroll)
        optimizer.apply(tape.gradient(terms["loss"], variables))
        return terms

    return train_step


def time_reference_training(model, config, data_path, batch_size, warmup, steps, *, jit_compile, unroll,
                            max_seconds=None):
    """Trains the reference (starting from the model's weights) on the same pipeline; sequences per second.

    Stops after the timed steps have taken ``max_seconds``, as the model's timing does.
    """
    settings = em_settings(model, config.frames)
    train_step = make_reference_train_step(reference_parameters(model, settings.plan), settings,
                                           jit_compile=jit_compile, unroll=unroll)
    finished = []
    for batch in training_batches(config, data_path, batch_size, warmup + steps):
        float(train_step(batch["features"], batch["noisy"])["loss"])  # waits for the step's result
        finished.append(time.perf_counter())
        if out_of_time(finished, warmup, max_seconds):
            break
    seconds, timed = seconds_after_warmup(finished, warmup)
    return batch_size * timed / seconds


def fixed_initial_gamma(model, batch_size, seed=0):
    """A random initial γ as the cell draws it, from numpy: (B, K, H, W, 1) float32."""
    rng = np.random.default_rng(seed)
    gamma = np.abs(rng.standard_normal((batch_size, model.k) + tuple(model.image_shape[:2]) + (1,)))
    return (gamma / gamma.sum(axis=1, keepdims=True)).astype(np.float32)


def compare_losses(model, batch, unroll=False, seed=0):
    """The model's loss terms and the reference's for the same weights, batch and initial γ.

    Args:
        model: a built NeuralEM (RNN-EM, Bernoulli pixels).
        batch: dict with 'features' and 'noisy', (B, T, H, W, C).
        unroll: the reference's loop form.
    Returns:
        dict: 'model' and 'reference' (dicts of floats named as LOSS_NAMES) and
        'relative_difference' of the total loss.
    """
    features = np.asarray(batch["features"], np.float32)
    noisy = np.asarray(batch["noisy"], np.float32)
    gamma = fixed_initial_gamma(model, features.shape[0], seed)  # (B, K, H, W, 1)
    inputs = {"features": features, "noisy": noisy, "initial_gamma": gamma}
    model_terms = model.loss_terms(inputs, model(inputs, training=False))
    settings = em_settings(model, features.shape[1])
    params = reference_parameters(model, settings.plan)
    reference_terms = reference_loss_terms(params, settings, features, noisy, gamma, unroll)
    model_values = {name: float(model_terms[name]) for name in LOSS_NAMES}
    reference_values = {name: float(reference_terms[name]) for name in LOSS_NAMES}
    difference = abs(model_values["loss"] - reference_values["loss"]) / abs(reference_values["loss"])
    return {"model": model_values, "reference": reference_values, "relative_difference": difference}


# ----------------------------------------------------------------------------------------
# Training throughput
# ----------------------------------------------------------------------------------------


def training_flops(config, batch_size):
    """Floating-point operations of one training step from its matmuls and convolutions.

    Counts 2 per multiply-add of the dense, recurrent and convolution layers, forward
    and backward (3 × forward), for every sequence, component and EM step. Element-wise
    work (E-step, loss, layer norm, activations) is left out.
    """
    plan = layer_plan(config.network, math.prod(IMAGE_SHAPE))
    forward = 0
    for layer in plan:
        kind, in_size, out_size = layer.spec["name"], layer.input_shape[-1], layer.output_shape[-1]
        if layer.name == "recurrent":
            forward += 2 * (in_size + out_size) * out_size
        elif kind == "fc":
            forward += 2 * in_size * out_size
        elif kind in ("conv", "r_conv"):
            kernel = math.prod(layer.spec.get("kernel", (4, 4)))
            forward += 2 * math.prod(layer.output_shape) * kernel * in_size
    return 3 * forward * batch_size * config.k * config.em_steps


@dataclasses.dataclass
class TrainingResult:
    """One row of the training table."""

    config: str
    variant: str
    batch_size: int
    steps: int
    model_rate: float = None  # sequences per second
    reference_rate: float = None
    jit_compile: bool = None
    loss_difference: float = None  # relative, before training
    flops: int = 0  # per batch
    notes: list = dataclasses.field(default_factory=list)

    @property
    def ratio(self):
        if self.model_rate is None or self.reference_rate is None:
            return None
        return self.model_rate / self.reference_rate


# Lines of TensorFlow's error messages that say nothing about the cause.
_BOILERPLATE = ("Graph execution error", "Detected at node", "File ", "Stack trace", "[[", "tf2xla",
                "XLA compilation requires", "Run with", "defined at", "<stack traces unavailable>")


def _error_text(error, limit=200):
    """'Type: the first informative line of the message', short enough for a table cell."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    informative = [line for line in lines if not line.startswith(_BOILERPLATE)] or lines or [""]
    message = re.sub(r"`[^`]*/([^/`]+)`", r"`…/\1`", informative[0])  # long TF node paths -> last part
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text.replace("|", "/")[:limit]


def benchmark_training_variant(config_name, variant_name, data_path, batch_size, sizes, workdir, reference_cache,
                               quick=False):
    """Measures the model and (on TensorFlow) the reference for one configuration and variant.

    Args:
        reference_cache: {(config, batch, jit, unroll): sequences per second}, shared across
            variants so each reference form is timed once.
    Returns:
        TrainingResult, with errors recorded in its notes.
    """
    config, variant = get_config(config_name, quick), get_variant(variant_name)
    steps = timed_steps(sizes, config_name)
    result = TrainingResult(config_name, variant_name, batch_size, steps,
                            flops=training_flops(config, batch_size))
    keras.backend.clear_session()
    on_tensorflow = keras.backend.backend() == "tensorflow"
    with dtype_policy(variant.dtype_policy):
        model = build_model(config, variant, IMAGE_SHAPE)
        model.compile(jit_compile=variant.jit_compile)  # resolves "auto"; train compiles again with Adam
        result.jit_compile = bool(model.jit_compile)
        try:
            if on_tensorflow:
                check_batch = next(iter(training_batches(config, data_path, CHECK_SEQUENCES, 1)))
                result.loss_difference = compare_losses(model, check_batch)["relative_difference"]
            folder = fresh_folder(workdir, f"checkpoints_{config_name}_{variant_name}_{batch_size}_")
            result.model_rate, result.steps = time_model_training(model, config, variant, data_path, batch_size,
                                                                  sizes.warmup, steps, folder, sizes.max_seconds)
            if result.steps < steps:
                result.notes.append(f"timing stopped after {sizes.max_seconds:g} s")
        except Exception as error:  # a variant that fails is a result too
            result.notes.append(f"model: {_error_text(error)}")
    if on_tensorflow:
        result.reference_rate = _cached_reference_rate(reference_cache, result, model, config, variant, data_path,
                                                       sizes)
        if variant.dtype_policy != "float32":
            result.notes.append("reference in float32")
    else:
        result.notes.append("no reference: it is written in TensorFlow")
    return result


def _cached_reference_rate(cache, result, model, config, variant, data_path, sizes):
    """The reference's sequences per second for the result's settings, timed once per form (None if it failed)."""
    key = (result.config, result.batch_size, result.jit_compile, variant.unroll)
    if key not in cache:
        try:
            cache[key] = time_reference_training(model, config, data_path, result.batch_size, sizes.warmup,
                                                 result.steps, jit_compile=result.jit_compile, unroll=variant.unroll,
                                                 max_seconds=sizes.max_seconds)
        except Exception as error:
            cache[key] = None
            result.notes.append(f"reference: {_error_text(error)}")
    return cache[key]


def benchmark_training(config_names, variant_names, sizes, workdir, quick=False, log=print, skip=()):
    """TrainingResults for every configuration, batch size and variant.

    Args:
        skip: (config, variant) pairs not to run; their rows say so.
    """
    results, reference_cache = [], {}
    for config_name in config_names:
        config = get_config(config_name, quick)
        train_sequences = max(sizes.batch_sizes) * (sizes.warmup + timed_steps(sizes, config_name))
        data_path = make_benchmark_data(config, workdir, max(train_sequences, CHECK_SEQUENCES))
        for batch_size in sizes.batch_sizes:
            for variant_name in variant_names:
                if (config_name, variant_name) in skip:
                    results.append(TrainingResult(config_name, variant_name, batch_size, 0,
                                                  flops=training_flops(config, batch_size),
                                                  notes=["not run (`--skip`)"]))
                    continue
                log(f"training: {config_name}, batch {batch_size}, {variant_name}")
                results.append(benchmark_training_variant(config_name, variant_name, data_path, batch_size, sizes,
                                                          workdir, reference_cache, quick))
    return results


# ----------------------------------------------------------------------------------------
# Peak memory (one process per configuration)
# ----------------------------------------------------------------------------------------


def _proc_status_bytes(field):
    """A memory field of /proc/self/status ('VmRSS', 'VmHWM') in bytes; None without /proc."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    kilobytes = next((int(line.split()[1]) for line in lines if line.startswith(f"{field}:")), None)
    return None if kilobytes is None else kilobytes * 1024


def _peak_rss_bytes():
    """This process's peak resident set size.

    VmHWM belongs to the process's own address space. ru_maxrss is not used on Linux: a
    child inherits its parent's peak through fork and exec, which would count the
    benchmark's own TensorFlow in every probe.
    """
    peak = _proc_status_bytes("VmHWM")
    if peak is None:  # macOS: ru_maxrss in bytes
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak


def _device_peak_bytes():
    """Peak bytes allocated on the accelerator, or None on CPU (or when not reported)."""
    if keras.backend.backend() == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() if jax.devices()[0].platform != "cpu" else None
        return (stats or {}).get("peak_bytes_in_use")
    if keras.backend.backend() == "tensorflow":
        tf = _tensorflow()
        if tf.config.list_physical_devices("GPU"):
            return tf.config.experimental.get_memory_info("GPU:0")["peak"]
    return None


def memory_probe(request):
    """Runs a few training steps of one configuration and reports memory (in this process).

    Args:
        request: dict with 'config', 'quick', 'data_path', 'batch_size', 'warmup', 'folder'.
    Returns:
        dict of bytes: 'rss_before' (after building the model, before the first step),
        'peak_rss' (the process's peak), 'device_peak' (or None).
    """
    config = get_config(request["config"], request["quick"])
    model = build_model(config, VARIANTS["default"], IMAGE_SHAPE)
    rss_before = _proc_status_bytes("VmRSS")
    time_model_training(model, config, VARIANTS["default"], request["data_path"], request["batch_size"],
                        request["warmup"], MEMORY_STEPS, request["folder"])
    return {"rss_before": rss_before, "peak_rss": _peak_rss_bytes(), "device_peak": _device_peak_bytes()}


def memory_probe_main(request_path):
    """Entry point of the probe process: reads the request JSON, writes ``<request>.result.json``."""
    request = json.loads(Path(request_path).read_text())
    result = memory_probe(request)
    Path(f"{request_path}.result.json").write_text(json.dumps(result))


def measure_memory(config_name, data_path, batch_size, sizes, workdir, quick=False):
    """Peak memory of training one configuration, in a fresh process.

    Returns:
        the probe's dict, or {'error': text} when the probe failed.
    """
    request_path = Path(workdir) / f"memory_{config_name}_{batch_size}.json"
    request = dict(config=config_name, quick=quick, data_path=str(data_path), batch_size=batch_size,
                   warmup=sizes.warmup,
                   folder=str(fresh_folder(workdir, f"memory_checkpoints_{config_name}_{batch_size}_")))
    request_path.write_text(json.dumps(request))
    code = "import sys; from neural_em.benchmark import memory_probe_main; memory_probe_main(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, str(request_path)], capture_output=True, text=True)
    if done.returncode != 0:
        last_line = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"probe exited with {done.returncode}: {last_line}"[:200].replace("|", "/")}
    return json.loads(Path(f"{request_path}.result.json").read_text())


def benchmark_memory(config_names, sizes, workdir, quick=False, log=print):
    """[(config, batch size, probe dict)] for every configuration and batch size."""
    rows = []
    for config_name in config_names:
        config = get_config(config_name, quick)
        train_sequences = max(sizes.batch_sizes) * (sizes.warmup + MEMORY_STEPS)
        data_path = make_benchmark_data(config, workdir, train_sequences)
        for batch_size in sizes.batch_sizes:
            log(f"memory: {config_name}, batch {batch_size}")
            rows.append((config_name, batch_size, measure_memory(config_name, data_path, batch_size, sizes, workdir,
                                                                 quick)))
    return rows


# ----------------------------------------------------------------------------------------
# Evaluation: AMI against scikit-learn
# ----------------------------------------------------------------------------------------


def synthetic_gamma(groups, k, rng, flip_fraction=0.1):
    """γ of an imperfect grouping: object n mostly in component n mod K, some pixels elsewhere.

    Args:
        groups: int (B, T, H, W, 1) true groups.
        k: components K.
        rng: numpy Generator.
    Returns:
        float32 (B, T, K, H, W, 1), summing to 1 over K.
    """
    labels = groups[..., 0] % k  # (B, T, H, W)
    flipped = rng.random(labels.shape) < flip_fraction
    labels = np.where(flipped, rng.integers(0, k, labels.shape), labels)
    gamma = 0.2 * rng.random(labels.shape + (k,), dtype=np.float32) + 0.8 * np.eye(k, dtype=np.float32)[labels]
    gamma /= gamma.sum(axis=-1, keepdims=True)  # (B, T, H, W, K)
    return np.moveaxis(gamma, -1, 2)[..., None]


def _flat_labels(groups, gamma):
    """(B, T, H, W, 1) groups and γ -> true labels, predicted labels and scored-pixel mask, each (B·T, H·W)."""
    images = groups.shape[0] * groups.shape[1]
    true_labels = groups.reshape(images, -1)
    pred_labels = gamma.reshape(images, gamma.shape[2], -1).argmax(axis=1)
    return true_labels, pred_labels, true_labels != 0


def _sklearn_ami(true_labels, pred_labels, mask):
    """scikit-learn's AMI of each image, one call per image: (B,)."""
    from sklearn.metrics import adjusted_mutual_info_score

    return np.asarray([adjusted_mutual_info_score(t[m], p[m], average_method="max")
                       for t, p, m in zip(true_labels, pred_labels, mask)])


def _timed(function, *args, **kwargs):
    """(function's result, seconds it took)."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def evaluation_batches(sizes, workdir, k):
    """(groups (B, T−1, H, W, 1), synthetic γ (B, T−1, K, H, W, 1)) of a generated flying-shapes test set.

    The groups are those of the frames a model predicts (frames 1 .. T − 1), EVAL_BATCH
    sequences at a time.
    """
    path = Path(workdir) / f"eval_flying_shapes_3_{sizes.eval_sequences}x{sizes.eval_frames}.h5"
    if not path.exists():
        registry.generate("flying_shapes_3", out=path, train=1, valid=1, test=sizes.eval_sequences,
                          frames=sizes.eval_frames, progress=False)
    rng = np.random.default_rng(0)
    with open_dataset(path) as dataset:
        reader = dataset.split("test")
        for start in range(0, reader.num_sequences, EVAL_BATCH):
            groups = reader.groups(slice(start, start + EVAL_BATCH))[:, 1:]
            yield groups, synthetic_gamma(groups, k, rng)


def benchmark_evaluation(sizes, workdir, k=3, log=print):
    """Times neural_em's AMI (and all grouping scores) on a flying-shapes test set against scikit-learn.

    scikit-learn scores the first ``sizes.sklearn_images`` images; its time for the
    whole set is extrapolated from them.

    Returns:
        dict of the measured figures (see ``evaluation_section``).
    """
    log("evaluation: generating and scoring the test set")
    totals = dict(images=0, ami_seconds=0.0, grouping_seconds=0.0, sklearn_images=0, sklearn_seconds=0.0,
                  largest_difference=0.0)
    for groups, gamma in evaluation_batches(sizes, workdir, k):
        true_labels, pred_labels, mask = _flat_labels(groups, gamma)  # (B·(T−1), H·W) each
        ami, seconds = _timed(metrics.adjusted_mutual_info, true_labels, pred_labels, mask, average_method="max")
        totals["ami_seconds"] += seconds
        totals["grouping_seconds"] += _timed(metrics.grouping_scores, groups, gamma, average_method="max")[1]
        totals["images"] += len(true_labels)
        n = min(sizes.sklearn_images - totals["sklearn_images"], len(true_labels))
        if n > 0:
            sklearn_ami, seconds = _timed(_sklearn_ami, true_labels[:n], pred_labels[:n], mask[:n])
            totals["sklearn_images"] += n
            totals["sklearn_seconds"] += seconds
            totals["largest_difference"] = max(totals["largest_difference"], float(np.abs(sklearn_ami - ami[:n]).max()))
    totals["sklearn_total"] = totals["sklearn_seconds"] * totals["images"] / totals["sklearn_images"]
    return dict(sequences=sizes.eval_sequences, steps=sizes.eval_frames - 1, k=k, **totals)


# ----------------------------------------------------------------------------------------
# Data generation
# ----------------------------------------------------------------------------------------


# Runs a module like `python -m` and writes the process's peak RSS (VmHWM, in kB) to the
# file named by its first argument. The child reports it because its wait4 ru_maxrss would
# include the benchmark process's own memory, inherited through fork and exec.
_PEAK_RSS_WRAPPER = """
import runpy, sys
report, sys.argv = sys.argv[1], sys.argv[2:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
finally:
    status = open("/proc/self/status").read().splitlines()
    open(report, "w").write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
"""


def _run_measured(module_args, folder, name):
    """Runs ``python -m <module_args>``; returns (return code, wall seconds, peak RSS bytes or None, log)."""
    report, log_path = Path(folder) / f"{name}.peak_kb", Path(folder) / f"{name}.log"
    with open(log_path, "w") as log_file:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _PEAK_RSS_WRAPPER, str(report), *module_args],
                              stdout=log_file, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
    peak = int(report.read_text()) * 1024 if report.exists() else None
    return done.returncode, seconds, peak, log_path.read_text()


def generation_command(name, out, counts, mnist_dir):
    """The arguments of ``python -m neural_em.data generate`` for one data set."""
    command = ["neural_em.data", "generate", name, "--no-progress", "--out", str(out)]
    for option, value in counts.items():
        command += [f"--{option}", str(value)]
    if registry.get_spec(name).uses_mnist:
        command += ["--mnist-dir", str(mnist_dir)]
    return command


def benchmark_generation(names, sizes, workdir, mnist_dir=None, log=print):
    """Generates each data set in its own process; a row of figures (or an error) per set."""
    rows = []
    for name in names:
        options = registry.resolve_options(name, **sizes.generation_counts)
        row = dict(name=name, sequences=sum(options[o] for o in registry.SPLIT_COUNT_OPTIONS),
                   frames=options["frames"], size=options["size"])
        rows.append(row)
        if registry.get_spec(name).uses_mnist and mnist_dir is None:
            row["error"] = "not measured: needs --mnist-dir"
            continue
        log(f"generation: {name}")
        out = Path(workdir) / f"generated_{name}.h5"
        code, seconds, peak, log_text = _run_measured(
            generation_command(name, out, sizes.generation_counts, mnist_dir), workdir, f"generate_{name}")
        if code != 0:
            last_line = (log_text.strip().splitlines() or ["no output"])[-1]
            row["error"] = f"exit {code}: {last_line}"[:160].replace("|", "/")
            continue
        row.update(seconds=seconds, file_bytes=out.stat().st_size, peak_rss=peak)
        out.unlink()
    return rows


# ----------------------------------------------------------------------------------------
# The environment
# ----------------------------------------------------------------------------------------


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _accelerator():
    """'GPU: <name>' when the backend computes on a GPU, else 'CPU'."""
    if keras.backend.backend() == "jax":
        import jax

        device = jax.devices()[0]
        return "CPU" if device.platform == "cpu" else f"GPU: {device.device_kind}"
    if keras.backend.backend() == "tensorflow":
        tf = _tensorflow()
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            return f"GPU: {tf.config.experimental.get_device_details(gpus[0]).get('device_name', 'unknown')}"
    return "CPU"


def environment():
    """Where and with what the numbers are measured."""
    versions = {}
    for library in LIBRARIES:
        try:
            versions[library] = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            continue
    return dict(cpu=_cpu_model(), cores=os.cpu_count(), python=platform.python_version(),
                system=f"{platform.system()} {platform.release()}", backend=keras.backend.backend(),
                device=_accelerator(), versions=versions,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def platform_name(env):
    """'TensorFlow on CPU', 'JAX on GPU', ...: the part of a heading that says where."""
    backend = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}.get(env["backend"], env["backend"])
    return f"{backend} on {'GPU' if env['device'].startswith('GPU') else 'CPU'}"


def describe_environment(env, load_before, load_after):
    """A markdown paragraph: machine, backend, versions, date and load."""
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items())
    return (f"Measured {env['date']} on {env['cpu']} ({env['cores']} cores, {env['system']}), device "
            f"{env['device']}, Keras backend `{env['backend']}`; Python {env['python']}, {versions}. "
            f"Load average (1 min) {load_before:.2f} before the measurements (near 0 on an idle machine) and "
            f"{load_after:.2f} after.")


# ----------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------


def markdown_table(headers, rows, right_aligned=()):
    """A markdown table; columns whose index is in ``right_aligned`` are right-aligned (numbers)."""
    rule = ["---:" if i in right_aligned else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _number(value, digits=1):
    return "—" if value is None else f"{value:,.{digits}f}"


def _megabytes(value):
    return "—" if value is None else f"{value / 1e6:,.0f}"


def training_heading(env):
    return f"Training throughput: {platform_name(env)}"


def memory_heading(env):
    return f"Peak memory of a training step: {platform_name(env)}"


EVALUATION_HEADING = "Evaluation: AMI against scikit-learn"
GENERATION_HEADING = "Data generation"


NUMERIC_TRAINING_COLUMNS = ("batch", "timed steps", "neural_em (seq/s)", "reference (seq/s)", "ratio",
                            "loss rel. diff.", "GFLOP/s", "of peak")


def _columns(headers, names):
    """Indices of the headers in ``names``."""
    return tuple(i for i, header in enumerate(headers) if header in names)


def training_section(results, env, context, peak_tflops=None):
    """The body of the training-throughput section."""
    headers = ["configuration", "variant", "batch", "timed steps", "XLA", "neural_em (seq/s)",
               "reference (seq/s)", "ratio", "loss rel. diff.", "GFLOP/s"]
    if peak_tflops:
        headers.append("of peak")
    headers.append("notes")
    rows = []
    for r in results:
        achieved = None if r.model_rate is None else r.flops * r.model_rate / r.batch_size / 1e9
        xla = {None: "—", True: "yes", False: "no"}[r.jit_compile]
        row = [f"`{r.config}`", r.variant, r.batch_size, r.steps or "—", xla,
               _number(r.model_rate), _number(r.reference_rate), _number(r.ratio, 2),
               "—" if r.loss_difference is None else f"{r.loss_difference:.1e}", _number(achieved)]
        if peak_tflops:
            row.append("—" if achieved is None else f"{achieved / (peak_tflops * 1e3):.1%}")
        row.append("; ".join(r.notes))
        rows.append(row)
    flops = {r.config: r.flops / r.batch_size * 64 / 1e12 for r in results}
    flop_text = ", ".join(f"`{name}` {value:.3f} TFLOP" for name, value in flops.items())
    return "\n\n".join([
        "Sequences per second of `training.train` (`Model.fit`, Adam, batches from "
        "`training.make_batches` over an HDF5 file generated with seed 0), timed over the steps after the "
        "warm-up steps (which include compilation), against the hand-written reference in the same process: "
        "plain `tf.Variable`s, the same EM loop, loss (Eq. 5) and reported loss terms in one "
        "`tf.function` train step with `tf.GradientTape` and Adam, fed by the same pipeline, with the model's XLA "
        "setting and loop form. Ratio = neural_em / reference (≥ 1.0 is the target). Loss rel. diff.: the two "
        "losses on one batch of 8 sequences with the model's weights copied into the reference, before "
        "training. Variants: `default` (what `train` runs: `jit_compile=\"auto\"`, which Keras resolves to no "
        "XLA on a CPU-only machine), `xla` (`jit_compile=True`), `unrolled` (`unroll=True`), "
        "`mixed_precision` (Keras policy `mixed_float16`; the reference stays float32), `xla_unrolled` (both "
        "XLA and `unroll=True`). Failures are results too: the notes give the error. A row stops timing once its "
        "timed steps have taken `--max-seconds` (60 s by default), so slow variants time fewer steps.",
        markdown_table(headers, rows, right_aligned=_columns(headers, NUMERIC_TRAINING_COLUMNS)),
        f"GFLOP/s counts the dense, recurrent and convolution layers only, forward and backward; per batch of "
        f"64: {flop_text}." + ("" if peak_tflops else " The fraction of the device's peak is given where "
                               "`--peak-tflops` states the peak."),
        describe_environment(env, *context["load"]),
        f"Command:\n\n```\n{context['command']}\n```\n\nOne row: the same with `--configs C --variants V`.",
    ])


def memory_section(rows, env, context):
    """The body of the peak-memory section."""
    table_rows = []
    for config_name, batch_size, probe in rows:
        if "error" in probe:
            table_rows.append([f"`{config_name}`", batch_size, "—", "—", "—", "—", probe["error"]])
            continue
        growth = None if probe["rss_before"] is None else probe["peak_rss"] - probe["rss_before"]
        table_rows.append([f"`{config_name}`", batch_size, _megabytes(probe["rss_before"]),
                           _megabytes(probe["peak_rss"]), _megabytes(growth), _megabytes(probe["device_peak"]), ""])
    headers = ["configuration", "batch", "RSS before training (MB)", "peak RSS (MB)", "growth (MB)",
               "device peak (MB)", "notes"]
    return "\n\n".join([
        "Each configuration trains in a fresh process (`training.train`, default variant, "
        f"warm-up steps + {MEMORY_STEPS} steps). RSS before training: resident memory after building the model, "
        "before the first step; peak RSS: the process's high-water mark (`VmHWM`); growth = peak − before, i.e. what "
        "compiling and running the training step adds. Device peak: `peak_bytes_in_use` of JAX's device "
        "(or TensorFlow's GPU memory info) on a GPU; on a CPU there is none: "
        "`tf.config.experimental.get_memory_info('CPU:0')` reports 0. MB = 10^6 bytes.",
        markdown_table(headers, table_rows, right_aligned=(1, 2, 3, 4, 5)),
        describe_environment(env, *context["load"]),
        f"Command:\n\n```\n{context['command']}\n```",
    ])


def evaluation_section(result, env, context):
    """The body of the evaluation section."""
    sklearn_rate = result["sklearn_seconds"] / max(result["sklearn_images"], 1)
    rows = [
        ["`metrics.adjusted_mutual_info`", f"{result['images']:,}", _number(result["ami_seconds"], 2),
         _number(result["sklearn_total"] / result["ami_seconds"], 0)],
        ["`metrics.grouping_scores` (AMI, ARI, confidence)", f"{result['images']:,}",
         _number(result["grouping_seconds"], 2), _number(result["sklearn_total"] / result["grouping_seconds"], 0)],
        [f"scikit-learn `adjusted_mutual_info_score`, image by image", f"{result['sklearn_images']:,} timed",
         f"{_number(result['sklearn_total'], 1)} (extrapolated)", "1"],
    ]
    return "\n\n".join([
        f"AMI (`average_method=\"max\"`) of {result['sequences']:,} flying-shapes test sequences "
        f"(`flying_shapes_3`, generated with seed 0) × {result['steps']} steps = {result['images']:,} images of "
        f"28×28 against a synthetic γ with K = {result['k']} (object n mostly in component n mod K, 10% of the "
        f"pixels elsewhere), scored {EVAL_BATCH} sequences at a time; pixels of group 0 are ignored. "
        f"scikit-learn scored the first {result['sklearn_images']:,} images ({sklearn_rate * 1e3:.2f} ms each); "
        "its time for the whole set is extrapolated from them. Largest difference between the two AMIs on those "
        f"images: {result['largest_difference']:.1e}.",
        markdown_table(["scorer", "images", "seconds", "speed-up over scikit-learn"], rows, right_aligned=(1, 2, 3)),
        describe_environment(env, *context["load"]),
        f"Command:\n\n```\n{context['command']}\n```",
    ])


def generation_section(rows, env, context):
    """The body of the data-generation section."""
    table_rows = []
    for row in rows:
        measured = [_number(row.get("seconds")), _megabytes(row.get("file_bytes")), _megabytes(row.get("peak_rss"))]
        table_rows.append([f"`{row['name']}`", f"{row['sequences']:,}", row["frames"], row["size"], *measured,
                           row.get("error", "")])
    headers = ["data set", "sequences", "frames", "size (px)", "seconds", "file size (MB)", "peak memory (MB)",
               "notes"]
    return "\n\n".join([
        "Wall time of generating each data set with `python -m neural_em.data generate` (seed 0), one data set "
        "after another, each in its own process; peak memory is that process's peak resident set size "
        "(`VmHWM`, reported by the process itself). Files are HDF5 written by `store.DatasetWriter` (uint8, "
        "gzip level 1; the time includes "
        "compression and the content hash). MB = 10^6 bytes.",
        markdown_table(headers, table_rows, right_aligned=(1, 2, 3, 4, 5, 6)),
        describe_environment(env, *context["load"]),
        f"Command:\n\n```\n{context['command']}\n```",
    ])


def not_measured(command, reason=""):
    """The body of a section that no run has measured yet."""
    return f"Not measured yet{reason}. To measure it:\n\n```\n{command}\n```"


def _gpu_placeholder_command(section):
    options = "--variants default unrolled mixed_precision --peak-tflops PEAK " if section == "training" else ""
    python = "KERAS_BACKEND=jax .venv/bin/python -m neural_em.benchmark"
    return f"{python} --sections {section} {options}--batch-size 64 256"


GPU_TRAINING_HEADING = "Training throughput: JAX on GPU"
GPU_MEMORY_HEADING = "Peak memory of a training step: JAX on GPU"
NO_GPU = (": no GPU was available where the benchmark has run so far; run it on a GPU machine with JAX "
          "installed for CUDA (PEAK = the GPU's peak TFLOP/s for the arithmetic used, so the table gives the "
          "fraction of peak reached)")
PREAMBLE = (
    "# Benchmarks\n\nWritten by `python -m neural_em.benchmark` (see its `--help`). Each section says where, when "
    "and with what it was measured and gives the command that reproduces it; a run rewrites only the sections "
    "it measures and keeps the others as they were. Timings taken while other work shared the machine (see "
    "the load average) are upper bounds.\n"
)


def placeholder_sections():
    """{heading: (command that measures it, why it is missing)} of the sections every BENCHMARKS.md lists."""
    python = ".venv/bin/python -m neural_em.benchmark"
    return {
        "Training throughput: TensorFlow on CPU": (f"{python} --sections training", ""),
        GPU_TRAINING_HEADING: (_gpu_placeholder_command("training"), NO_GPU),
        "Peak memory of a training step: TensorFlow on CPU": (f"{python} --sections memory", ""),
        GPU_MEMORY_HEADING: (_gpu_placeholder_command("memory"), NO_GPU),
        EVALUATION_HEADING: (f"{python} --sections evaluation", ""),
        GENERATION_HEADING: (f"{python} --sections generation --mnist-dir ../shared/data/mnist", ""),
    }


def read_sections(path):
    """{heading: body} of the ``## `` sections of a markdown file ({} if there is none)."""
    path = Path(path)
    if not path.exists():
        return {}
    sections, heading, lines = {}, None, []
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            if heading is not None:
                sections[heading] = "\n".join(lines).strip()
            heading, lines = line[3:].strip(), []
        elif heading is not None:
            lines.append(line)
    if heading is not None:
        sections[heading] = "\n".join(lines).strip()
    return sections


def merge_sections(existing, measured):
    """The document's sections: measured ones replace, others are kept, missing ones get a placeholder.

    Returns:
        list of (heading, body): the standard sections first, in their order, then any others.
    """
    placeholders = placeholder_sections()
    order = list(placeholders) + [h for h in [*existing, *measured] if h not in placeholders]
    merged = []
    for heading in dict.fromkeys(order):
        if heading in measured:
            merged.append((heading, measured[heading]))
        elif heading in existing:
            merged.append((heading, existing[heading]))
        else:
            merged.append((heading, not_measured(*placeholders[heading])))
    return merged


def write_document(path, sections):
    """Writes the preamble and the sections, atomically."""
    text = PREAMBLE + "".join(f"\n## {heading}\n\n{body}\n" for heading, body in sections)
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def build_parser():
    """The command-line options."""
    parser = argparse.ArgumentParser(prog="python -m neural_em.benchmark",
                                     description="Measure neural_em and rewrite BENCHMARKS.md.")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(DEFAULT_SECTIONS),
                        help="what to measure (default: training memory evaluation; generation takes ~10 min)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                        help="training configurations")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(DEFAULT_VARIANTS),
                        help=f"training-step variants (default: {' '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--batch-size", nargs="+", type=_positive_int, help="batch sizes (default: 64)")
    parser.add_argument("--steps", type=_positive_int,
                        help="timed training steps (default: " +
                             ", ".join(f"{name} {config.timed_steps}" for name, config in CONFIGS.items()) + ")")
    parser.add_argument("--max-seconds", type=_positive_float,
                        help="stop timing a training row once its timed steps took this long (default: 60; "
                             "the row then times fewer steps and says so)")
    parser.add_argument("--skip", nargs="+", type=parse_skip, default=[], metavar="CONFIG:VARIANT",
                        help="training rows not to run, e.g. flying_shapes:mixed_precision (float16 is "
                             "emulated on CPUs and takes minutes per step)")
    parser.add_argument("--warmup", type=_positive_int, help="untimed first steps, with compilation (default: 2)")
    parser.add_argument("--eval-sequences", type=_positive_int, help="test sequences scored (default: 10000)")
    parser.add_argument("--sklearn-images", type=_positive_int, help="images scikit-learn scores (default: 2000)")
    parser.add_argument("--datasets", nargs="+", choices=list(registry.DATASETS), default=list(registry.DATASETS),
                        help="data sets whose generation is timed (default: all)")
    parser.add_argument("--mnist-dir", help="MNIST IDX folder for generating the MNIST sets")
    parser.add_argument("--peak-tflops", type=_positive_float,
                        help="the device's peak TFLOP/s, to report the fraction reached")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that the benchmark runs")
    parser.add_argument("--output", help=f"the markdown file to rewrite (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--workdir", help="folder for the generated data and checkpoints (default: a temporary one)")
    return parser


def resolve_sizes(args):
    """The Sizes of a run: the defaults (full or quick) with the options given."""
    base = QUICK_SIZES if args.quick else FULL_SIZES
    given = dict(batch_sizes=tuple(args.batch_size) if args.batch_size else None, steps=args.steps,
                 warmup=args.warmup, eval_sequences=args.eval_sequences, sklearn_images=args.sklearn_images,
                 max_seconds=args.max_seconds)
    return base._replace(**{name: value for name, value in given.items() if value is not None})


def section_command(args, section, sizes):
    """The command line that reproduces one section of this run."""
    prefix = [] if keras.backend.backend() == "tensorflow" else [f"KERAS_BACKEND={keras.backend.backend()}"]
    parts = [*prefix, ".venv/bin/python", "-m", "neural_em.benchmark", "--sections", section]
    if section in ("training", "memory"):
        parts += ["--configs", *args.configs, "--batch-size", *map(str, sizes.batch_sizes), "--warmup",
                  str(sizes.warmup)]
    if section == "training":
        parts += ["--variants", *args.variants] + (["--steps", str(sizes.steps)] if sizes.steps else [])
        parts += ["--skip", *(f"{c}:{v}" for c, v in args.skip)] if args.skip else []
        parts += ["--max-seconds", f"{args.max_seconds:g}"] if args.max_seconds else []
        parts += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
    if section == "evaluation":
        parts += ["--eval-sequences", str(sizes.eval_sequences), "--sklearn-images", str(sizes.sklearn_images)]
    if section == "generation":
        parts += ["--datasets", *args.datasets] if args.datasets != list(registry.DATASETS) else []
        parts += ["--mnist-dir", args.mnist_dir] if args.mnist_dir else []
    parts += ["--quick"] if args.quick else []
    return shlex.join(parts)


def run_section(section, args, sizes, workdir):
    """The measurements of one section (what its ``*_section`` function renders)."""
    if section == "training":
        return benchmark_training(args.configs, args.variants, sizes, workdir, args.quick, skip=set(args.skip))
    if section == "memory":
        return benchmark_memory(args.configs, sizes, workdir, args.quick)
    if section == "evaluation":
        return benchmark_evaluation(sizes, workdir)
    return benchmark_generation(args.datasets, sizes, workdir, args.mnist_dir)


def render_section(section, measurements, env, context, peak_tflops=None):
    """(heading, markdown body) of one measured section."""
    if section == "training":
        return training_heading(env), training_section(measurements, env, context, peak_tflops)
    if section == "memory":
        return memory_heading(env), memory_section(measurements, env, context)
    if section == "evaluation":
        return EVALUATION_HEADING, evaluation_section(measurements, env, context)
    return GENERATION_HEADING, generation_section(measurements, env, context)


def measure_section(section, args, sizes, workdir, env):
    """Measures one section; returns (heading, markdown body)."""
    command = section_command(args, section, sizes)
    load_before = os.getloadavg()[0]
    measurements = run_section(section, args, sizes, workdir)
    context = {"command": command, "load": (load_before, os.getloadavg()[0])}
    heading, body = render_section(section, measurements, env, context, args.peak_tflops)
    if args.quick:
        body = "Quick run (`--quick`): tiny sizes that check the benchmark runs; not a measurement.\n\n" + body
    return heading, body


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick and args.output is None:
        parser.error(f"--quick writes figures of tiny runs; pass --output to a file other than {DEFAULT_OUTPUT}")
    output = Path(args.output or DEFAULT_OUTPUT)
    sizes = resolve_sizes(args)
    env = environment()
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="neural_em_bench_"))
        Path(workdir).mkdir(parents=True, exist_ok=True)
        measured = dict(measure_section(section, args, sizes, workdir, env) for section in args.sections)
    write_document(output, merge_sections(read_sections(output), measured))
    print(f"Wrote {output} ({', '.join(measured)}).")


if __name__ == "__main__":
    main()
