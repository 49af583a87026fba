"""SavedModel export: the round trip through a fresh process without neural_em, metadata, bad input."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from neural_em import evaluate, experiment, export, observers
from neural_em.data import registry
from neural_em.data.pipeline import dataset_info
from neural_em.data.store import open_dataset
from neural_em.model.nem import NeuralEM, build

# Runs in a fresh interpreter: TensorFlow and numpy only, never neural_em.
SERVE_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    export_dir, inputs, outputs = sys.argv[1:]
    loaded = tf.saved_model.load(export_dir)
    result = loaded.signatures["serving_default"](sequences=tf.constant(np.load(inputs)))
    assert "neural_em" not in sys.modules, "the SavedModel must load without neural_em"
    np.savez(outputs, gamma=result["gamma"].numpy(), psi=result["psi"].numpy(),
             initial_gamma=loaded.initial_gamma.numpy())
    print(json.dumps({"k": int(loaded.k.numpy()), "nr_steps": int(loaded.nr_steps.numpy()),
                      "frames": int(loaded.frames.numpy()), "image_shape": loaded.image_shape.numpy().tolist(),
                      "metadata": json.loads(loaded.metadata_json.numpy().decode())}))
""")

CASES = {  # name: (data set, generate options, network, K, nr_steps, frames, EM steps S)
    "static": ("shapes", dict(train=16, valid=8, test=8), "shapes", 2, 3, 1, 3),
    "sequences": ("flying_shapes_3", dict(train=8, valid=8, test=8, frames=4), "flying_shapes", 3, 15, 4, 3),
}


def _weights_and_data(folder, dataset, options, network):
    data = registry.generate(dataset, out=folder / f"{dataset}.h5", progress=False, **options)
    info = dataset_info(data)
    model = build(NeuralEM(network, info.image_shape, k=1), frames=info.frames)  # weights do not depend on K
    weights = folder / "model.weights.h5"
    model.save_weights(weights)
    return data, weights


def _serve_in_fresh_process(export_dir, inputs, folder):
    np.save(folder / "inputs.npy", inputs)
    done = subprocess.run([sys.executable, "-c", SERVE_SCRIPT, str(export_dir), str(folder / "inputs.npy"),
                           str(folder / "outputs.npz")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(folder / "outputs.npz") as outputs:
        return dict(outputs), json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_savedmodel_gives_the_live_models_gamma_in_a_fresh_process(tmp_path, case):
    dataset, options, network, k, nr_steps, frames, steps = CASES[case]
    data, weights = _weights_and_data(tmp_path, dataset, options, network)
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    run = export.ex.run(config_updates={"weights": str(weights), "dataset.path": str(data), "network.name": network,
                                        "k": k, "nr_steps": nr_steps, "export_dir": str(tmp_path / "saved")},
                        options={"--db": db})
    assert run.result == str(tmp_path / "saved")
    assert "metadata.json" in observers.run_artifacts(db, run._id)

    with open_dataset(data) as file:
        sequences = file.split("test").features(np.arange(3))  # (3, T, H, W, 1)
    served, attributes = _serve_in_fresh_process(tmp_path / "saved", sequences, tmp_path)

    assert attributes["k"] == k and attributes["nr_steps"] == steps and attributes["frames"] == frames
    assert attributes["image_shape"] == [28, 28, 1]
    metadata = json.loads((tmp_path / "saved" / "assets" / "metadata.json").read_text())
    assert attributes["metadata"] == metadata
    assert metadata["k"] == k and metadata["nr_steps"] == steps and metadata["network"] == network
    assert metadata["distribution"] == "bernoulli" and metadata["weights"] == str(weights)
    np.testing.assert_array_equal(served["initial_gamma"], export.fixed_initial_gamma(k, (28, 28, 1), seed=0))

    live = build(NeuralEM(network, (28, 28, 1), k=k, nr_steps=nr_steps), frames=frames)
    live.load_weights(weights)
    initial_gamma = np.repeat(served["initial_gamma"][None], len(sequences), axis=0)  # (B, K, H, W, 1)
    expected = live({"features": sequences, "noisy": sequences, "initial_gamma": initial_gamma})
    assert served["gamma"].shape == (3, steps, k, 28, 28, 1)
    np.testing.assert_allclose(served["gamma"], np.asarray(expected["gamma"]), atol=1e-5)
    np.testing.assert_allclose(served["psi"], np.asarray(expected["psi"]), atol=1e-5)


def test_fixed_initial_gamma_is_a_normalised_distribution_over_k():
    gamma = export.fixed_initial_gamma(4, (5, 6, 1), seed=3)
    assert gamma.shape == (4, 5, 6, 1) and np.all(gamma > 0)
    np.testing.assert_allclose(gamma.sum(axis=0), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(gamma, export.fixed_initial_gamma(4, (5, 6, 1), seed=3))
    assert not np.array_equal(gamma, export.fixed_initial_gamma(4, (5, 6, 1), seed=4))
    np.testing.assert_array_equal(export.fixed_initial_gamma(1, (5, 6, 1), seed=3), 1.0)


def test_export_refuses_to_overwrite_a_folder(tmp_path):
    (tmp_path / "saved").mkdir()
    model = build(NeuralEM("shapes", (6, 6, 1), k=2, nr_steps=2))
    with pytest.raises(FileExistsError, match="saved already exists"):
        export.export_model(model, tmp_path / "saved", frames=1, metadata={})


def test_missing_weights_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(experiment.ConfigError, match="weights='/nonexistent/a.weights.h5': no such file"):
        export.ex.run(config_updates={"weights": "/nonexistent/a.weights.h5"}, options={"--unobserved": True})
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("weights,name", [("ckpt/best.weights.h5", "best_k3_s20"), ("ckpt/last.keras", "last_k3_s20")])
def test_default_export_folder_is_named_after_the_weights_file(weights, name):
    source = evaluate.ModelSource(config=None, weights=Path(weights), training_run=None)
    assert export._default_export_dir(source, {"k": 3}, steps=20) == Path("runs/exports") / name
