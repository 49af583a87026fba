"""Train N-EM / RNN-EM: ``python -m neural_em.train with k=3``.

Every run is recorded by Sacred: in ``runs/neural_em.db`` (SQLite) by default,
in another SQL database with ``--db URL``, or in MongoDB with Sacred's ``-m``.
Run ``python -m neural_em.train print_config`` to see every setting.
"""

import keras
import numpy as np

from neural_em import experiment, observers, plots, training
from neural_em.data.pipeline import dataset_info
from neural_em.model.networks import NEMStep

ex = experiment.make_experiment("neural_em_train")


@ex.main
def train(_config, _run, seed):
    """Trains a model as configured; the result is the best validation AMI."""
    config = _config
    experiment.check_config(config)
    path = experiment.dataset_path(config["dataset"])
    info = dataset_info(path)
    _, noise_type = experiment.resolved_settings(config, info)
    model = experiment.make_model(config, info)
    if isinstance(model.cell.inner, NEMStep):
        step_size = model.cell.inner.initial_step_size
        _run.info["initial_step_size"] = step_size  # network.step_size='uniform' draws it: record what was drawn
        print(f"N-EM step size η starts at {step_size:.4f}.")
    optimizer_source = None
    if config["init_weights"]:
        experiment.build(model, info.frames)
        if config["init_weights"].endswith(".keras"):  # a whole model: Adam's state goes on too
            source = keras.models.load_model(config["init_weights"])  # read once, for weights and optimizer
            model.set_weights(source.get_weights())
            optimizer_source = source.optimizer
            print(f"Starting from the weights and Adam's state in {config['init_weights']}.")
        else:
            model.load_weights(config["init_weights"])
            print(f"Starting from the weights in {config['init_weights']}.")

    run_cfg = config["training"]
    # Static images get fresh noise at every EM step, as in the published code.
    noise = dict(noise_type=noise_type, noise_prob=config["noise"]["prob"], static_steps=config["nr_steps"])
    folder = experiment.checkpoint_dir(config)
    # A resumed run goes on with the order and noise of its next epoch, as if never interrupted.
    epochs_done = training.CheckpointState(folder)["epoch"] if config["resume"] else 0
    train_batches = training.make_batches(path, "training", run_cfg["batch_size"], shuffle=True, seed=seed,
                                          max_sequences=run_cfg["train_sequences"], first_epoch=epochs_done,
                                          **noise)
    valid_batches = training.make_batches(path, "validation", run_cfg["batch_size"], shuffle=False, seed=seed + 1,
                                          max_sequences=run_cfg["valid_sequences"], reshuffle_each_iteration=False,
                                          **noise)
    score_count = config["scoring"]["valid_sequences"]

    def score_batches():
        return training.make_batches(path, "validation", run_cfg["batch_size"], shuffle=False, seed=seed + 1,
                                     max_sequences=score_count, with_groups=True, reshuffle_each_iteration=False,
                                     **noise)

    if not config["resume"] and (folder / training.STATE).exists():
        raise experiment.ConfigError(
            f"Checkpoint folder {folder} already holds a run and resume=False; "
            "pass another checkpoint_dir or delete the folder.")
    _run.info["checkpoint_dir"] = str(folder)
    print(f"Checkpoints: {folder}")
    model, state = training.train(
        model, folder, train_batches, valid_batches,
        max_epochs=run_cfg["max_epochs"], patience=run_cfg["patience"], learning_rate=run_cfg["learning_rate"],
        score_batches=score_batches if score_count else None, log_metric=_run.log_scalar,
        average_method=config["scoring"]["average_method"], jit_compile=run_cfg["jit_compile"],
        verbose=run_cfg["verbose"],
        time_limit=None if run_cfg["time_limit_minutes"] is None else 60 * run_cfg["time_limit_minutes"],
        optimizer_source=optimizer_source, monitor=run_cfg["monitor"],
        keep_epoch_weights=run_cfg["keep_epoch_weights"],
    )
    _run.info.update(epochs=state["epoch"], best_epoch=state["best_epoch"], stop_reason=state["stop_reason"])

    _run.add_artifact(str(folder / training.BEST_WEIGHTS), "best.weights.h5")
    _save_debug_plots(model, folder, state, path, noise, _run)
    best_ami = state["best_ami"]
    if best_ami is None and "val_ami" in state["history"]:
        best_ami = float(np.nanmax(state["history"]["val_ami"]))
    return experiment.finite_or_none(best_ami)


def _save_debug_plots(model, folder, state, path, noise, run):
    """The learning curves and an overview figure of a few validation sequences."""
    history = training.epoch_curves(state["history"])
    if history:
        run.add_artifact(str(plots.learning_curves(history, folder / "learning_curves.png")))
    batch = next(iter(training.make_batches(path, "validation", 4, shuffle=False, max_sequences=4, **noise)))
    batch = {name: np.asarray(value) for name, value in batch.items()}
    outputs = model.predict_on_batch(batch)
    targets = np.asarray(model.em_targets(batch["features"]))  # (B, S, H, W, C)
    inputs = np.asarray(model.em_inputs(batch))  # (B, S, H, W, C)
    figure = plots.overview_figure(targets, inputs, np.asarray(outputs["psi"]), np.asarray(outputs["gamma"]),
                                   folder / "overview.png")
    run.add_artifact(str(figure))


def main(argv=None):
    observers.run_commandline(ex, argv)


if __name__ == "__main__":
    main()
