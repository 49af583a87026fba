"""Inner networks of the EM cell (the M-step), built from layer lists.

As in the published code, a network is three lists of layer specs: ``input``
(feed-forward encoder of the masked deltas), ``recurrent`` (one recurrent layer
whose hidden state is θ) and ``output`` (feed-forward decoder to ψ). A new
architecture is a configuration change, not new code.

A layer spec is a dict with a ``name`` and its arguments:

* ``{'name': 'input_norm'}``: normalise each sample to zero mean, unit std.
* ``{'name': 'reshape', 'shape': (H, W, C)}`` or ``{'shape': -1}`` (flatten).
* ``{'name': 'fc', 'size': 512, 'act': 'elu', 'ln': True}``; ``size: None``
  means "the number of pixel values" (H·W·C), so the decoder fits any image.
* ``{'name': 'conv', 'size': 32, 'kernel': (4, 4), 'stride': (2, 2), ...}``.
* ``{'name': 'r_conv', ...}``: nearest-neighbour resize by ``stride`` then a
  stride-1 convolution (not a transposed convolution: no checkerboards).
* ``{'name': 'rnn', 'size': 250, 'act': 'sigmoid', 'ln': False}``:
  the state h' = act(W·x + R·h + b) and, to the decoder, act(LN(W·x + R·h + b)):
  as in the published code, layer norm acts on the output, not on the
  state that recurs.

``'ln': True`` puts a :class:`LayerNorm` between a layer and its activation,
as the published code does (``slim.layer_norm``: one mean and variance per
sample, a scale and an offset per channel).

``use_NEM_formulation: True`` selects N-EM: the real gradient-ascent M-step
with tied weights (:class:`NEMStep`), not an RNN under another name.
"""

import copy
import math

import keras
from keras import ops

ACTIVATIONS = ("sigmoid", "tanh", "relu", "elu", "linear", "softplus", "exp")

# The four networks of the paper's appendix A, as the published code lists them.
PRESETS = {
    "shapes": {
        "use_NEM_formulation": False,
        "input": [],
        "recurrent": [{"name": "rnn", "size": 250, "act": "sigmoid", "ln": False}],
        "output": [{"name": "fc", "size": None, "act": "sigmoid", "ln": False}],
    },
    "NEM": {
        "use_NEM_formulation": True,
        "input": [],
        "recurrent": [{"name": "rnn", "size": 250, "act": "sigmoid", "ln": False}],
        "output": [{"name": "fc", "size": None, "act": "sigmoid", "ln": False}],
    },
    "flying_shapes": {
        "use_NEM_formulation": False,
        "input": [
            {"name": "reshape", "shape": (28, 28, 1)},
            {"name": "conv", "size": 32, "act": "elu", "stride": (2, 2), "kernel": (4, 4), "ln": True},
            {"name": "conv", "size": 64, "act": "elu", "stride": (2, 2), "kernel": (4, 4), "ln": True},
            {"name": "reshape", "shape": -1},
            {"name": "fc", "size": 512, "act": "elu", "ln": True},
        ],
        "recurrent": [{"name": "rnn", "size": 100, "act": "sigmoid", "ln": True}],
        "output": [
            {"name": "fc", "size": 512, "act": "relu", "ln": True},
            {"name": "fc", "size": 7 * 7 * 64, "act": "relu", "ln": True},
            {"name": "reshape", "shape": (7, 7, 64)},
            {"name": "r_conv", "size": 32, "act": "relu", "stride": (2, 2), "kernel": (4, 4), "ln": True},
            {"name": "r_conv", "size": 1, "act": "sigmoid", "stride": (2, 2), "kernel": (4, 4), "ln": False},
            {"name": "reshape", "shape": -1},
        ],
    },
    "flying_mnist": {
        "use_NEM_formulation": False,
        "input": [
            {"name": "input_norm"},
            {"name": "reshape", "shape": (24, 24, 1)},
            {"name": "conv", "size": 32, "act": "elu", "stride": (2, 2), "kernel": (4, 4), "ln": True},
            {"name": "conv", "size": 64, "act": "elu", "stride": (2, 2), "kernel": (4, 4), "ln": True},
            {"name": "conv", "size": 128, "act": "elu", "stride": (2, 2), "kernel": (4, 4), "ln": True},
            {"name": "reshape", "shape": -1},
            {"name": "fc", "size": 512, "act": "elu", "ln": True},
        ],
        "recurrent": [{"name": "rnn", "size": 250, "act": "sigmoid", "ln": True}],
        "output": [
            {"name": "fc", "size": 512, "act": "relu", "ln": True},
            {"name": "fc", "size": 3 * 3 * 128, "act": "relu", "ln": True},
            {"name": "reshape", "shape": (3, 3, 128)},
            {"name": "r_conv", "size": 64, "act": "relu", "stride": (2, 2), "kernel": (4, 4), "ln": True},
            {"name": "r_conv", "size": 32, "act": "relu", "stride": (2, 2), "kernel": (4, 4), "ln": True},
            {"name": "r_conv", "size": 1, "act": "linear", "stride": (2, 2), "kernel": (4, 4), "ln": False},
            {"name": "reshape", "shape": -1},
        ],
    },
}


def network_config(name_or_config):
    """Returns a deep copy of a preset (by name) or validates a layer-list dict."""
    if isinstance(name_or_config, str):
        if name_or_config not in PRESETS:
            raise ValueError(
                f"Unknown network {name_or_config!r}; expected one of {sorted(PRESETS)} "
                "or a dict with 'input', 'recurrent' and 'output' layer lists."
            )
        return copy.deepcopy(PRESETS[name_or_config])
    config = copy.deepcopy(dict(name_or_config))
    for key in ("input", "recurrent", "output"):
        if key not in config:
            raise ValueError(f"Network config lacks the layer list {key!r}; got keys {sorted(config)}.")
    if len(config["recurrent"]) != 1 or config["recurrent"][0].get("name", "rnn") != "rnn":
        raise ValueError(
            f"Network config needs exactly one recurrent layer {{'name': 'rnn', ...}}; got {config['recurrent']!r}."
        )
    config.setdefault("use_NEM_formulation", False)
    return config


def _activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; expected one of {ACTIVATIONS}.")
    return keras.activations.get(name)


@keras.saving.register_keras_serializable(package="neural_em")
class InputNorm(keras.layers.Layer):
    """Normalises every sample to zero mean and unit std over all its values."""

    def call(self, x):
        axes = tuple(range(1, len(x.shape)))
        mean = ops.mean(x, axis=axes, keepdims=True)  # (N, 1)
        std = ops.std(x, axis=axes, keepdims=True)  # (N, 1)
        return (x - mean) / (std + 1e-6)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="neural_em")
class LayerNorm(keras.layers.Layer):
    """Layer norm as the published code's ``slim.layer_norm``.

    Statistics over all of a sample's values (for a feature map: H, W and C
    together), then a learnt scale and offset per channel. Keras'
    ``LayerNormalization(axis=(-3, -2, -1))`` would instead learn a scale and
    offset per position, and adds ε = 1e-3 where slim adds 1e-12.

    Args:
        epsilon: added to the variance.
    """

    def __init__(self, epsilon=1e-12, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        channels = input_shape[-1]
        self.gamma = self.add_weight(shape=(channels,), initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=(channels,), initializer="zeros", name="beta")

    def call(self, x):
        dtype = x.dtype
        x = ops.cast(x, "float32")  # under mixed precision ε = 1e-12 would vanish in float16
        axes = tuple(range(1, len(x.shape)))
        mean = ops.mean(x, axis=axes, keepdims=True)  # (N, 1, …, 1)
        variance = ops.var(x, axis=axes, keepdims=True)  # (N, 1, …, 1)
        normed = (x - mean) * ops.rsqrt(variance + self.epsilon)  # (N, …, C)
        return ops.cast(normed * ops.cast(self.gamma, "float32") + ops.cast(self.beta, "float32"), dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="neural_em")
class NearestUpsample(keras.layers.Layer):
    """Nearest-neighbour resize by integer factors, as a broadcast multiply.

    Unlike ``UpSampling2D`` (a repeat), its gradient compiles under XLA inside the
    EM loop, whose batch size is not static.

    Args:
        factors: (f_h, f_w).
    """

    def __init__(self, factors, **kwargs):
        super().__init__(**kwargs)
        self.factors = tuple(int(f) for f in factors)

    def call(self, x):
        _, height, width, channels = x.shape
        f_h, f_w = self.factors
        spread = ops.reshape(x, (-1, height, 1, width, 1, channels)) * ops.ones((1, 1, f_h, 1, f_w, 1), x.dtype)
        return ops.reshape(spread, (-1, height * f_h, width * f_w, channels))  # (N, H·f_h, W·f_w, C)

    def compute_output_shape(self, input_shape):
        n, height, width, channels = input_shape
        return (n, height * self.factors[0], width * self.factors[1], channels)

    def get_config(self):
        return {**super().get_config(), "factors": self.factors}


@keras.saving.register_keras_serializable(package="neural_em")
class RecurrentLayer(keras.layers.Layer):
    """The RNN layer of the published networks (TF1's ``BasicRNNCell`` in wrappers).

    With s = W·x + R·h + b, the new state is act(s) and the output passed on
    to the decoder is act(LN(s)). The published code wraps the cell so that
    layer norm touches its output only; the state that recurs is not
    normalised. Without layer norm, output and state are the same.

    Args:
        units: size of the hidden state θ.
        activation: name of the activation (sigmoid in every paper network).
        layer_norm: whether to layer-normalise the output's pre-activation.

    Call:
        x: (N, inputs); h: previous state, (N, units).
    Returns:
        (output (N, units), new state (N, units)).
    """

    def __init__(self, units, activation="sigmoid", layer_norm=False, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.activation_name = activation
        self.layer_norm = layer_norm
        self.activation = _activation(activation)
        self.input_dense = keras.layers.Dense(units, name="input_kernel")
        self.recurrent_dense = keras.layers.Dense(units, use_bias=False, name="recurrent_kernel")
        self.norm = LayerNorm(name="ln") if layer_norm else None

    def build(self, input_shape):
        # Glorot-uniform over the joint [W; R] matrix, as TF1's BasicRNNCell of the published
        # code initialises it (fan-in = inputs + units), rather than over W and R apart.
        limit = math.sqrt(6.0 / (input_shape[-1] + 2 * self.units))
        for dense in (self.input_dense, self.recurrent_dense):
            dense.kernel_initializer = keras.initializers.RandomUniform(-limit, limit)
        self.input_dense.build(input_shape)
        self.recurrent_dense.build((input_shape[0], self.units))
        if self.norm is not None:
            self.norm.build((input_shape[0], self.units))

    def call(self, x, h):
        pre_activation = self.input_dense(x) + self.recurrent_dense(h)  # (N, units)
        state = self.activation(pre_activation)  # (N, units)
        if self.norm is None:
            return state, state
        return self.activation(self.norm(pre_activation)), state

    def get_config(self):
        return {**super().get_config(), "units": self.units, "activation": self.activation_name,
                "layer_norm": self.layer_norm}


def _feed_forward_layer(spec, num_pixel_values, index):
    """One layer spec -> a list of Keras layers (layer, [layer norm], [activation])."""
    kind = spec.get("name")
    prefix = f"{kind}_{index}"
    if kind == "input_norm":
        return [InputNorm(name=prefix)]
    if kind == "reshape":
        shape = spec["shape"]
        return [keras.layers.Flatten(name=prefix) if shape == -1 else keras.layers.Reshape(tuple(shape), name=prefix)]
    if kind not in ("fc", "conv", "r_conv"):
        raise ValueError(
            f"Unknown layer name {kind!r} in network spec {spec!r}; "
            "expected 'fc', 'conv', 'r_conv', 'reshape' or 'input_norm'."
        )
    size = num_pixel_values if spec.get("size") is None else spec["size"]
    layers = []
    if kind == "fc":
        layers.append(keras.layers.Dense(size, name=prefix))
    else:
        stride = tuple(spec.get("stride", (1, 1)))
        kernel = tuple(spec.get("kernel", (4, 4)))
        if kind == "r_conv":
            layers.append(NearestUpsample(stride, name=f"{prefix}_up"))
            stride = (1, 1)
        layers.append(keras.layers.Conv2D(size, kernel, strides=stride, padding="same", name=prefix))
    if spec.get("ln", False):
        layers.append(LayerNorm(name=f"{prefix}_ln"))
    layers.append(keras.layers.Activation(_activation(spec.get("act", "linear")), name=f"{prefix}_act"))
    return layers


@keras.saving.register_keras_serializable(package="neural_em")
class InnerNetwork(keras.layers.Layer):
    """RNN-EM's M-step: encoder -> recurrent layer (θ) -> decoder (ψ).

    Args:
        config: a layer-list dict (see the module docstring) or a preset name.
        num_pixel_values: H·W·C, the size of the flat input and output.

    Call:
        x: masked deltas, (N, H·W·C) with N = batch · K.
        h: previous hidden state θ, (N, units).
    Returns:
        (ψ (N, H·W·C), new θ (N, units)).
    """

    def __init__(self, config, num_pixel_values, **kwargs):
        super().__init__(**kwargs)
        self.config = network_config(config)
        self.num_pixel_values = num_pixel_values
        rnn = self.config["recurrent"][0]
        self.units = rnn["size"]
        self.encoder = [layer for i, spec in enumerate(self.config["input"])
                        for layer in _feed_forward_layer(spec, num_pixel_values, i)]
        self.recurrent = RecurrentLayer(rnn["size"], rnn.get("act", "sigmoid"), rnn.get("ln", False),
                                        name="recurrent")
        self.decoder = [layer for i, spec in enumerate(self.config["output"])
                        for layer in _feed_forward_layer(spec, num_pixel_values, len(self.config["input"]) + i)]

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.encoder:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        self.recurrent.build(shape)
        shape = (shape[0], self.units)
        for layer in self.decoder:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        if tuple(shape[1:]) != (self.num_pixel_values,):
            raise ValueError(
                f"The network's output has shape {tuple(shape[1:])} per sample, but the images have "
                f"{self.num_pixel_values} pixel values; make the decoder end in a flat layer of that size."
            )

    def call(self, x, h, training=None):
        for layer in self.encoder:
            x = layer(x)
        y, h_new = self.recurrent(x, h)  # (N, units) each
        for layer in self.decoder:
            y = layer(y)
        return y, h_new  # (N, H·W·C), (N, units)

    def get_config(self):
        return {**super().get_config(), "config": self.config, "num_pixel_values": self.num_pixel_values}


@keras.saving.register_keras_serializable(package="neural_em")
class NEMStep(keras.layers.Layer):
    """N-EM's generalised M-step: one gradient-ascent step on the expected log-likelihood.

    With ψ = f(W·σ(h)) and the γ-masked deltas m = γ ⊙ (x − ψ) as input,
    ∂/∂h Σ_i γ_i log P(x_i | ψ_i) = σ'(h) ⊙ (Wᵀ m), hence
    h ← h + η · σ(h)(1 − σ(h)) ⊙ (Wᵀ m), the encoder being the decoder's transpose.
    As in the published cell, W is Glorot-uniform and there is no output bias;
    η starts at ``initial_step_size`` (the published code drew it from U(−√3, √3);
    ``network.step_size='uniform'`` does the same).

    Args:
        config: a layer-list dict with ``use_NEM_formulation`` (or the preset "NEM"):
            the recurrent size is the number of units, the last output layer's
            activation the output non-linearity.
        num_pixel_values: H·W·C.
        initial_step_size: starting value of the learned η.
    """

    def __init__(self, config, num_pixel_values, initial_step_size=1.0, **kwargs):
        super().__init__(**kwargs)
        self.config = network_config(config)
        self.num_pixel_values = num_pixel_values
        self.initial_step_size = initial_step_size
        self.units = self.config["recurrent"][0]["size"]
        self.output_activation = _activation(self.config["output"][-1].get("act", "sigmoid"))

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(self.num_pixel_values, self.units), name="kernel", initializer="glorot_uniform")
        self.step_size = self.add_weight(
            shape=(), name="step_size", initializer=keras.initializers.Constant(self.initial_step_size))

    def call(self, x, h, training=None):
        gradient = ops.matmul(x, self.kernel)  # (N, units): Wᵀ m
        sigma_h = ops.sigmoid(h)
        h_new = h + self.step_size * sigma_h * (1.0 - sigma_h) * gradient  # (N, units)
        logits = ops.matmul(ops.sigmoid(h_new), ops.transpose(self.kernel))  # (N, H·W·C)
        return self.output_activation(logits), h_new

    def get_config(self):
        return {**super().get_config(), "config": self.config, "num_pixel_values": self.num_pixel_values,
                "initial_step_size": self.initial_step_size}


def build_inner_network(config, num_pixel_values, name="inner_network"):
    """Builds the M-step network from a preset name or a layer-list dict."""
    config = network_config(config)
    if config["use_NEM_formulation"]:
        return NEMStep(config, num_pixel_values, initial_step_size=config.get("step_size", 1.0), name=name)
    return InnerNetwork(config, num_pixel_values, name=name)
