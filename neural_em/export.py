"""Export a trained model as a TensorFlow SavedModel: ``python -m neural_em.export with run_id=3``.

    python -m neural_em.export with run_id=3 export_dir=exports/shapes_k3
    python -m neural_em.export with run_id=3 k=5 nr_steps=30           # K and steps are fixed at export
    python -m neural_em.export with run_id=7 frames=51                  # sequences of 51 frames (50 steps)
    python -m neural_em.export with weights=best.weights.h5 dataset.flying_shapes network.flying_shapes sequential

The model comes from a training run or a weights file exactly as in
``neural_em.evaluate`` (the data set supplies the image shape and the pixel
distribution). The SavedModel's ``serving_default`` signature takes
``sequences``, float32 (B, T, H, W, C) in [0, 1], and returns

    gamma  (B, S, K, H, W, 1)   the soft assignments after each EM step,
    psi    (B, S, K, H, W, C)   each component's prediction after each step,

with S = nr_steps for static images (T = 1) and S = T − 1 for sequences (step t
predicts frame t + 1). At serving time there is no input noise: the input is
both the network's input and the E-step's target. The random initial γ of
training is replaced by a fixed one, drawn once from ``seed`` and stored in the
model (``initial_gamma``, (K, H, W, 1), the same for every sequence), so the
output depends on the input alone.

Loaded with ``tf.saved_model.load`` (no neural_em needed), the object has the
attributes ``k``, ``nr_steps``, ``frames``, ``image_shape``, ``initial_gamma``
and ``metadata_json`` (everything below, as JSON); ``assets/metadata.json``
holds the same JSON.
"""

import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from neural_em import evaluate, experiment, observers
from neural_em.data.pipeline import dataset_info

METADATA_FILE = "metadata.json"

ex = experiment.make_experiment("neural_em_export")


@ex.config
def export_config():
    run_id = None  # a training run in the run database: its configuration and best weights
    weights = None  # or a *.weights.h5 file or a last.keras checkpoint; model settings then from this command line
    db = None  # database holding run_id; None: the one this run is recorded in, else runs/neural_em.db
    export_dir = None  # None: runs/exports/<run or weights>_k<k>_s<steps>
    frames = None  # T of the serving input; None: the data set's (1 for static images)


EXPORT_KEYS = ("run_id", "weights", "db", "export_dir", "frames")


def fixed_initial_gamma(k, image_shape, seed):
    """The initial γ of the exported model: |N(0, 1)| normalised over K, as in training, from a fixed seed.

    Returns:
        float32 (K, H, W, 1); all ones when K = 1.
    """
    height, width, _ = image_shape
    if k == 1:
        return np.ones((1, height, width, 1), np.float32)
    draws = np.abs(np.random.default_rng(seed).standard_normal((k, height, width, 1)))  # (K, H, W, 1)
    return (draws / draws.sum(axis=0, keepdims=True)).astype(np.float32)


class ServingModule(tf.Module):
    """A NeuralEM with a fixed initial γ and a fixed input shape, ready for ``tf.saved_model.save``.

    Args:
        model: a built NeuralEM with its weights.
        frames: T of the serving input.
        initial_gamma: float32 (K, H, W, 1), used for every sequence.
        metadata: JSON-able dict describing the model.
        metadata_file: a file holding ``metadata`` as JSON, copied into the SavedModel's assets.
    """

    def __init__(self, model, frames, initial_gamma, metadata, metadata_file):
        super().__init__(name="neural_em")
        self.model = model
        # Keras' RNN layer may still trace the cell's random initial state: keep its seed state reachable.
        self.seed_state = model.cell.seed_generator.state
        self.initial_gamma = tf.Variable(initial_gamma, trainable=False, name="initial_gamma")
        self.k = tf.Variable(model.k, trainable=False, dtype=tf.int32, name="k")
        self.nr_steps = tf.Variable(model.steps_for(frames), trainable=False, dtype=tf.int32, name="nr_steps")
        self.frames = tf.Variable(frames, trainable=False, dtype=tf.int32, name="frames")
        self.image_shape = tf.Variable(model.image_shape, trainable=False, dtype=tf.int32, name="image_shape")
        self.metadata_json = tf.Variable(json.dumps(metadata, sort_keys=True), trainable=False, name="metadata_json")
        self.metadata_file = tf.saved_model.Asset(str(metadata_file))
        signature = tf.TensorSpec((None, frames) + tuple(model.image_shape), tf.float32, name="sequences")
        self.serve = tf.function(self._serve, input_signature=[signature])

    def _serve(self, sequences):
        batch_size = tf.shape(sequences)[0]
        initial_gamma = tf.tile(self.initial_gamma[None], [batch_size, 1, 1, 1, 1])  # (B, K, H, W, 1)
        batch = {"features": sequences, "noisy": sequences, "initial_gamma": initial_gamma}
        outputs = self.model(batch, training=False)
        return {"gamma": outputs["gamma"], "psi": outputs["psi"]}


def export_model(model, export_dir, frames, metadata, seed=0):
    """Writes ``model`` as a SavedModel with a ``serving_default`` signature (see the module docstring).

    The SavedModel is written next to ``export_dir`` and renamed at the end, so an
    interrupted export leaves no half-written folder.

    Args:
        model: a built NeuralEM with its weights.
        export_dir: the folder to create; it must not exist yet.
        frames: T of the serving input (1 for static images).
        metadata: JSON-able dict; k, nr_steps, frames, image_shape and the initial-γ seed are added.
        seed: seed of the fixed initial γ.
    Returns:
        The export folder, a Path.
    """
    export_dir = Path(export_dir)
    if export_dir.exists():
        raise FileExistsError(f"Export folder {export_dir} already exists; pass another export_dir or delete it.")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames={frames!r}: expected an integer >= 1 (1 for static images).")
    metadata = {**metadata, "k": model.k, "nr_steps": model.steps_for(frames), "frames": frames,
                "image_shape": list(model.image_shape), "initial_gamma_seed": seed}
    partial = export_dir.with_name(export_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted export
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        metadata_file = Path(scratch) / METADATA_FILE
        metadata_file.write_text(json.dumps(metadata, indent=1, sort_keys=True))
        module = ServingModule(model, frames, fixed_initial_gamma(model.k, model.image_shape, seed), metadata,
                               metadata_file)
        tf.saved_model.save(module, str(partial), signatures={"serving_default": module.serve})
    os.replace(partial, export_dir)
    return export_dir


def _default_export_dir(source, config, steps):
    if source.training_run is not None:
        name = f"run{source.training_run['id']}"
    else:
        name = source.weights.name
        for suffix in evaluate.WEIGHTS_SUFFIXES:
            name = name.removesuffix(suffix)
    return Path("runs/exports") / f"{name}_k{config['k']}_s{steps}"


def _package_version():
    try:
        return importlib.metadata.version("neural_em")
    except importlib.metadata.PackageNotFoundError:
        return None


@ex.main
def export(_config, _run):
    """Exports a trained model; the result is the export folder."""
    with tempfile.TemporaryDirectory() as scratch:
        source = evaluate.resolve_model(_config, _run, EXPORT_KEYS, scratch)
        config = source.config
        experiment.check_config(config)
        info = dataset_info(experiment.dataset_path(config["dataset"]))
        frames = info.frames if config["frames"] is None else config["frames"]
        model = evaluate.load_model(config, info, source.weights)
    distribution, _ = experiment.resolved_settings(config, info)
    metadata = {
        "distribution": distribution, "network": experiment.network_spec(config),
        "e_sigma": config["em"]["e_sigma"], "pred_init": config["em"]["pred_init"],
        "dataset": config["dataset"]["name"], "neural_em_version": _package_version(),
        "training_run": source.training_run["id"] if source.training_run else None,
        "weights": None if source.training_run else str(source.weights),
        "inputs": {"sequences": "float32 (B, T, H, W, C) in [0, 1]"},
        "outputs": {"gamma": "float32 (B, S, K, H, W, 1)", "psi": "float32 (B, S, K, H, W, C)"},
    }
    export_dir = config["export_dir"] or _default_export_dir(source, config, model.steps_for(frames))
    export_dir = export_model(model, export_dir, frames, metadata, seed=config["seed"])
    _run.info["export"] = {"export_dir": str(export_dir), **metadata}
    _run.add_artifact(str(export_dir / "assets" / METADATA_FILE), METADATA_FILE)
    print(f"SavedModel: {export_dir} (K={model.k}, {model.steps_for(frames)} steps, inputs of {frames} frames)")
    return str(export_dir)


def main(argv=None):
    observers.run_commandline(ex, argv)


if __name__ == "__main__":
    main()
