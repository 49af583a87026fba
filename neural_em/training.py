"""Training with checkpoints, early stopping, resumption and validation scores.

Knows nothing of Sacred: metrics leave through a ``log_metric(name, value,
step)`` callable, so the loop can be used and tested on its own.

A checkpoint folder holds
  ``last.keras``         model and optimizer after the last finished epoch,
  ``best.weights.h5``    weights of the epoch with the lowest validation loss,
                         without the optimizer's state (a third of the size),
  ``state.json``         epoch, early-stopping counters, best scores, history
                         (per-epoch losses, validation scores and, for N-EM, η).
Each file is written beside its final name and renamed, so a run killed at any
moment leaves the previous epoch's checkpoint intact; training started again on
the same folder goes on from there.
"""

import json
import math
import os
import time
from pathlib import Path

import keras
import numpy as np
# The public save/load_weights have no way to leave the optimizer out; keras is pinned (requirements.txt).
from keras.src.saving import saving_lib

from neural_em import metrics
from neural_em.model.losses import intra_cluster_loss
from neural_em.model.networks import NEMStep
from neural_em.data.pipeline import H5Batches, make_tf_dataset

LAST_MODEL = "last.keras"
BEST_WEIGHTS = "best.weights.h5"
STATE = "state.json"
EPOCH_WEIGHTS = "epochs/epoch{epoch:03d}.weights.h5"  # with keep_epoch_weights: every epoch's weights


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def make_batches(path, split, batch_size, **options):
    """The pipeline that suits the backend: ``tf.data`` on TensorFlow, a PyDataset elsewhere."""
    if keras.backend.backend() == "tensorflow":
        return make_tf_dataset(path, split, batch_size, **options)
    return H5Batches(path, split, batch_size, **options)


def score_model(model, batches, *, average_method="max", max_batches=None):
    """Grouping scores of a model on batches that carry ground-truth 'groups'.

    Returns:
        dict of per-sequence arrays: per step (N, S) 'ami', 'ari', 'confidence',
        'upper_bound_bce', 'occluded_pixels' and the OBJECT_COUNTS, and (N,) the weighted (loss step weights) and
        last-step scores that ``with_sequence_scores`` adds.
    """
    per_batch, weights = [], None
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        batch = {name: np.asarray(value) for name, value in batch.items()}
        per_batch.append(score_batch(model, batch, average_method)[0])
        weights = model.step_weights(batch["features"].shape[1])
    scores = {name: np.concatenate([scores[name] for scores in per_batch]) for name in per_batch[0]}
    return with_sequence_scores(scores, weights)


OBJECT_COUNTS = ("objects", "objects_split", "objects_merged")  # from metrics.grouping_scores


def score_batch(model, batch, average_method="max", overlap_threshold=0.0):
    """Per-step scores of one batch with 'features', 'noisy' and 'groups'.

    Static images are scored at every EM step against the same groups; sequences at
    step t against the groups of frame t + 1, the frame step t predicts.
    ``overlap_threshold`` is passed to ``metrics.occluded_pixels``.

    Returns:
        (scores, outputs): scores holds (B, S) arrays 'ami', 'ari', 'confidence', 'upper_bound_bce',
        'occluded_pixels' (pixels of the scored frame where objects overlap, see ``metrics.occluded_pixels``),
        and the OBJECT_COUNTS (objects, and those split or merged, see ``metrics.object_errors_of_tables``);
        outputs the arrays 'gamma', 'psi', 'targets' and 'groups' (see ``Evaluation.example``).
    """
    outputs = model.predict_on_batch(batch)
    gamma, psi = np.asarray(outputs["gamma"]), np.asarray(outputs["psi"])  # (B, S, K, H, W, 1), (B, S, K, H, W, C)
    groups = np.asarray(model.em_targets(batch["groups"]))  # (B, S, H, W, 1)
    targets = np.asarray(model.em_targets(batch["features"]))  # (B, S, H, W, C)
    grouping = metrics.grouping_scores(groups, gamma, average_method=average_method)
    scores = {name: grouping[name] for name in ("ami", "ari", "confidence", *OBJECT_COUNTS)}
    scores["upper_bound_bce"] = upper_bound_per_sequence(psi, targets, model.distribution)
    scores["occluded_pixels"] = metrics.occluded_pixels(targets, groups, overlap_threshold)  # (B, S)
    return scores, dict(gamma=gamma, psi=psi, targets=targets, groups=groups)


def upper_bound_per_sequence(psi, targets, distribution):
    """``losses.upper_bound_loss`` for each sequence and step: −log P(x | max_k ψ) summed over pixels.

    Args:
        psi: (B, S, K, H, W, C) predictions; targets: (B, S, H, W, C) the frames they are scored against.
    Returns:
        float64 (B, S); its mean over B is ``upper_bound_loss`` of that step.
    """
    best = psi.max(axis=2, keepdims=True)  # (B, S, 1, H, W, C)
    loss = np.asarray(intra_cluster_loss(best, targets[:, :, None], distribution))  # (B, S, 1, H, W, C)
    return loss.sum(axis=(2, 3, 4, 5), dtype=np.float64)


def with_sequence_scores(scores, step_weights):
    """Adds each sequence's weighted and last-step scores, and the step weights."""
    for name in ("ami", "ari"):
        combined = metrics.sequence_scores(scores[name], step_weights)
        scores[f"{name}_weighted"], scores[f"{name}_last"] = combined["weighted"], combined["last"]
    for name in ("confidence", "upper_bound_bce"):
        scores[f"{name}_weighted"] = metrics.sequence_scores(scores[name], step_weights)["weighted"]
    scores["step_weights"] = np.asarray(step_weights)
    return scores


def _atomic_write_text(path, text):
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save(save, path):
    # Keras picks the format from the suffix, so the temporary name keeps it.
    tmp = path.with_name("partial-" + path.name)
    save(str(tmp))
    os.replace(tmp, path)


def save_model_weights(model, path):
    """Saves the model's weights alone: Keras' ``save_weights`` adds Adam's two moments per weight.

    Evaluation, export and stage-wise training need only the weights, and a file a third of the
    size is easier to commit and to copy between machines.
    """
    saving_lib.save_weights_only(model, str(path), objects_to_skip=_optimizer_of(model))


def load_model_weights(model, path):
    """Loads weights saved with or without an optimizer's state; a compiled model's optimizer is left as it is."""
    saving_lib.load_weights_only(model, str(path), objects_to_skip=_optimizer_of(model))


def _optimizer_of(model):
    optimizer = getattr(model, "optimizer", None)  # an uncompiled model has none
    return [optimizer] if optimizer is not None else None


class CheckpointState:
    """What survives an interruption besides the weights."""

    def __init__(self, folder):
        self.path = Path(folder) / STATE
        self.data = {"epoch": 0, "best_val_loss": math.inf, "best_epoch": None, "wait": 0,
                     "best_ami": None, "finished": False, "stop_reason": None, "history": {}}
        if self.path.exists():
            try:
                self.data.update(json.loads(self.path.read_text()))
            except json.JSONDecodeError as error:
                raise ValueError(f"Checkpoint state {self.path} is not valid JSON ({error}); "
                                 "delete the checkpoint folder or pass another one.") from error

    def __getitem__(self, key):
        return self.data[key]

    def __setitem__(self, key, value):
        self.data[key] = value

    def save(self):
        _atomic_write_text(self.path, json.dumps(self.data, indent=1, allow_nan=True))


def epoch_curves(source, first_epoch=1, last_epoch=None):
    """A run's per-epoch history as ``(epoch, value)`` pairs, the input of ``plots.learning_curves``.

    Args:
        source: a checkpoint folder (its ``state.json`` is read) or a history dict
            (name -> one value per epoch, epoch 1 first).
        first_epoch, last_epoch: keep epochs in this inclusive range; ``last_epoch=None`` keeps all.

    Returns:
        name -> [(epoch, value), ...] for every metric in the history.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source) / STATE
        if not path.is_file():
            raise FileNotFoundError(f"No {STATE} in {source}: expected a checkpoint folder written by training.")
        history = CheckpointState(source)["history"]
    else:
        history = source
    last_epoch = math.inf if last_epoch is None else last_epoch
    return {name: [(epoch, value) for epoch, value in enumerate(values, 1) if first_epoch <= epoch <= last_epoch]
            for name, values in history.items()}


def learned_step_size(model):
    """N-EM's current step size η as a float, or None for a model whose M-step has none."""
    inner = model.cell.inner
    return float(keras.ops.convert_to_numpy(inner.step_size)) if isinstance(inner, NEMStep) else None


class EpochEnd(keras.callbacks.Callback):
    """Scores, logs, checkpoints and early-stops at the end of every epoch.

    Args:
        folder: the checkpoint folder.
        state: its CheckpointState.
        patience: epochs without a better monitored value before stopping.
        score_batches: a callable returning batches with 'groups' for AMI/ARI, or None.
        log_metric: ``log_metric(name, value, epoch)``, e.g. Sacred's ``_run.log_scalar``.
        average_method: AMI normaliser.
        time_limit: seconds this run may take, or None; training pauses after the last epoch
            expected to end within it (the next run of the same command resumes).
        monitor: what picks the best epoch and drives early stopping: 'val_loss' (lowest) or
            'val_ami' (highest; needs ``score_batches``).
        keep_epoch_weights: also save every epoch's weights as ``EPOCH_WEIGHTS`` in the folder.
    """

    def __init__(self, folder, state, patience, score_batches=None, log_metric=None, average_method="max",
                 time_limit=None, monitor="val_loss", keep_epoch_weights=False):
        super().__init__()
        self.folder = Path(folder)
        self.state = state
        self.patience = patience
        self.monitor = monitor
        self.score_batches = score_batches
        self.log_metric = log_metric or (lambda name, value, step: None)
        self.average_method = average_method
        self.time_limit = time_limit
        self.keep_epoch_weights = keep_epoch_weights
        self.diverged = None
        self.paused = None
        self.started = self.epoch_started = time.monotonic()

    def on_train_begin(self, logs=None):
        self.started = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.diverged = f"the training loss became {float(loss)} in batch {batch} of epoch {self.state['epoch'] + 1}"
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.diverged:
            return  # keep the last good checkpoint
        logs = dict(logs or {})
        if self.score_batches is not None:
            scores = score_model(self.model, self.score_batches(), average_method=self.average_method)
            logs["val_ami"] = float(np.mean(scores["ami_weighted"]))
            logs["val_ami_last"] = float(np.mean(scores["ami_last"]))
            logs["val_ari"] = float(np.mean(scores["ari_weighted"]))
            logs["val_confidence"] = float(np.mean(scores["confidence"]))
        step_size = learned_step_size(self.model)
        if step_size is not None:
            logs["step_size"] = step_size  # where N-EM's η goes from its start is part of the N-EM finding
        if self.params.get("verbose"):
            shown = [name for name in ("val_ami", "val_ari", "step_size") if name in logs]
            if shown:
                print(f"Epoch {epoch + 1}: " + ", ".join(f"{name}={logs[name]:.4f}" for name in shown))
        for name, value in logs.items():
            value = float(value)
            self.log_metric(name, value, epoch + 1)
            self.state["history"].setdefault(name, []).append(value)

        val_loss = float(logs.get("val_loss", logs["loss"]))
        if not math.isfinite(val_loss):
            self.diverged = f"the validation loss became {val_loss} in epoch {epoch + 1}"
            self.model.stop_training = True
            return
        if self._improved(val_loss, logs.get("val_ami")):
            self.state["best_val_loss"], self.state["best_epoch"], self.state["wait"] = val_loss, epoch + 1, 0
            self.state["best_ami"] = logs.get("val_ami")
            self._save_weights(self.folder / BEST_WEIGHTS)
        else:
            self.state["wait"] += 1
        self.state["epoch"] = epoch + 1
        if self.state["wait"] >= self.patience:
            self.state["stop_reason"] = f"no {MONITORS[self.monitor]} for {self.patience} epochs"
            self.model.stop_training = True
        elif self.time_limit is not None and epoch + 1 < self.params.get("epochs", math.inf):
            now = time.monotonic()
            # The next epoch is assumed to take as long as this one (which includes its scoring).
            if now - self.started + (now - self.epoch_started) > self.time_limit:
                self.paused = f"time limit of {self.time_limit:g} s reached after epoch {epoch + 1}"
                self.state["stop_reason"] = self.paused
                self.model.stop_training = True
        if self.keep_epoch_weights:
            path = self.folder / EPOCH_WEIGHTS.format(epoch=epoch + 1)
            path.parent.mkdir(exist_ok=True)
            self._save_weights(path)
        _atomic_save(self.model.save, self.folder / LAST_MODEL)
        self.state.save()

    def _save_weights(self, path):
        _atomic_save(lambda tmp: save_model_weights(self.model, tmp), path)

    def _improved(self, val_loss, val_ami):
        if self.monitor == "val_ami":
            best = self.state["best_ami"]
            # A NaN AMI never improves; the first finite one does.
            return val_ami is not None and val_ami > (-math.inf if best is None else best)
        return val_loss < self.state["best_val_loss"]


# What picks best.weights.h5 and stops early, with its early-stopping message.
MONITORS = {"val_loss": "lower validation loss", "val_ami": "higher validation AMI"}
REACHED_MAX_EPOCHS = "reached max_epochs"  # the stop reason of a run that may be extended
SETTINGS_FREE_ON_RESUME = ("unroll",)  # how the loop is compiled, not what it computes


def _check_resumed_settings(folder, model, resumed, learning_rate):
    """Refuses to resume a checkpoint under other model settings or another learning rate.

    The checkpoint's own model and optimizer would silently win, so a changed setting
    (say ``em.inter_weight``) with an explicit ``checkpoint_dir`` would train on as before.
    """
    def canonical(value):  # the checkpoint's settings went through JSON: tuples came back as lists
        return json.loads(json.dumps(value, default=str))

    changed = {key: (resumed.settings.get(key), value) for key, value in model.settings.items()
               if key not in SETTINGS_FREE_ON_RESUME and canonical(resumed.settings.get(key)) != canonical(value)}
    saved_rate = float(keras.ops.convert_to_numpy(resumed.optimizer.learning_rate))
    if not math.isclose(saved_rate, learning_rate, rel_tol=1e-6):
        changed["learning_rate"] = (saved_rate, learning_rate)
    if changed:
        def show(value):
            return f"{value:.6g}" if isinstance(value, float) else repr(value)

        listed = "; ".join(f"{key}: {show(old)} in the checkpoint, {show(new)} now"
                           for key, (old, new) in changed.items())
        raise ValueError(
            f"Cannot resume from {folder / LAST_MODEL}: it was trained with other settings ({listed}). "
            "Resume it with the settings it was trained with, or give a new checkpoint_dir "
            f"(with init_weights={folder / BEST_WEIGHTS} to start from its weights).")


def copy_optimizer_state(source, model):
    """Gives ``model``'s (compiled, unbuilt) optimizer the moments and step count of ``source``.

    The published code's stage-wise training restores a TF1 checkpoint of every variable,
    Adam's moments included, and goes on with a new learning rate; this does the same: the
    learning rate stays the one ``model`` was compiled with.

    Args:
        source: an optimizer of the same kind, built for a model of the same architecture.
        model: the model to train next, compiled.
    Raises:
        ValueError: the optimizers' kinds or variables do not match.
    """
    target = model.optimizer
    target.build(model.trainable_variables)
    sources, targets = list(source.variables), list(target.variables)
    shapes = [tuple(v.shape) for v in sources], [tuple(v.shape) for v in targets]
    if type(source) is not type(target) or shapes[0] != shapes[1]:
        raise ValueError(
            f"Cannot continue the state of {type(source).__name__} ({len(sources)} variables) in "
            f"{type(target).__name__} ({len(targets)} variables, not all of the same shapes): the two models or "
            "optimizers differ (start from a *.weights.h5 file instead for a fresh optimizer).")
    for from_variable, to_variable in zip(sources, targets):
        if not to_variable.path.endswith("/learning_rate"):
            to_variable.assign(from_variable)


def train(model, folder, train_batches, valid_batches, *, max_epochs, patience, learning_rate=1e-3,
          score_batches=None, log_metric=None, average_method="max", jit_compile="auto", verbose=1, callbacks=(),
          time_limit=None, optimizer_source=None, monitor="val_loss", keep_epoch_weights=False):
    """Trains ``model`` (compiled here with Adam), or resumes from ``folder``.

    Args:
        model: a NeuralEM; replaced by the checkpoint's model when resuming.
        folder: the checkpoint folder (created).
        train_batches, valid_batches: pipelines of {'features', 'noisy'} batches.
        max_epochs: epochs in all, counting those before an interruption. A run that ended at
            a lower max_epochs goes on when it is raised; one that stopped early does not.
        patience: early-stopping patience on the monitored value.
        learning_rate: Adam's learning rate.
        score_batches: callable returning batches with 'groups' (a validation subset), or None.
        log_metric: called as ``log_metric(name, value, epoch)`` for every logged value.
        average_method: AMI normaliser ("max" is comparable with the paper).
        jit_compile: passed to ``Model.compile``.
        verbose: Keras progress bar (1) or none (0).
        callbacks: further Keras callbacks, run after the checkpointing one.
        time_limit: seconds this call may train, or None. It stops after the last epoch that is
            expected to end in time, unfinished: calling again resumes (for machines lent for
            a few minutes at a time).
        optimizer_source: an optimizer whose state a new run continues (``copy_optimizer_state``),
            or None for a fresh Adam; not used when resuming.
        monitor: 'val_loss' keeps the epoch of lowest validation loss as ``best.weights.h5`` and
            stops when it has not fallen for ``patience`` epochs (the published code's rule);
            'val_ami' does the same with the highest validation AMI (needs ``score_batches``).
            A checkpoint folder keeps the monitor it was started with.
        keep_epoch_weights: also keep every epoch's weights (without Adam's state) as
            ``epochs/epochNNN.weights.h5``, to average the last epochs' weights
            (``neural_em.averaging``) or score any epoch later.

    Returns:
        (model with the best weights loaded, CheckpointState).

    Raises:
        TrainingDiverged: the loss became NaN; the best checkpoint stays as it was.
    """
    if monitor not in MONITORS:
        raise ValueError(f"Unknown monitor {monitor!r}: expected one of {list(MONITORS)}.")
    if monitor == "val_ami" and score_batches is None:
        raise ValueError("monitor='val_ami' needs score_batches: the validation AMI is scored from them.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = CheckpointState(folder)
    started_with = state.data.get("monitor", "val_loss")  # folders from before this key used the loss
    if state["epoch"] > 0 and started_with != monitor:
        raise ValueError(
            f"Cannot resume {folder} with monitor={monitor!r}: its best checkpoint and early stopping follow "
            f"{started_with!r}. Resume it with {started_with!r}, or give a new checkpoint_dir "
            f"(with init_weights={folder / LAST_MODEL} to go on from its last epoch).")
    state["monitor"] = monitor
    if (folder / LAST_MODEL).exists() and state["epoch"] > 0:
        try:
            resumed = keras.models.load_model(folder / LAST_MODEL)  # with its optimizer state
        except ValueError as error:
            raise ValueError(
                f"Cannot resume from {folder / LAST_MODEL} (epoch {state['epoch']}): {error}\n"
                "The checkpoint is damaged or was written by a model this code builds differently (another "
                "network, or another version of neural_em); it is left as it is. Resume it with the code that "
                "wrote it, or give a new checkpoint_dir to start afresh.") from error
        _check_resumed_settings(folder, model, resumed, learning_rate)
        model = resumed
        if verbose:
            print(f"Resuming from {folder / LAST_MODEL} after epoch {state['epoch']}.")
    else:
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), jit_compile=jit_compile)
        if optimizer_source is not None:
            copy_optimizer_state(optimizer_source, model)

    stopped_early = state["finished"] and not str(state["stop_reason"]).startswith(REACHED_MAX_EPOCHS)
    if not stopped_early and state["epoch"] < max_epochs:
        # A paused run goes on, and so does one that ended at a lower max_epochs.
        state["finished"], state["stop_reason"] = False, None
        epoch_end = EpochEnd(folder, state, patience, score_batches, log_metric, average_method, time_limit,
                             monitor, keep_epoch_weights)
        model.fit(train_batches, validation_data=valid_batches, epochs=max_epochs, initial_epoch=state["epoch"],
                  callbacks=[epoch_end, *callbacks], verbose=verbose, shuffle=False)  # the pipelines shuffle
        if epoch_end.diverged:
            if state["best_epoch"] is None:
                kept = "No checkpoint had been written yet"
            else:
                kept = f"The best checkpoint {folder / BEST_WEIGHTS} (epoch {state['best_epoch']}) is intact"
            raise TrainingDiverged(
                f"Training stopped: {epoch_end.diverged}. {kept}; lower the learning rate or check the data.")
        if epoch_end.paused:
            if verbose:
                print(f"Paused: {epoch_end.paused}. Run the same command again to continue "
                      f"from epoch {state['epoch'] + 1}.")
        else:
            state["finished"] = True
            state["stop_reason"] = state["stop_reason"] or f"{REACHED_MAX_EPOCHS}={max_epochs}"
            state.save()
    if (folder / BEST_WEIGHTS).exists():
        load_model_weights(model, folder / BEST_WEIGHTS)
    return model, state
