"""The EM cell, the inner networks, the losses and the unrolled model."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from neural_em.model import losses
from neural_em.model.cell import EMCell, e_step, split_states
from neural_em.model.nem import NeuralEM, build
from neural_em.model.networks import PRESETS, LayerNorm, RecurrentLayer, build_inner_network, network_config

IMAGE = (6, 5, 1)


def _batch(frames=1, batch=3, shape=IMAGE, seed=0):
    rng = np.random.default_rng(seed)
    features = (rng.random((batch, frames) + shape) > 0.6).astype("float32")
    noisy = np.abs(features - (rng.random(features.shape) < 0.1)).astype("float32")
    return {"features": features, "noisy": noisy}


def test_e_step_bernoulli_matches_hand_computation():
    psi = np.array([0.9, 0.2, 0.5], np.float32).reshape(1, 3, 1, 1, 1)
    for x in (0.0, 1.0):
        target = np.full((1, 1, 1, 1, 1), x, np.float32)
        gamma = np.asarray(e_step(psi, target, "bernoulli")).ravel()
        likelihood = (psi.ravel() if x else 1 - psi.ravel()) + 1e-6
        np.testing.assert_allclose(gamma, likelihood / likelihood.sum(), rtol=1e-5)


def test_e_step_gaussian_uses_sigma_as_temperature_and_sums_channels():
    psi = np.array([[0.1, 0.4], [0.7, 0.7]], np.float32).reshape(1, 2, 1, 1, 2)  # K=2, C=2
    target = np.array([0.2, 0.5], np.float32).reshape(1, 1, 1, 1, 2)
    sigma = 0.25
    density = np.exp(-((target.reshape(1, 2) - psi.reshape(2, 2)) ** 2) / (2 * sigma**2)) / np.sqrt(2 * np.pi * sigma**2)
    likelihood = density.sum(axis=1) + 1e-6
    gamma = np.asarray(e_step(psi, target, "gaussian", e_sigma=sigma)).ravel()
    np.testing.assert_allclose(gamma, likelihood / likelihood.sum(), rtol=1e-5)


def test_e_step_rejects_unknown_distribution():
    with pytest.raises(ValueError, match="poisson"):
        e_step(np.zeros((1, 2, 1, 1, 1)), np.zeros((1, 1, 1, 1, 1)), "poisson")


@pytest.mark.parametrize("network", ["shapes", "NEM"])
def test_model_outputs_shapes_and_gamma_sums_to_one(network):
    model = NeuralEM(network, IMAGE, k=3, nr_steps=4, seed=1)
    out = model(_batch())
    assert tuple(out["gamma"].shape) == (3, 4, 3) + IMAGE[:2] + (1,)
    assert tuple(out["psi"].shape) == (3, 4, 3) + IMAGE
    assert tuple(out["theta"].shape) == (3, 4, 3, 250)
    np.testing.assert_allclose(np.sum(np.asarray(out["gamma"]), axis=2), 1.0, atol=1e-5)


def test_sequences_use_one_step_per_frame_transition():
    model = NeuralEM("shapes", IMAGE, k=2, nr_steps=9, seed=1)
    out = model(_batch(frames=5))
    assert out["gamma"].shape[1] == 4  # T − 1 steps, nr_steps is for static images


def _fixed_gamma(batch, k, seed=0):
    gamma = np.abs(np.random.default_rng(seed).normal(size=(batch, k) + IMAGE[:2] + (1,))).astype("float32")
    return gamma / gamma.sum(axis=1, keepdims=True)


def test_static_images_take_one_noisy_copy_per_step():
    model = NeuralEM("shapes", IMAGE, k=2, nr_steps=3, seed=1)
    batch = _batch(batch=2)
    batch["initial_gamma"] = _fixed_gamma(2, 2)
    copies = np.stack([batch["noisy"][:, 0], 1.0 - batch["noisy"][:, 0], batch["noisy"][:, 0]], axis=1)
    repeated = model(batch)
    same_copies = model({**batch, "noisy": np.repeat(batch["noisy"], 3, axis=1)})
    per_step = model({**batch, "noisy": copies})
    # Three equal copies are the one-copy case; a different copy at step 2 changes step 2 on.
    np.testing.assert_allclose(np.asarray(same_copies["psi"]), np.asarray(repeated["psi"]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(per_step["psi"])[:, 0], np.asarray(repeated["psi"])[:, 0], atol=1e-6)
    assert not np.allclose(np.asarray(per_step["psi"])[:, 1], np.asarray(repeated["psi"])[:, 1])
    np.testing.assert_array_equal(np.asarray(model.em_inputs({**batch, "noisy": copies})), copies)
    with pytest.raises(ValueError, match="nr_steps=3"):
        model({**batch, "noisy": copies[:, :2]})


def test_mixed_precision_keeps_the_em_loop_in_float32():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build(NeuralEM("shapes", IMAGE, k=2, nr_steps=2, seed=0))
        model.compile(optimizer="adam")
        batch = _batch(batch=4)
        out = model(batch)
        history = model.fit(batch, epochs=1, verbose=0).history
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.cell.inner.compute_dtype == "float16"
    assert out["gamma"].dtype == out["psi"].dtype == "float32"
    np.testing.assert_allclose(np.sum(np.asarray(out["gamma"]), axis=2), 1.0, atol=1e-5)
    assert np.isfinite(history["loss"][0])


def test_k_equal_one_gives_gamma_one():
    out = NeuralEM("shapes", IMAGE, k=1, nr_steps=3, seed=1)(_batch())
    np.testing.assert_allclose(np.asarray(out["gamma"]), 1.0, atol=1e-6)


def test_initial_gamma_is_normalised_abs_normal():
    cell = EMCell("shapes", IMAGE, k=4, seed=3)
    theta, psi, gamma = split_states(cell.get_initial_state(batch_size=2), 4, IMAGE)
    gamma = np.asarray(gamma)
    np.testing.assert_allclose(gamma.sum(axis=1), 1.0, atol=1e-6)
    assert gamma.min() > 0 and gamma.std() > 0.05
    assert np.all(np.asarray(theta) == 0) and np.all(np.asarray(psi) == 0)


def test_cell_runs_inside_keras_rnn_layer():
    cell = EMCell("shapes", IMAGE, k=2, seed=0)
    layer = keras.layers.RNN(cell, return_sequences=True)
    steps = np.random.default_rng(0).random((2, 3, 2 * int(np.prod(IMAGE)))).astype("float32")
    outputs = layer(steps)
    assert tuple(outputs.shape) == (2, 3, cell.output_size)


def test_step_count_and_k_are_run_time_settings():
    model = NeuralEM("shapes", IMAGE, k=3, nr_steps=2, seed=1)
    build(model)
    bigger = model.with_settings(k=5, nr_steps=7)
    out = bigger(_batch())
    assert tuple(out["gamma"].shape[1:3]) == (7, 5)
    for a, b in zip(model.get_weights(), bigger.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_network_presets_match_the_paper():
    assert PRESETS["flying_shapes"]["recurrent"][0]["size"] == 100
    assert PRESETS["flying_mnist"]["recurrent"][0]["size"] == 250
    for name, shape, frames in [("flying_shapes", (28, 28, 1), 3), ("flying_mnist", (24, 24, 1), 3)]:
        out = NeuralEM(name, shape, k=2, seed=0, distribution="bernoulli")(_batch(frames, 2, shape))
        assert tuple(out["psi"].shape) == (2, frames - 1, 2) + shape


def test_bad_network_configs_are_rejected():
    with pytest.raises(ValueError, match="Unknown network 'resnet'"):
        network_config("resnet")
    config = network_config("shapes")
    config["input"] = [{"name": "pool"}]
    with pytest.raises(ValueError, match="Unknown layer name 'pool'"):
        build_inner_network(config, 30).build((None, 30))
    config = network_config("shapes")
    config["output"][0]["size"] = 17
    with pytest.raises(ValueError, match="30 pixel values"):
        build_inner_network(config, 30).build((None, 30))
    with pytest.raises(ValueError, match="k .* must be >= 1"):
        EMCell("shapes", IMAGE, k=0)


def test_layer_norm_is_slims_per_sample_statistics_with_per_channel_scale():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(2, 5, 4, 3)).astype("float32")
    norm = LayerNorm()
    norm.build(x.shape)
    assert [tuple(w.shape) for w in norm.weights] == [(3,), (3,)]  # one scale and offset per channel
    gamma, beta = np.array([0.5, 1.0, 2.0], "float32"), np.array([0.0, -1.0, 1.0], "float32")
    norm.set_weights([gamma, beta])
    mean = x.mean(axis=(1, 2, 3), keepdims=True)  # one mean and variance per sample, over H, W and C
    expected = (x - mean) / np.sqrt(x.var(axis=(1, 2, 3), keepdims=True) + 1e-12) * gamma + beta
    np.testing.assert_allclose(np.asarray(norm(x)), expected, rtol=1e-4, atol=1e-5)
    # Under mixed precision the statistics stay in float32, so ε = 1e-12 still guards a flat sample.
    half = LayerNorm(dtype="mixed_float16")
    flat = np.asarray(half(np.ones((1, 4, 4, 3), "float16")))
    assert flat.dtype == np.float16 and np.all(flat == 0)
    # Every LN of the convolutional presets is this layer, so their scales have C entries.
    net = build_inner_network("flying_shapes", 784)
    net.build((None, 784))
    scales = {w.path.split("/")[-2]: tuple(w.shape) for w in net.weights if w.name == "gamma"}
    assert scales == {"conv_1_ln": (32,), "conv_2_ln": (64,), "fc_4_ln": (512,), "ln": (100,),
                      "fc_5_ln": (512,), "fc_6_ln": (3136,), "r_conv_8_ln": (32,)}


@pytest.mark.parametrize("layer_norm", [False, True])
def test_recurrent_layer_normalises_its_output_but_not_the_state_that_recurs(layer_norm):
    rng = np.random.default_rng(0)
    x, h = rng.normal(size=(2, 6)).astype("float32"), rng.uniform(size=(2, 4)).astype("float32")
    layer = RecurrentLayer(4, "sigmoid", layer_norm)
    layer.build(x.shape)
    output, state = (np.asarray(t) for t in layer(x, h))
    kernel, bias, recurrent = (np.asarray(w) for w in layer.weights[:3])
    pre_activation = x @ kernel + bias + h @ recurrent
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    np.testing.assert_allclose(state, sigmoid(pre_activation), rtol=1e-5)
    if layer_norm:  # the published code's LayerNormWrapper(apply_to='output') inside the state's activation
        mean, var = pre_activation.mean(-1, keepdims=True), pre_activation.var(-1, keepdims=True)
        np.testing.assert_allclose(output, sigmoid((pre_activation - mean) / np.sqrt(var + 1e-12)), rtol=1e-4)
        assert not np.allclose(output, state)
    else:
        np.testing.assert_array_equal(output, state)


def test_nem_step_is_gradient_ascent_with_tied_weights():
    net = build_inner_network("NEM", 4)
    net.build((None, 4))
    kernel = np.random.default_rng(0).normal(size=(4, 250)).astype("float32") * 0.1
    net.set_weights([kernel, np.float32(0.5)])
    masked = np.array([[0.3, -0.2, 0.0, 1.0]], np.float32)
    h = np.random.default_rng(1).normal(size=(1, 250)).astype("float32")
    psi, h_new = (np.asarray(t) for t in net(masked, h))
    sig = 1 / (1 + np.exp(-h))
    expected_h = h + 0.5 * sig * (1 - sig) * (masked @ kernel)
    np.testing.assert_allclose(h_new, expected_h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(psi, 1 / (1 + np.exp(-(1 / (1 + np.exp(-expected_h))) @ kernel.T)), rtol=1e-5)


def test_nem_step_is_initialised_like_the_published_cell():
    net = build_inner_network("NEM", 784)
    net.build((None, 784))
    assert [w.name for w in net.weights] == ["kernel", "step_size"]  # tied W, no output bias
    kernel = np.asarray(net.kernel)
    limit = np.sqrt(6 / (784 + 250))  # Glorot-uniform, as TF1's slim.fully_connected
    assert np.abs(kernel).max() <= limit
    np.testing.assert_allclose(kernel.std(), limit / np.sqrt(3), rtol=0.02)


def _numpy_terms(psi, gamma, target, distribution):
    if distribution == "bernoulli":
        p = np.clip(psi, 1e-6, 1 - 1e-6)
        prior = 1e-6
        intra = -(target * np.log(p) + (1 - target) * np.log(1 - p))
        inter = prior * np.log(prior / p) + (1 - prior) * np.log((1 - prior) / (1 - p))
    else:
        intra = (psi - target) ** 2 / 2
        inter = psi**2 / 2  # KL(N(ψ,1) ‖ N(0,1))
    batch = psi.shape[0]
    return (intra * gamma).sum() / batch, (inter * (1 - gamma)).sum() / batch


@pytest.mark.parametrize("distribution", ["bernoulli", "gaussian"])
def test_loss_terms_match_numpy(distribution):
    rng = np.random.default_rng(0)
    psi = rng.random((2, 3, 4, 4, 1)).astype("float32")
    gamma = rng.dirichlet(np.ones(3), size=(2, 4, 4)).transpose(0, 3, 1, 2)[..., None].astype("float32")
    target = (rng.random((2, 1, 4, 4, 1)) > 0.5).astype("float32")
    total, intra, inter = (float(t) for t in losses.em_loss(psi, gamma, target, distribution, inter_weight=0.2))
    intra_ref, inter_ref = _numpy_terms(psi, gamma, target, distribution)
    np.testing.assert_allclose([intra, inter, total], [intra_ref, inter_ref, intra_ref + 0.2 * inter_ref], rtol=1e-5)
    bound = float(losses.upper_bound_loss(psi, target, distribution))
    bound_ref = _numpy_terms(psi.max(axis=1, keepdims=True), np.ones((2, 1, 4, 4, 1)), target, distribution)[0]
    np.testing.assert_allclose(bound, bound_ref, rtol=1e-5)


def test_loss_step_weights():
    np.testing.assert_array_equal(losses.loss_step_weights("last", 3), [0, 0, 1])
    np.testing.assert_array_equal(losses.loss_step_weights("all", 2), [1, 1])
    np.testing.assert_array_equal(losses.loss_step_weights([0.5, 1], 2), [0.5, 1])
    with pytest.raises(ValueError, match="3 non-negative numbers"):
        losses.loss_step_weights([1, 1], 3)
    with pytest.raises(ValueError, match="'last', 'all'"):
        losses.loss_step_weights("first", 3)


def test_model_loss_is_weighted_average_of_step_losses():
    model = NeuralEM("shapes", IMAGE, k=2, nr_steps=3, loss_step_weights=[1.0, 0.0, 3.0], seed=0)
    batch = _batch()
    out = model(batch)
    terms = model.loss_terms(batch, out)
    target = batch["features"][:, 0:1]
    steps = [float(losses.em_loss(out["psi"][:, s], out["gamma"][:, s], target)[0]) for s in range(3)]
    np.testing.assert_allclose(float(terms["loss"]), (steps[0] + 3 * steps[2]) / 4, rtol=1e-5)


@pytest.mark.parametrize("gradient_gamma", [True, False])
def test_gradient_through_gamma_switch(gradient_gamma):
    # In the loss weights.
    psi = tf.constant(np.full((1, 2, 2, 2, 1), 0.3, np.float32))
    gamma = tf.Variable(np.full((1, 2, 2, 2, 1), 0.5, np.float32))
    target = tf.ones((1, 1, 2, 2, 1))
    with tf.GradientTape() as tape:
        total, _, _ = losses.em_loss(psi, gamma, target, gradient_gamma=gradient_gamma)
    grad = tape.gradient(total, gamma)
    # In the masked input: does the new ψ depend on the previous γ?
    cell = EMCell("shapes", IMAGE, k=2, gradient_gamma=gradient_gamma, seed=0)
    states = [tf.Variable(s) for s in cell.get_initial_state(batch_size=1)]
    inputs = tf.constant(np.random.default_rng(0).random((1, 2 * int(np.prod(IMAGE)))), tf.float32)
    with tf.GradientTape() as tape:
        _, (theta, new_psi, new_gamma) = cell(inputs, states)
        outcome = tf.reduce_sum(new_psi)
    cell_grad = tape.gradient(outcome, states[2])
    if gradient_gamma:
        assert grad is not None and float(tf.reduce_max(tf.abs(grad))) > 0
        assert cell_grad is not None and float(tf.reduce_max(tf.abs(cell_grad))) > 0
    else:
        assert grad is None or float(tf.reduce_max(tf.abs(grad))) == 0
        assert cell_grad is None or float(tf.reduce_max(tf.abs(cell_grad))) == 0


def test_training_steps_lower_the_loss():
    model = NeuralEM("shapes", IMAGE, k=2, nr_steps=3, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    batch = _batch(batch=16)
    history = model.fit(batch, batch_size=8, epochs=15, verbose=0).history
    assert history["loss"][-1] < 0.8 * history["loss"][0]
    assert set(history) >= {"loss", "intra_loss", "inter_loss", "upper_bound_loss"}


JAX_SCRIPT = """
import json, sys, numpy as np
from neural_em.model.nem import NeuralEM, build
args = json.loads(sys.argv[1])
model = build(NeuralEM(args["network"], tuple(args["shape"]), k=3, nr_steps=3, seed=0), frames=args["frames"])
model.load_weights(args["weights"])
data = np.load(args["data"])
out = model({k: data[k] for k in ("features", "noisy", "initial_gamma")})
np.save(args["out"], np.asarray(out["gamma"]))
"""


@pytest.mark.parametrize("network,shape,frames", [("shapes", IMAGE, 1), ("flying_shapes", (28, 28, 1), 3)])
def test_tensorflow_and_jax_give_the_same_outputs(tmp_path, network, shape, frames):
    pytest.importorskip("jax")
    model = build(NeuralEM(network, shape, k=3, nr_steps=3, seed=0), frames=frames)
    batch = _batch(frames, 2, shape)
    rng = np.random.default_rng(5)
    initial = rng.random((2, 3) + shape[:2] + (1,)).astype("float32")
    batch["initial_gamma"] = initial / initial.sum(axis=1, keepdims=True)
    weights = tmp_path / "model.weights.h5"
    model.save_weights(weights)
    np.savez(tmp_path / "data.npz", **batch)
    args = dict(network=network, shape=shape, frames=frames, weights=str(weights), data=str(tmp_path / "data.npz"),
                out=str(tmp_path / "gamma_jax.npy"))
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", JAX_SCRIPT, json.dumps(args)], check=True, env=env)
    gamma_tf = np.asarray(model(batch)["gamma"])
    np.testing.assert_allclose(np.load(tmp_path / "gamma_jax.npy"), gamma_tf, atol=1e-4)
