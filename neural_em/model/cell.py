"""The EM cell: one step of RNN-EM / N-EM as a Keras RNN cell.

One step (SPEC §1):
  1. deltas     = x̃ − ψ                        (noisy input minus each component's prediction)
  2. masked     = γ ⊙ deltas                    (optionally with γ's gradient stopped)
  3. ψ', θ'     = f_φ(masked, θ)                (the M-step; K copies with shared weights)
  4. γ'         = P(z | x, ψ')                  (the E-step against the clean target)

The K components are folded into the batch for the inner network. States and
outputs are flat so the cell fits ``keras.layers.RNN``; :func:`split_states`
and :func:`split_outputs` restore their shapes.
"""

import math

import keras
from keras import ops

from neural_em.model.networks import build_inner_network

DISTRIBUTIONS = ("bernoulli", "gaussian")


def e_step(psi, target, distribution="bernoulli", e_sigma=0.25, epsilon=1e-6):
    """Posterior of each pixel's component, with uniform mixing weights.

    Args:
        psi: predictions, (B, K, H, W, C).
        target: the clean image, (B, 1, H, W, C).
        distribution: "bernoulli" (ψ is a mean) or "gaussian" (mean, fixed σ = e_sigma).
        e_sigma: standard deviation of the Gaussian, used as a temperature.
        epsilon: added to each likelihood so no γ is exactly 0.
    Returns:
        γ, (B, K, H, W, 1), summing to 1 over K.
    """
    if distribution == "bernoulli":
        likelihood = target * psi + (1.0 - target) * (1.0 - psi)  # (B, K, H, W, C)
    elif distribution == "gaussian":
        norm = 1.0 / math.sqrt(2.0 * math.pi * e_sigma**2)
        likelihood = norm * ops.exp(-ops.square(target - psi) / (2.0 * e_sigma**2))  # (B, K, H, W, C)
    else:
        raise ValueError(f"Unknown pixel distribution {distribution!r}; expected one of {DISTRIBUTIONS}.")
    # The published code sums (not multiplies) the channel likelihoods.
    likelihood = ops.sum(likelihood, axis=-1, keepdims=True) + epsilon  # (B, K, H, W, 1)
    return likelihood / ops.sum(likelihood, axis=1, keepdims=True)


@keras.saving.register_keras_serializable(package="neural_em")
class EMCell(keras.layers.Layer):
    """A Keras RNN cell for N-EM / RNN-EM.

    Args:
        network: inner-network preset name or layer-list dict (see ``networks``).
        image_shape: (H, W, C) of the images.
        k: number of components K.
        distribution: "bernoulli" (binary images) or "gaussian" (grey images).
        pred_init: initial ψ.
        e_sigma: σ of the Gaussian E-step.
        gradient_gamma: if False, stop gradients through γ in the masked input.
        seed: seed of the random initial γ.

    Call:
        inputs: (B, 2·H·W·C), the flat noisy input x̃ and clean target x, concatenated.
        states: [θ (B, K·units), ψ (B, K·H·W·C), γ (B, K·H·W)].
    Returns:
        (output (B, output_size) = flat [γ', ψ', θ'], new states).
    """

    def __init__(self, network, image_shape, k, distribution="bernoulli", pred_init=0.0, e_sigma=0.25,
                 gradient_gamma=True, seed=None, **kwargs):
        super().__init__(**kwargs)
        if int(k) < 1:
            raise ValueError(f"k (the number of components) must be >= 1, got {k}.")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"Unknown pixel distribution {distribution!r}; expected one of {DISTRIBUTIONS}.")
        self.network = network
        self.image_shape = tuple(int(d) for d in image_shape)
        self.k = int(k)
        self.distribution = distribution
        self.pred_init = float(pred_init)
        self.e_sigma = float(e_sigma)
        self.gradient_gamma = bool(gradient_gamma)
        self.seed = seed
        self.num_pixels = math.prod(self.image_shape[:2])
        self.num_pixel_values = math.prod(self.image_shape)
        self.inner = build_inner_network(network, self.num_pixel_values)
        self.units = self.inner.units
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def state_size(self):
        return [self.k * self.units, self.k * self.num_pixel_values, self.k * self.num_pixels]

    @property
    def output_size(self):
        return sum(self.state_size)

    def build(self, input_shape):
        self.inner.build((None, self.num_pixel_values))

    def get_initial_state(self, batch_size=None, gamma=None):
        """θ = 0, ψ = pred_init, γ = |N(0, 1)| normalised over K (1 when K = 1).

        Args:
            batch_size: B.
            gamma: optional fixed initial γ, (B, K, H, W, 1), instead of the random one.
        """
        theta = ops.zeros((batch_size, self.k * self.units))
        psi = ops.full((batch_size, self.k * self.num_pixel_values), self.pred_init)
        if gamma is not None:
            gamma = ops.reshape(gamma, (batch_size, self.k * self.num_pixels))
        elif self.k == 1:
            gamma = ops.ones((batch_size, self.num_pixels))
        else:
            gamma = ops.abs(keras.random.normal((batch_size, self.k, self.num_pixels), seed=self.seed_generator))
            gamma = gamma / ops.sum(gamma, axis=1, keepdims=True)  # (B, K, H·W)
            gamma = ops.reshape(gamma, (batch_size, self.k * self.num_pixels))
        return [theta, psi, gamma]

    def call(self, inputs, states, training=None):
        batch = ops.shape(inputs)[0]
        image = (batch, 1) + self.image_shape
        noisy = ops.reshape(inputs[:, : self.num_pixel_values], image)  # (B, 1, H, W, C)
        target = ops.reshape(inputs[:, self.num_pixel_values:], image)  # (B, 1, H, W, C)
        theta, psi, gamma = split_states(states, self.k, self.image_shape)

        if not self.gradient_gamma:
            gamma = ops.stop_gradient(gamma)
        masked_deltas = gamma * (noisy - psi)  # (B, K, H, W, C)

        flat_deltas = ops.reshape(masked_deltas, (batch * self.k, self.num_pixel_values))
        flat_theta = ops.reshape(theta, (batch * self.k, self.units))
        flat_psi, flat_theta = self.inner(flat_deltas, flat_theta, training=training)  # (B·K, H·W·C), (B·K, units)
        # Under mixed precision the inner network returns float16; the states stay in the cell's dtype.
        flat_psi = ops.cast(flat_psi, self.compute_dtype)
        flat_theta = ops.cast(flat_theta, self.compute_dtype)

        new_psi = ops.reshape(flat_psi, (batch, self.k) + self.image_shape)  # (B, K, H, W, C)
        new_gamma = e_step(new_psi, target, self.distribution, self.e_sigma)  # (B, K, H, W, 1)
        new_states = [
            ops.reshape(flat_theta, (batch, self.k * self.units)),
            ops.reshape(new_psi, (batch, self.k * self.num_pixel_values)),
            ops.reshape(new_gamma, (batch, self.k * self.num_pixels)),
        ]
        output = ops.concatenate(new_states, axis=-1)  # (B, output_size)
        return output, new_states

    def get_config(self):
        return {
            **super().get_config(),
            "network": self.network, "image_shape": self.image_shape, "k": self.k,
            "distribution": self.distribution, "pred_init": self.pred_init, "e_sigma": self.e_sigma,
            "gradient_gamma": self.gradient_gamma, "seed": self.seed,
        }


def split_states(states, k, image_shape):
    """Flat cell states -> θ (B, K, units), ψ (B, K, H, W, C), γ (B, K, H, W, 1)."""
    theta, psi, gamma = states
    batch = ops.shape(theta)[0]
    height, width, _ = image_shape
    return (
        ops.reshape(theta, (batch, k, -1)),
        ops.reshape(psi, (batch, k) + tuple(image_shape)),
        ops.reshape(gamma, (batch, k, height, width, 1)),
    )


def split_outputs(outputs, k, image_shape, units):
    """Flat RNN outputs (B, S, output_size) -> γ (B, S, K, H, W, 1), ψ (B, S, K, H, W, C), θ (B, S, K, units)."""
    batch, steps = ops.shape(outputs)[0], ops.shape(outputs)[1]
    height, width, channels = image_shape
    sizes = [k * units, k * height * width * channels, k * height * width]
    theta = outputs[..., : sizes[0]]
    psi = outputs[..., sizes[0]: sizes[0] + sizes[1]]
    gamma = outputs[..., sizes[0] + sizes[1]:]
    return (
        ops.reshape(gamma, (batch, steps, k, height, width, 1)),
        ops.reshape(psi, (batch, steps, k, height, width, channels)),
        ops.reshape(theta, (batch, steps, k, units)),
    )
