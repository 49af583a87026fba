"""The unrolled Neural EM model: the EM cell run over EM steps or frames.

Static images (T = 1): the same noisy image feeds every one of ``nr_steps`` EM
steps and the E-step compares against the same clean image.
Sequences (T frames): step t takes noisy frame t and is scored against the
clean frame t + 1 (next-step prediction), one EM step per frame.

The model takes the pipelines' batches, ``{'features', 'noisy'}`` of shape
(B, T, H, W, C), and returns γ, ψ and θ for every step. ``fit`` trains it
with Eq. 5 on any Keras backend; the loss terms are reported as metrics.
"""

import keras
import numpy as np
from keras import ops

from neural_em.model.cell import EMCell, split_outputs
from neural_em.model.losses import em_loss, loss_step_weights, upper_bound_loss

LOSS_TERMS = ("intra_loss", "inter_loss", "upper_bound_loss")


@keras.saving.register_keras_serializable(package="neural_em")
class NeuralEM(keras.Model):
    """N-EM / RNN-EM, unrolled.

    Args:
        network: inner-network preset name ("shapes", "NEM", "flying_shapes",
            "flying_mnist") or a layer-list dict.
        image_shape: (H, W, C).
        k: number of components K (weights do not depend on it).
        nr_steps: EM steps for static images; sequences use T − 1 steps.
        distribution: "bernoulli" or "gaussian" pixels.
        pred_init: initial ψ.
        e_sigma: σ of the Gaussian E-step.
        gradient_gamma: if False, stop gradients through γ (loss weights and masked input).
        inter_weight: weight w of the inter-cluster loss.
        loss_step_weights: "last", "all" or a list with a weight per step.
        unroll: unroll the RNN loop (faster for few steps, slower to compile).
        seed: seed of the random initial γ.
    """

    def __init__(self, network, image_shape, k=3, nr_steps=15, distribution="bernoulli", pred_init=0.0,
                 e_sigma=0.25, gradient_gamma=True, inter_weight=1.0, loss_step_weights="last", unroll=False,
                 seed=None, **kwargs):
        super().__init__(**kwargs)
        if int(nr_steps) < 1:
            raise ValueError(f"nr_steps must be >= 1, got {nr_steps}.")
        self.settings = dict(
            network=network, image_shape=tuple(image_shape), k=int(k), nr_steps=int(nr_steps),
            distribution=distribution, pred_init=pred_init, e_sigma=e_sigma, gradient_gamma=gradient_gamma,
            inter_weight=inter_weight, loss_step_weights=loss_step_weights, unroll=unroll, seed=seed,
        )
        self.image_shape = tuple(image_shape)
        self.k = int(k)
        self.nr_steps = int(nr_steps)
        self.distribution = distribution
        self.gradient_gamma = gradient_gamma
        self.inter_weight = inter_weight
        self.step_weights_spec = loss_step_weights
        # The EM loop (states, E-step, loss) stays float32 under a mixed-precision policy; only the
        # inner network computes in the policy's dtype (float16 would underflow the E-step's ε).
        self.cell = EMCell(network, image_shape, k, distribution, pred_init, e_sigma, gradient_gamma, seed,
                           name="em_cell", dtype="float32")
        self.rnn = keras.layers.RNN(self.cell, return_sequences=True, unroll=unroll, name="em_steps",
                                    dtype="float32")
        self.term_trackers = {name: keras.metrics.Mean(name=name) for name in LOSS_TERMS}

    def steps_for(self, frames):
        """Number of EM steps for a batch with ``frames`` frames."""
        return self.nr_steps if frames == 1 else frames - 1

    def step_weights(self, frames):
        """Loss step weights, (S,) numpy, for a batch with ``frames`` frames."""
        return loss_step_weights(self.step_weights_spec, self.steps_for(frames))

    def em_targets(self, features):
        """Clean targets of each EM step: (B, T, H, W, C) -> (B, S, H, W, C)."""
        if features.shape[1] == 1:
            return ops.repeat(features, self.nr_steps, axis=1)
        return features[:, 1:]

    def em_inputs(self, batch):
        """Noisy inputs of each EM step, (B, S, H, W, C).

        Sequences: frames 0 … T − 2 of ``batch['noisy']``. Static images (T = 1): either one
        noisy copy, (B, 1, H, W, C), fed to every step, or one independently corrupted copy per
        step, (B, nr_steps, H, W, C), as the pipelines give with ``static_steps`` and as the
        published code trains (it tiles the image over the steps before adding noise).
        """
        noisy = batch["noisy"]
        if batch["features"].shape[1] > 1:
            return noisy[:, :-1]
        if noisy.shape[1] == 1:
            return ops.repeat(noisy, self.nr_steps, axis=1)
        if noisy.shape[1] != self.nr_steps:
            raise ValueError(f"Static images need 1 or nr_steps={self.nr_steps} noisy copies per image, got "
                             f"{noisy.shape[1]}; build the batches with static_steps={self.nr_steps}.")
        return noisy

    def call(self, batch, training=None):
        """Runs the EM steps.

        Args:
            batch: dict with 'features', (B, T, H, W, C), 'noisy' (the same shape, or
                (B, nr_steps, H, W, C) for static images, see ``em_inputs``) and optionally
                'initial_gamma' (B, K, H, W, 1) to replace the random initial γ.
        Returns:
            dict with 'gamma' (B, S, K, H, W, 1), 'psi' (B, S, K, H, W, C), 'theta' (B, S, K, units).
        """
        inputs = self.em_inputs(batch)  # (B, S, H, W, C)
        targets = self.em_targets(batch["features"])  # (B, S, H, W, C)
        batch_size, steps = ops.shape(inputs)[0], ops.shape(inputs)[1]
        flat = ops.concatenate(
            [ops.reshape(inputs, (batch_size, steps, -1)), ops.reshape(targets, (batch_size, steps, -1))], axis=-1
        )  # (B, S, 2·H·W·C)
        initial_state = None
        if "initial_gamma" in batch:  # a fixed start instead of the random one: same γ on every backend
            initial_state = self.cell.get_initial_state(batch_size, gamma=batch["initial_gamma"])
        outputs = self.rnn(flat, initial_state=initial_state, training=training)  # (B, S, output_size)
        gamma, psi, theta = split_outputs(outputs, self.k, self.image_shape, self.cell.units)
        return {"gamma": gamma, "psi": psi, "theta": theta}

    def loss_terms(self, batch, outputs):
        """Eq. 5 and the upper bound, each averaged over steps with the loss step weights.

        Returns:
            dict of scalars: 'loss', 'intra_loss', 'inter_loss', 'upper_bound_loss'.
        """
        targets = self.em_targets(batch["features"])  # (B, S, H, W, C)
        weights = self.step_weights(batch["features"].shape[1])
        totals = {"loss": 0.0, **{name: 0.0 for name in LOSS_TERMS}}
        for step, weight in enumerate(weights):
            if weight == 0:
                continue
            target = targets[:, step, None]  # (B, 1, H, W, C)
            psi = outputs["psi"][:, step]  # (B, K, H, W, C)
            total, intra, inter = em_loss(psi, outputs["gamma"][:, step], target, self.distribution,
                                          self.inter_weight, self.gradient_gamma)
            bound = upper_bound_loss(psi, target, self.distribution)
            for name, value in zip(("loss",) + LOSS_TERMS, (total, intra, inter, bound)):
                totals[name] = totals[name] + float(weight) * value
        return {name: value / float(np.sum(weights)) for name, value in totals.items()}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return self.loss_terms(x, y_pred)["loss"]

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        terms = self.loss_terms(x, y_pred)
        for name, tracker in self.term_trackers.items():
            tracker.update_state(terms[name])
        return self.get_metrics_result()

    def get_config(self):
        return {**super().get_config(), **self.settings}

    def with_settings(self, **overrides):
        """A copy of this model with other run-time settings (k, nr_steps, …) and the same weights."""
        settings = {**self.settings, **overrides}
        clone = NeuralEM(**settings)
        build(clone, frames=1)
        clone.set_weights(self.get_weights())
        return clone


def build(model, frames=1):
    """Creates the model's weights by running it once on a zero batch."""
    shape = (1, frames) + tuple(model.image_shape)
    zeros = np.zeros(shape, np.float32)
    model({"features": zeros, "noisy": zeros})
    return model
