"""Training from the command line: recording, resumption, stage-wise loading, bad configs."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from neural_em import experiment, observers, training
from neural_em.data import registry
from neural_em.data.pipeline import dataset_info
from neural_em.model.nem import NeuralEM, build
from neural_em.model.networks import build_inner_network

ROOT = Path(__file__).resolve().parents[1]
TINY = ["training.batch_size=16", "nr_steps=2", "scoring.valid_sequences=16", "training.verbose=0"]


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "shapes.h5"
    return registry.generate("shapes", out=path, train=64, valid=32, test=32, progress=False)


def _train_cli(tmp_path, *updates, db=None, wait=True):
    command = [sys.executable, "-m", "neural_em.train", "with", *updates]
    if db:
        command += ["--db", db]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not wait:
        return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _check_recorded_run(db):
    (run,) = observers.list_runs(db)
    assert run["status"] == "COMPLETED"
    assert run["config"]["k"] == 2 and run["config"]["dataset"]["name"] == "shapes"
    metrics = observers.run_metrics(db, run["id"])
    assert [step for step, _ in metrics["val_loss"]] == [1, 2]
    assert {"loss", "intra_loss", "inter_loss", "val_ami", "val_ari"} <= set(metrics)
    assert isinstance(run["result"], float) and -1 <= run["result"] <= 1
    assert run["result"] == pytest.approx(max(value for _, value in metrics["val_ami"]), abs=1.0)
    assert "best.weights.h5" in observers.run_artifacts(db, run["id"])


def test_command_line_run_is_recorded_in_sqlite(tmp_path, tiny_shapes):
    done = _train_cli(tmp_path, f"dataset.path={tiny_shapes}", "k=2", "training.max_epochs=2", *TINY)
    assert done.returncode == 0, done.stdout + done.stderr
    db = f"sqlite:///{tmp_path / 'runs' / 'neural_em.db'}"  # the default database, relative to the cwd
    _check_recorded_run(db)
    listing = subprocess.run([sys.executable, "-m", "neural_em.runs", "--db", db], capture_output=True, text=True)
    assert "COMPLETED" in listing.stdout and "shapes" in listing.stdout


def test_command_line_run_is_recorded_in_postgresql(tmp_path, tiny_shapes, postgres_url):
    done = _train_cli(tmp_path, f"dataset.path={tiny_shapes}", "k=2", "training.max_epochs=2", *TINY,
                      db=postgres_url)
    assert done.returncode == 0, done.stdout + done.stderr
    _check_recorded_run(postgres_url)
    assert not (tmp_path / "runs" / "neural_em.db").exists()


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, tiny_shapes):
    folder = tmp_path / "checkpoints"
    big = registry.generate("shapes", out=tmp_path / "big.h5", train=1000, valid=16, test=16, progress=False)
    updates = [f"dataset.path={big}", "k=2", "training.max_epochs=3", f"checkpoint_dir={folder}",
               "training.batch_size=4", "nr_steps=2", "scoring.valid_sequences=8", "training.verbose=0"]
    process = _train_cli(tmp_path, *updates, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        state = folder / training.STATE
        if state.exists() and json.loads(state.read_text())["epoch"] >= 1:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stdout.read().decode()
    process.send_signal(signal.SIGKILL)  # mid-way through epoch 2
    process.wait()
    assert json.loads((folder / training.STATE).read_text())["epoch"] == 1

    done = _train_cli(tmp_path, *updates, "training.verbose=1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Resuming from" in done.stdout and "after epoch 1" in done.stdout
    state = json.loads((folder / training.STATE).read_text())
    assert state["epoch"] == 3 and state["finished"]
    assert len(state["history"]["val_loss"]) == 3


def test_gpu_machine_script_trains_under_jax_without_tensorflow_and_brings_the_checkpoint_back(
        tmp_path, tiny_shapes):
    """scripts/device.sh as on the GPU machine (JAX, no TensorFlow): train, pause, bring back, go on."""
    pytest.importorskip("jax")
    blocker = tmp_path / "no_tensorflow" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('tensorflow is not installed on this machine')\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "DEVICE_PART_BYTES": "500000",  # last.keras in parts
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]),
           "PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}
    script = ROOT / "scripts" / "device.sh"
    updates = [f"dataset.path={tiny_shapes}", "k=2", *TINY, "training.verbose=1", "training.max_epochs=2"]

    def device(*args, out=None, returncode=0):
        if out:
            out.mkdir()
        done = subprocess.run(["bash", script, *map(str, args)], cwd=tmp_path, env={**env, "OUT": str(out)},
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == returncode, done.stdout + done.stderr
        return done

    # A time limit pauses the first call after one epoch; what comes back goes on in another folder.
    device("train", "1e-9", tmp_path / "there", *updates, out=tmp_path / "out1")
    assert (tmp_path / "out1" / "checkpoint" / "last.keras.part01").exists()
    assert "Paused" in (tmp_path / "out1" / "train.log").read_text()
    here = tmp_path / "here"
    device("restore", tmp_path / "out1", here)
    for name in (training.LAST_MODEL, training.BEST_WEIGHTS, training.STATE):
        assert (here / name).read_bytes() == (tmp_path / "there" / name).read_bytes()
    done = device("train", "None", here, *updates, out=tmp_path / "out2")
    assert "Resuming from" in done.stdout and "after epoch 1" in done.stdout
    state = json.loads((here / training.STATE).read_text())
    assert state["epoch"] == 2 and len(state["history"]["val_loss"]) == 2

    # The old checkpoint does not overwrite the newer one; a folder with nothing brought back is named.
    refused = device("restore", tmp_path / "out1", here, returncode=1)
    assert "at epoch 2, past the 1 brought back" in refused.stderr
    assert json.loads((here / training.STATE).read_text())["epoch"] == 2
    missing = device("restore", tmp_path / "nothing", here, returncode=1)
    assert f"no folder {tmp_path / 'nothing' / 'checkpoint'}" in missing.stderr

    # Trained under JAX, the weights load here under TensorFlow.
    info = dataset_info(tiny_shapes)
    trained = build(NeuralEM("shapes", info.image_shape, k=2, nr_steps=2, seed=1))
    trained.load_weights(here / training.BEST_WEIGHTS)
    untrained = build(NeuralEM("shapes", info.image_shape, k=2, nr_steps=2, seed=1))
    assert any(not np.array_equal(a, b) for a, b in zip(trained.get_weights(), untrained.get_weights()))


def test_stage_wise_training_starts_from_given_weights(tmp_path, tiny_shapes):
    info = dataset_info(tiny_shapes)
    source = build(NeuralEM("shapes", info.image_shape, k=2, nr_steps=2, seed=7))
    weights = tmp_path / "stage1.weights.h5"
    source.save_weights(weights)
    folder = tmp_path / "stage2"
    done = _train_cli(tmp_path, f"dataset.path={tiny_shapes}", "k=2", "training.max_epochs=1", *TINY,
                      f"init_weights={weights}", "training.learning_rate=1e-12", f"checkpoint_dir={folder}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Starting from the weights" in done.stdout
    trained = build(NeuralEM("shapes", info.image_shape, k=2, nr_steps=2))
    trained.load_weights(folder / training.BEST_WEIGHTS)
    for before, after in zip(source.get_weights(), trained.get_weights()):
        np.testing.assert_allclose(after, before, atol=1e-6)


@pytest.mark.parametrize("update,message", [
    ("k=0", "k=0"),
    ("dataset.name=moving_dots", "dataset.name='moving_dots'"),
    ("network.name=resnet", "network.name='resnet'"),
    ("noise.prob=1.5", "noise.prob=1.5"),
    ("init_weights=/nonexistent/best.weights.h5", "init_weights='/nonexistent/best.weights.h5'"),
    ("training.batch_size=0", "training.batch_size=0"),
    ("em.loss_step_weights=first", "em.loss_step_weights='first'"),
    ("training.time_limit_minutes=-1", "training.time_limit_minutes=-1"),
    ("network.step_size=0.5", "network.step_size=0.5"),  # the default network is RNN-EM's, not N-EM's
    ("training.monitor=val_acc", "training.monitor='val_acc'"),
    ("training.keep_epoch_weights=yes", "training.keep_epoch_weights='yes'"),
])
def test_invalid_configuration_fails_before_training(tmp_path, monkeypatch, update, message):
    from neural_em.train import ex

    monkeypatch.chdir(tmp_path)
    key, value = update.split("=", 1)
    with pytest.raises(experiment.ConfigError) as error:
        ex.run(config_updates={key: _parse(value)}, options={"--unobserved": True})
    assert message in str(error.value)
    assert not (tmp_path / "runs" / "checkpoints").exists()
    assert not (tmp_path / "data").exists()  # no data set generated either


def _nem_config(step_size, seed=0):
    return {"seed": seed, "k": 4, "checkpoint_dir": None, "dataset": {"name": "shapes"},
            "network": {"name": "NEM", "layers": None, "step_size": step_size}}


# The paper's appendix A: flying MNIST trains with learning rate 0.0005, "from the second stage
# onwards in case of stage-wise training"; everything else with Adam's default 0.001.
PAPER_LEARNING_RATES = {"flying_mnist_direct": 0.0005, "flying_mnist_stage2_500": 0.0005,
                        "flying_mnist_stage3_all": 0.0005}


@pytest.mark.parametrize("path", sorted((ROOT / "sacred_configs").glob("*.yaml")), ids=lambda path: path.stem)
def test_experiment_config_files_are_valid_and_use_the_papers_learning_rate(path):
    ex = experiment.make_experiment("config_file_check")
    ex.main(lambda _config: _config)
    # The stage files start from the previous stage's weights, which a fresh checkout lacks.
    config = ex.run(named_configs=[str(path)], config_updates={"init_weights": None},
                    options={"--unobserved": True}).result
    experiment.check_config(config)
    assert config["training"]["learning_rate"] == PAPER_LEARNING_RATES.get(path.stem, 0.001)


def test_nem_step_size_starts_where_the_config_says():
    assert experiment.network_spec(_nem_config(None)) == "NEM"  # the preset, η starting at 1.0
    net = build_inner_network(experiment.network_spec(_nem_config(-0.5)), 784)
    net.build((None, 784))
    assert float(net.step_size) == -0.5
    reloaded = type(net).from_config(net.get_config())
    reloaded.build((None, 784))
    assert float(reloaded.step_size) == -0.5

    draws = [experiment.network_spec(_nem_config("uniform", seed))["step_size"] for seed in range(20)]
    assert draws[:3] == [experiment.network_spec(_nem_config("uniform", seed))["step_size"] for seed in range(3)]
    assert all(abs(eta) <= np.sqrt(3) for eta in draws)
    assert min(draws) < 0 < max(draws)  # some runs start by descending, as in the published code
    with pytest.raises(experiment.ConfigError, match="network.step_size='fast'"):
        experiment.network_spec(_nem_config("fast"))


def _train_one_epoch_in_process(data, checkpoint_dir, updates):
    """One epoch of ``train`` on the tiny data set, in this process and unobserved; returns the Sacred run."""
    from neural_em.train import ex

    config = {"dataset.path": str(data), "k": 2, "training.max_epochs": 1, "checkpoint_dir": str(checkpoint_dir),
              **{key: _parse(value) for key, value in (update.split("=", 1) for update in TINY)}, **updates}
    return ex.run(config_updates=config, options={"--unobserved": True})


def _weights_and_history(checkpoint_dir):
    """The weights of a checkpoint folder's last.keras and its per-epoch history."""
    model = keras.saving.load_model(checkpoint_dir / training.LAST_MODEL)
    return model.get_weights(), json.loads((checkpoint_dir / training.STATE).read_text())["history"]


def test_training_records_the_drawn_step_size(tmp_path, monkeypatch, tiny_shapes):
    monkeypatch.chdir(tmp_path)
    run = _train_one_epoch_in_process(tiny_shapes, tmp_path / "ckpt",
                                      {"network.name": "NEM", "network.step_size": "uniform", "seed": 3})
    drawn = experiment.network_spec(_nem_config("uniform", seed=3))["step_size"]
    assert run.info["initial_step_size"] == drawn
    first_epoch = keras.saving.load_model(tmp_path / "ckpt" / training.LAST_MODEL)
    assert first_epoch.cell.inner.initial_step_size == drawn  # the model was built from the drawn η
    # η after each epoch is on record, and it is the trained one, not the start
    history = json.loads((tmp_path / "ckpt" / training.STATE).read_text())["history"]
    assert history["step_size"] == [pytest.approx(training.learned_step_size(first_epoch))]
    assert history["step_size"][0] != drawn
    assert training.learned_step_size(NeuralEM("shapes", (6, 6, 1), k=2, nr_steps=2, seed=0)) is None


def test_the_seed_decides_the_run(tmp_path, monkeypatch, tiny_shapes):
    """Weights, γ's start, data order and noise all follow the config's seed, so a run repeats exactly."""
    monkeypatch.chdir(tmp_path)

    def trained(seed, name):
        _train_one_epoch_in_process(tiny_shapes, tmp_path / name, {"seed": seed})
        return _weights_and_history(tmp_path / name)

    first_weights, first_history = trained(3, "first")
    again_weights, again_history = trained(3, "again")
    other_weights, other_history = trained(4, "other")
    assert again_history == first_history
    for first, again in zip(first_weights, again_weights, strict=True):
        np.testing.assert_array_equal(again, first)
    assert other_history["val_loss"] != first_history["val_loss"]
    assert not np.array_equal(other_weights[0], first_weights[0])


def test_a_resumed_run_trains_as_an_uninterrupted_one(tmp_path, monkeypatch, tiny_shapes):
    """Stopping after epoch 1 and resuming gives the weights of two epochs in one go: epoch 2 sees
    epoch 2's data order and noise, not epoch 1's again."""
    monkeypatch.chdir(tmp_path)
    _train_one_epoch_in_process(tiny_shapes, tmp_path / "straight", {"training.max_epochs": 2})
    _train_one_epoch_in_process(tiny_shapes, tmp_path / "resumed", {})
    _train_one_epoch_in_process(tiny_shapes, tmp_path / "resumed", {"training.max_epochs": 2})

    straight_weights, straight_history = _weights_and_history(tmp_path / "straight")
    resumed_weights, resumed_history = _weights_and_history(tmp_path / "resumed")
    # Replaying epoch 1's order and noise (as resumed runs did before `first_epoch`) moved epoch 2's
    # loss by about 1e-3 (relative); what remains now is rounding: within 1e-5, weights within 1e-4.
    assert resumed_history["loss"] == pytest.approx(straight_history["loss"], rel=1e-5)
    for straight, resumed in zip(straight_weights, resumed_weights, strict=True):
        np.testing.assert_allclose(resumed, straight, rtol=0, atol=1e-4)


def test_step_size_key_keeps_the_checkpoint_folders_of_older_runs():
    older = _nem_config(None)
    del older["network"]["step_size"]
    assert experiment.checkpoint_dir(_nem_config(None)) == experiment.checkpoint_dir(older)
    assert experiment.checkpoint_dir(_nem_config(0.5)) != experiment.checkpoint_dir(older)


def test_monitor_key_keeps_the_checkpoint_folders_of_older_runs():
    def config(**training):
        return {**_nem_config(None), "training": {"batch_size": 64, **training}}

    older = config()
    assert experiment.checkpoint_dir(config(monitor="val_loss")) == experiment.checkpoint_dir(older)
    assert experiment.checkpoint_dir(config(monitor="val_ami")) != experiment.checkpoint_dir(older)


def test_monitoring_the_ami_needs_it_scored(tmp_path, monkeypatch):
    from neural_em.train import ex

    monkeypatch.chdir(tmp_path)
    with pytest.raises(experiment.ConfigError, match=r"training.monitor='val_ami'.*scoring.valid_sequences=0"):
        ex.run(config_updates={"training": {"monitor": "val_ami"}, "scoring": {"valid_sequences": 0}},
               options={"--unobserved": True})
    assert not (tmp_path / "runs" / "checkpoints").exists()


def _parse(value):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


class PoisonWeightsAfterFirstEpoch(keras.callbacks.Callback):
    """Makes every weight NaN once epoch 1 is checkpointed, so epoch 2's loss is NaN."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            self.model.set_weights([np.full_like(w, np.nan) for w in self.model.get_weights()])


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_best_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    features = (rng.random((4, 1, 6, 6, 1)) > 0.5).astype("float32")
    batch = {"features": features, "noisy": features}
    model = NeuralEM("shapes", (6, 6, 1), k=2, nr_steps=2, seed=0)
    with pytest.raises(training.TrainingDiverged, match="became nan.*epoch 2.*best checkpoint .* intact"):
        training.train(model, tmp_path, batch, None, max_epochs=3, patience=3, verbose=0,
                       callbacks=[PoisonWeightsAfterFirstEpoch()])
    state = json.loads((tmp_path / training.STATE).read_text())
    assert state["epoch"] == 1 and state["best_epoch"] == 1
    restored = build(NeuralEM("shapes", (6, 6, 1), k=2, nr_steps=2))
    restored.load_weights(tmp_path / training.BEST_WEIGHTS)
    assert all(np.all(np.isfinite(w)) for w in restored.get_weights())


def test_a_checkpoint_that_cannot_be_loaded_is_named_and_left_alone(tmp_path):
    features = (np.random.default_rng(0).random((4, 1, 6, 6, 1)) > 0.5).astype("float32")
    batch = {"features": features, "noisy": features}
    training.train(NeuralEM("shapes", (6, 6, 1), k=2, nr_steps=2, seed=0), tmp_path, batch, None,
                   max_epochs=1, patience=3, verbose=0)
    last, state = tmp_path / training.LAST_MODEL, tmp_path / training.STATE
    damaged = last.read_bytes()[: last.stat().st_size // 2]  # e.g. a copy cut short
    last.write_bytes(damaged)
    state_before = state.read_text()
    with pytest.raises(ValueError, match=f"(?s)Cannot resume from {re.escape(str(last))} \\(epoch 1\\).*left as it is"):
        training.train(NeuralEM("shapes", (6, 6, 1), k=2, nr_steps=2, seed=0), tmp_path, batch, None,
                       max_epochs=2, patience=3, verbose=0)
    assert last.read_bytes() == damaged and state.read_text() == state_before


def test_time_limit_pauses_after_an_epoch_and_the_next_call_goes_on(tmp_path):
    rng = np.random.default_rng(0)
    features = (rng.random((4, 1, 6, 6, 1)) > 0.5).astype("float32")
    batch = {"features": features, "noisy": features}
    folder = tmp_path / "ckpt"

    def run(time_limit):
        model = NeuralEM("shapes", (6, 6, 1), k=2, nr_steps=2, seed=0)
        return training.train(model, folder, batch, None, max_epochs=3, patience=3, verbose=0, time_limit=time_limit)

    # Any epoch takes longer than a nanosecond, so each call trains exactly one epoch.
    for epoch in (1, 2):
        _, state = run(time_limit=1e-9)
        assert state["epoch"] == epoch and not state["finished"]
        assert "time limit" in state["stop_reason"]
        assert json.loads((folder / training.STATE).read_text())["epoch"] == epoch
    _, state = run(time_limit=None)
    assert state["epoch"] == 3 and state["finished"]
    assert state["stop_reason"] == "reached max_epochs=3"
    assert len(state["history"]["loss"]) == 3


def test_raising_max_epochs_extends_a_finished_run_but_not_an_early_stopped_one(tmp_path):
    features = (np.random.default_rng(0).random((4, 1, 6, 6, 1)) > 0.5).astype("float32")
    batch = {"features": features, "noisy": features}

    def run(folder, max_epochs):
        model = NeuralEM("shapes", (6, 6, 1), k=2, nr_steps=2, seed=0)
        return training.train(model, folder, batch, None, max_epochs=max_epochs, patience=3, verbose=0)

    _, state = run(tmp_path / "a", 1)
    assert state["finished"] and state["stop_reason"] == "reached max_epochs=1"
    _, state = run(tmp_path / "a", 2)
    assert state["epoch"] == 2 and state["finished"] and state["stop_reason"] == "reached max_epochs=2"
    assert len(state["history"]["loss"]) == 2
    saved = json.loads((tmp_path / "a" / training.STATE).read_text())
    assert saved["epoch"] == 2 and len(saved["history"]["loss"]) == 2

    _, state = run(tmp_path / "b", 1)
    saved = json.loads((tmp_path / "b" / training.STATE).read_text())
    saved["stop_reason"] = "no lower validation loss for 3 epochs"  # as early stopping writes it
    (tmp_path / "b" / training.STATE).write_text(json.dumps(saved))
    _, state = run(tmp_path / "b", 2)
    assert state["epoch"] == 1 and state["finished"]
    assert state["stop_reason"] == "no lower validation loss for 3 epochs"


class KeepWeights(keras.callbacks.Callback):
    """Copies the weights at the end of every epoch."""

    def __init__(self):
        super().__init__()
        self.by_epoch = {}

    def on_epoch_end(self, epoch, logs=None):
        self.by_epoch[epoch + 1] = [np.array(w) for w in self.model.get_weights()]


def test_monitoring_the_validation_ami_keeps_its_best_epoch_and_stops_on_it(tmp_path, monkeypatch):
    features = (np.random.default_rng(0).random((4, 1, 6, 6, 1)) > 0.5).astype("float32")
    batch = {"features": features, "noisy": features}
    scripted = iter([0.2, 0.5, float("nan"), 0.4, 0.45, 0.9])  # epochs 1, 2, ...

    def fake_scores(model, batches, average_method="max"):
        ami = np.array([next(scripted)])
        return {"ami_weighted": ami, "ami_last": ami, "ari_weighted": ami, "confidence": ami}

    monkeypatch.setattr(training, "score_model", fake_scores)
    kept = KeepWeights()
    model = NeuralEM("shapes", (6, 6, 1), k=2, nr_steps=2, seed=0)
    _, state = training.train(model, tmp_path, batch, None, max_epochs=6, patience=3, verbose=0,
                              score_batches=lambda: None, monitor="val_ami", callbacks=[kept])
    # The AMI peaks at epoch 2 and is not passed in epochs 3-5 (a NaN AMI counts as no better).
    assert state["epoch"] == 5 and state["finished"] and state["best_epoch"] == 2
    assert state["best_ami"] == 0.5 and state["monitor"] == "val_ami"
    assert state["stop_reason"] == "no higher validation AMI for 3 epochs"
    best = build(NeuralEM("shapes", (6, 6, 1), k=2, nr_steps=2))
    best.load_weights(tmp_path / training.BEST_WEIGHTS)
    for loaded, at_epoch_2 in zip(best.get_weights(), kept.by_epoch[2], strict=True):
        np.testing.assert_array_equal(loaded, at_epoch_2)
    assert not np.array_equal(kept.by_epoch[2][0], kept.by_epoch[5][0])


def test_a_checkpoint_folder_keeps_its_monitor(tmp_path):
    features = (np.random.default_rng(0).random((4, 1, 6, 6, 1)) > 0.5).astype("float32")
    batch = {"features": features, "noisy": features}

    def run(**options):
        model = NeuralEM("shapes", (6, 6, 1), k=2, nr_steps=2, seed=0)
        return training.train(model, tmp_path, batch, None, max_epochs=2, patience=3, verbose=0, time_limit=1e-9,
                              **options)

    with pytest.raises(ValueError, match="monitor='val_ami' needs score_batches"):
        run(monitor="val_ami")
    with pytest.raises(ValueError, match="Unknown monitor 'val_acc'"):
        run(monitor="val_acc")
    assert not (tmp_path / training.STATE).exists()
    run()
    state_before = (tmp_path / training.STATE).read_text()
    assert json.loads(state_before)["monitor"] == "val_loss"
    with pytest.raises(ValueError, match=r"Cannot resume .* monitor='val_ami'.*follow 'val_loss'.*init_weights="):
        run(monitor="val_ami", score_batches=lambda: None)
    assert (tmp_path / training.STATE).read_text() == state_before
    _, state = run()
    assert state["epoch"] == 2


def test_epoch_curves_number_the_epochs_from_one_and_keep_the_asked_range(tmp_path):
    state = training.CheckpointState(tmp_path)
    state["history"] = {"val_loss": [3.0, 2.0, 1.5, 1.2], "val_ami": [0.1, 0.3, 0.4, 0.5]}
    state.save()
    assert training.epoch_curves(tmp_path)["val_loss"] == [(1, 3.0), (2, 2.0), (3, 1.5), (4, 1.2)]
    assert training.epoch_curves(tmp_path, first_epoch=2, last_epoch=3)["val_ami"] == [(2, 0.3), (3, 0.4)]
    assert training.epoch_curves(state["history"], last_epoch=1) == {"val_loss": [(1, 3.0)], "val_ami": [(1, 0.1)]}
    with pytest.raises(FileNotFoundError, match=r"No state\.json in .*nowhere"):
        training.epoch_curves(tmp_path / "nowhere")


def test_best_weights_leave_out_the_optimizer_and_reload_to_the_trained_weights(tmp_path):
    rng = np.random.default_rng(0)
    features = (rng.random((4, 1, 6, 6, 1)) > 0.5).astype("float32")
    batch = {"features": features, "noisy": features}
    model, _ = training.train(NeuralEM("shapes", (6, 6, 1), k=2, nr_steps=2, seed=0), tmp_path, batch, None,
                              max_epochs=2, patience=3, verbose=0)
    with h5py.File(tmp_path / training.BEST_WEIGHTS) as saved:
        assert "optimizer" not in saved and "cell" in saved
    # Adam keeps two moments per weight: the model with its optimizer is about three times the size.
    assert (tmp_path / training.LAST_MODEL).stat().st_size > 2.5 * (tmp_path / training.BEST_WEIGHTS).stat().st_size

    restored = build(NeuralEM("shapes", (6, 6, 1), k=2, nr_steps=2, seed=1))  # another initialisation
    restored.load_weights(tmp_path / training.BEST_WEIGHTS)
    for loaded, trained in zip(restored.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(loaded, trained)


def test_few_hundred_steps_lower_the_loss_and_lift_ami_above_chance(tmp_path):
    path = registry.generate("shapes", out=tmp_path / "shapes.h5", train=512, valid=64, test=16, progress=False)
    info = dataset_info(path)
    model = NeuralEM("shapes", info.image_shape, k=3, nr_steps=5, seed=0)
    batches = training.make_batches(path, "training", 16, seed=0, noise_type="bitflip", noise_prob=0.1)
    scores = lambda: training.make_batches(path, "validation", 64, shuffle=False, with_groups=True,  # noqa: E731
                                           noise_type="bitflip", noise_prob=0.1)
    logged = {}
    model, state = training.train(
        model, tmp_path / "ckpt", batches, None, max_epochs=8, patience=8, learning_rate=3e-3,
        score_batches=scores, log_metric=lambda name, value, step: logged.setdefault(name, []).append(value),
        verbose=0)
    assert logged["loss"][-1] < 0.7 * logged["loss"][0]
    # Chance is AMI ≈ 0; a model that groups nothing scores 0.
    assert max(logged["val_ami"]) > 0.2, logged["val_ami"]


def test_resuming_under_other_settings_is_refused_and_names_them(tmp_path):
    features = (np.random.default_rng(0).random((4, 1, 6, 6, 1)) > 0.5).astype("float32")
    batch = {"features": features, "noisy": features}

    def run(learning_rate=1e-3, **settings):
        model = NeuralEM("shapes", (6, 6, 1), **{"k": 2, "nr_steps": 2, "seed": 0, **settings})
        # Any epoch takes longer than a nanosecond: each call trains one epoch and pauses.
        return training.train(model, tmp_path, batch, None, max_epochs=3, patience=3, verbose=0,
                              learning_rate=learning_rate, time_limit=1e-9)

    run()
    state_before = (tmp_path / training.STATE).read_text()
    with pytest.raises(ValueError, match=r"inter_weight: 1 in the checkpoint, 0\.2 now.*init_weights="):
        run(inter_weight=0.2)
    with pytest.raises(ValueError, match=r"learning_rate: 0\.001 in the checkpoint, 0\.0005 now"):
        run(learning_rate=5e-4)
    assert (tmp_path / training.STATE).read_text() == state_before
    _, state = run(unroll=True)  # how the loop is compiled may change
    assert state["epoch"] == 2


def test_stage_wise_training_from_a_keras_file_continues_adams_state(tmp_path, tiny_shapes):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    done = _train_cli(tmp_path, f"dataset.path={tiny_shapes}", "k=2", "training.max_epochs=1", *TINY,
                      f"checkpoint_dir={stage1}")
    assert done.returncode == 0, done.stdout + done.stderr
    source = keras.models.load_model(stage1 / training.LAST_MODEL)
    steps_per_epoch = int(source.optimizer.iterations.numpy())
    assert steps_per_epoch > 0
    done = _train_cli(tmp_path, f"dataset.path={tiny_shapes}", "k=2", "training.max_epochs=1", *TINY,
                      f"init_weights={stage1 / training.LAST_MODEL}", "training.learning_rate=0.0005",
                      f"checkpoint_dir={stage2}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Starting from the weights and Adam's state" in done.stdout
    continued = keras.models.load_model(stage2 / training.LAST_MODEL).optimizer
    assert int(continued.iterations.numpy()) == 2 * steps_per_epoch  # counted on from stage 1
    assert float(continued.learning_rate.numpy()) == pytest.approx(0.0005)  # the new stage's rate


def test_copy_optimizer_state_keeps_the_learning_rate_and_refuses_another_model(tmp_path):
    features = (np.random.default_rng(0).random((4, 1, 6, 6, 1)) > 0.5).astype("float32")
    batch = {"features": features, "noisy": features}
    trained, _ = training.train(NeuralEM("shapes", (6, 6, 1), k=2, nr_steps=2, seed=0), tmp_path, batch, None,
                                max_epochs=1, patience=3, verbose=0)
    source = trained.optimizer
    target_model = build(NeuralEM("shapes", (6, 6, 1), k=3, nr_steps=2, seed=1))  # K does not change the weights
    target_model.compile(optimizer=keras.optimizers.Adam(0.0005))
    training.copy_optimizer_state(source, target_model)
    target = target_model.optimizer
    assert int(target.iterations.numpy()) == int(source.iterations.numpy()) == 1
    assert float(target.learning_rate.numpy()) == pytest.approx(0.0005)
    for from_variable, to_variable in zip(source.variables[2:], target.variables[2:]):  # the moments
        np.testing.assert_array_equal(np.asarray(to_variable), np.asarray(from_variable))

    other = build(NeuralEM("shapes", (8, 8, 1), k=2, nr_steps=2))  # 64 pixels: other weight shapes
    other.compile(optimizer=keras.optimizers.Adam(0.001))
    with pytest.raises(ValueError, match=r"Cannot continue the state of Adam \(\d+ variables\) in Adam"):
        training.copy_optimizer_state(source, other)


def test_keep_epoch_weights_reaches_training_from_the_config_and_keeps_the_folder_name(tmp_path, monkeypatch,
                                                                                       tiny_shapes):
    monkeypatch.chdir(tmp_path)
    _train_one_epoch_in_process(tiny_shapes, tmp_path / "ckpt", {"training.keep_epoch_weights": True})
    assert (tmp_path / "ckpt" / training.EPOCH_WEIGHTS.format(epoch=1)).is_file()
    # a saving choice, not a model setting: the same run resumes in the same default folder either way
    def config(**training):
        return {**_nem_config(None), "training": {"batch_size": 64, **training}}

    assert experiment.checkpoint_dir(config(keep_epoch_weights=True)) == experiment.checkpoint_dir(config())
