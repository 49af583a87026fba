"""Evaluate a trained model on a test set: ``python -m neural_em.evaluate with run_id=3``.

    python -m neural_em.evaluate with run_id=3                      # test-set scores of training run 3
    python -m neural_em.evaluate with run_id=3 k=5                  # another K
    python -m neural_em.evaluate with run_id=3 nr_steps=50          # static images, 50 EM steps
    python -m neural_em.evaluate with run_id=3 dataset.flying_shapes_5   # more objects
    python -m neural_em.evaluate with run_id=3 dataset.flying_mnist_51   # sequences of 50 steps
    python -m neural_em.evaluate with weights=best.weights.h5 dataset.flying_shapes network.flying_shapes sequential
    python -m neural_em.evaluate figure5 with figure5_runs=[7,8,9,10,11,12]   # Figure 5 from evaluations
    python -m neural_em.evaluate figure5 with 'figure5_files=["a/summary.json","b/summary.json"]'  # or their files

Which model: ``run_id`` names a training run in the run database; its best
weights and its whole configuration are used, and only the values given on this
command line (``k=5``, ``dataset.flying_shapes_5``, a config file, ...) replace
the trained ones. Naming another data set without ``dataset.path`` drops the
training run's data set file too. ``weights`` instead takes a weights file
(``best.weights.h5``, or a checkpoint folder's ``last.keras`` to score the last
finished epoch), and the model settings then come from this command line alone.
Weights do not depend on K or on the number of steps, so both can change freely.

Scores (SPEC §6): per image and step, the predicted cluster of a pixel is
argmax_k γ; AMI, ARI and confidence are taken over the pixels whose true group
is not 0. A sequence's score averages its steps with the loss step weights
("weighted"); "last" is the final step. AMI is normalised by max(H(U), H(V))
unless ``scoring.average_method`` says otherwise. The next-step BCE is the
upper-bound loss (BCE of max_k ψ against the frame it predicts). Inputs get the
configured input noise, as in training (``noise.prob=0`` turns it off).

Every evaluation is a Sacred run in the same database as training (``--db URL``
for another one); it logs the per-step scores and stores ``scores.npz``,
``ami_per_step.png``, ``overview.png`` (and ``overview.gif`` for sequences) as
artifacts and in ``output_dir``. Its result is the mean weighted AMI.
"""

import copy
import json
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from sacred.config import load_config_file
from sacred.utils import iterate_flattened
from tqdm.auto import tqdm

from neural_em import experiment, metrics, observers, plots, training
from neural_em.data import registry
from neural_em.data.pipeline import dataset_info
from neural_em.data.store import open_dataset

TRAIN_EXPERIMENT = "neural_em_train"
WEIGHTS_ARTIFACT = "best.weights.h5"
# Keras loads the weights from both; a .keras checkpoint's optimizer state is not needed and not read.
WEIGHTS_SUFFIXES = (".weights.h5", ".keras")
CONFIG_FILE_SUFFIXES = (".json", ".yaml", ".yml", ".pickle")

ex = experiment.make_experiment("neural_em_evaluate")


@ex.config
def evaluation_config():
    run_id = None  # a training run in the run database: its configuration and best weights
    weights = None  # or a *.weights.h5 file or a last.keras checkpoint; model settings then from this command line
    db = None  # database of run_id and figure5_runs; None: the one this run is recorded in, else runs/neural_em.db
    split = "test"  # data set split to score
    max_sequences = None  # score only the first n sequences of the split; None: all
    batch_size = 100
    output_dir = None  # None: runs/evaluations/<evaluation id>_<data set>_k<k>_s<steps>_<split>
    plots = True  # draw the AMI-per-step and overview pictures
    progress = True  # progress bar over batches
    figure5_runs = None  # evaluation run ids drawn by the `figure5` command
    figure5_files = None  # and/or evaluations' summary.json files (runs/evaluations/*/summary.json)


# Keys of this file's own config: never taken from a training run's config.
EVALUATION_KEYS = ("run_id", "weights", "db", "split", "max_sequences", "batch_size", "output_dir", "plots",
                   "progress", "figure5_runs", "figure5_files")


# ----------------------------------------------------------------------------- which model


class ModelSource(NamedTuple):
    """What a trained model is made of.

    Attributes:
        config: the full configuration of the model and data (training run's, overridden).
        weights: the weights file to load.
        training_run: the training run's record (``observers.get_run``), or None.
    """

    config: dict
    weights: Path
    training_run: dict | None


def run_database(config, run):
    """The database that holds ``run_id``: ``db``, else the one this run is recorded in, else the default."""
    if config["db"] is not None:
        return config["db"]
    for observer in run.observers:
        if isinstance(observer, observers.MetricsSqlObserver):
            return observer.db_url
    return observers.DEFAULT_DB_URL


def explicit_keys(run):
    """Dotted config keys set on the command line, by ``with key=value``, named configs or config files.

    Sacred's own ``config_modifications`` leaves out values equal to the defaults
    (``k=3``), which must still replace a training run's ``k=5``; so the raw
    updates and the named configs are read instead.

    Args:
        run: the Sacred run (``_run``) of any experiment made by ``experiment.make_experiment``
            (they share their named configs).
    Returns:
        A set of dotted keys, e.g. {"k", "dataset.name", "em.loss_step_weights"}.
    """
    updates = run.meta_info.get("config_updates") or {}
    keys = {key for key, _ in iterate_flattened(updates)}
    for name in run.meta_info.get("named_configs", []):
        keys |= _named_config_keys(name)
    return keys


def _named_config_keys(name):
    """Dotted keys that one named config (``sequential``, ``dataset.flying_shapes``) or config file sets."""
    if Path(name).suffix in CONFIG_FILE_SUFFIXES:
        values, prefix = load_config_file(name), ""
    else:
        owner, prefix, short_name = ex, "", name
        if "." in name:
            ingredient_path, short_name = name.rsplit(".", 1)
            owner = next(i for i in ex.ingredients if i.path == ingredient_path)
            prefix = ingredient_path + "."
        values = owner.named_configs[short_name]()
    return {prefix + key for key, _ in iterate_flattened(values)}


def merged_config(config, training_config, explicit, own_keys):
    """A training run's configuration with this command line's explicit values on top.

    Args:
        config: this run's full config (defaults plus command line).
        training_config: the training run's config.
        explicit: dotted keys set on this command line (``explicit_keys``).
        own_keys: top-level keys of this entry point's own config, always taken from ``config``.
    Returns:
        A new config dict.
    """
    merged = copy.deepcopy(training_config)
    _fill_missing(merged, config)  # keys added to the code after the training run
    for key in own_keys:
        merged[key] = copy.deepcopy(config[key])
    for key in explicit:
        _copy_value(config, merged, key)
    if "dataset.name" in explicit and "dataset.path" not in explicit:
        merged["dataset"]["path"] = None  # the training run's file holds the other data set
    # The weights of a stage-wise run's previous stage are not needed, and may be gone.
    merged["init_weights"] = None
    return merged


def _fill_missing(target, defaults):
    for key, value in defaults.items():
        if key not in target:
            target[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(target[key], dict) and key != "layers":
            _fill_missing(target[key], value)


def _copy_value(source, target, dotted_key):
    """target[a][b][c] = source[a][b][c]; a whole sub-dict where target has no dict at that level."""
    *parents, leaf = dotted_key.split(".")
    for part in parents:
        if not isinstance(target.get(part), dict):
            target[part] = copy.deepcopy(source[part])
            return
        source, target = source[part], target[part]
    target[leaf] = copy.deepcopy(source[leaf])


def resolve_model(config, run, own_keys, scratch_dir):
    """Finds the model to evaluate or export: a training run's, or a weights file with this config.

    Args:
        config: this run's config, with ``run_id``, ``weights`` and ``db``.
        run: the Sacred run (for the command line and the observer's database).
        own_keys: top-level keys of the caller's own config.
        scratch_dir: folder where a training run's weights artifact is written.
    Returns:
        A ModelSource.
    Raises:
        ConfigError: neither or both of run_id and weights, a missing weights file or one that is neither
            *.weights.h5 nor *.keras, or a run that is not a training run.
        LookupError: no such run, or a run without a weights artifact.
    """
    run_id, weights = config["run_id"], config["weights"]
    if (run_id is None) == (weights is None):
        raise experiment.ConfigError(
            f"Give exactly one of run_id (a training run in the run database) and weights (a *.weights.h5 file "
            "or a last.keras checkpoint); "
            f"got run_id={run_id!r}, weights={weights!r}.")
    if weights is not None:
        if not str(weights).endswith(WEIGHTS_SUFFIXES):
            raise experiment.ConfigError(
                f"Invalid configuration weights={weights!r}: expected a file written by training, either the "
                "best weights (*.weights.h5) or the last checkpoint (last.keras).")
        if not Path(weights).is_file():
            raise experiment.ConfigError(f"Invalid configuration weights={weights!r}: no such file; expected a "
                                         "file written by training (best.weights.h5 or last.keras).")
        return ModelSource(config, Path(weights), None)
    if isinstance(run_id, bool) or not isinstance(run_id, int):
        raise experiment.ConfigError(f"Invalid configuration run_id={run_id!r}: expected an integer run id.")
    db = run_database(config, run)
    training_run = observers.get_run(db, run_id)
    if training_run["experiment"] != TRAIN_EXPERIMENT:
        raise experiment.ConfigError(
            f"Run {run_id} in {observers.describe_db_url(db)} is a {training_run['experiment']!r} run, "
            f"not a training run ({TRAIN_EXPERIMENT!r}); pass the id of a training run.")
    weights = observers.load_artifact(db, run_id, WEIGHTS_ARTIFACT, Path(scratch_dir))
    merged = merged_config(config, training_run["config"], explicit_keys(run), own_keys)
    return ModelSource(merged, weights, training_run)


def load_model(config, info, weights):
    """The NeuralEM of ``config`` for a data set with ``info``, with the weights of ``weights`` loaded."""
    model = experiment.make_model(config, info)
    experiment.build(model, info.frames)
    try:
        model.load_weights(weights)
    except ValueError as error:
        network = experiment.network_spec(config)
        raise ValueError(f"Cannot load the weights {weights} into a {network!r} network for images of shape "
                         f"{info.image_shape}: {error}") from error
    return model


def trained_steps(training_config):
    """The number of EM steps a training run trained with; None where its data set cannot be found."""
    dataset = training_config["dataset"]
    path = Path(dataset["path"]) if dataset["path"] else registry.default_path(dataset["name"])
    if path.is_file():
        frames = dataset_info(path).frames
    elif dataset["name"] in registry.DATASETS:
        frames = registry.DATASETS[dataset["name"]].defaults["frames"]
    else:
        return None
    return training_config["nr_steps"] if frames == 1 else frames - 1


# ----------------------------------------------------------------------------- scoring


class Evaluation(NamedTuple):
    """Scores of a model on a split.

    Attributes:
        scores: dict of numpy arrays, per sequence and step (N, S): 'ami', 'ari', 'confidence',
            'upper_bound_bce', 'occluded_pixels'; per sequence (N,): 'ami_weighted', 'ami_last', 'ari_weighted',
            'ari_last', 'confidence_weighted', 'upper_bound_bce_weighted'; and 'step_weights' (S,).
        example: the first batch and the model's outputs on it, for pictures: 'targets' and
            'inputs' (B, S, H, W, C) (the clean frame each step is scored against, the noisy
            frame it sees), 'psi' (B, S, K, H, W, C), 'gamma' (B, S, K, H, W, 1),
            'groups' (B, S, H, W, 1), and 'frames', the batch's T.
    """

    scores: dict
    example: dict


def generator_option(path, name, default=None):
    """One of the generator options a data set file records; ``default`` where it records none."""
    with open_dataset(path) as data:
        return data.attrs.get("options", {}).get(name, default)


def group_threshold(path):
    """The grey value above which the data set's generator gave a pixel to an object (0 if none).

    Grey MNIST strokes fainter than it have group 0 although no two digits overlap there,
    so the occlusion split (``split_by_occlusion``) must not count them.
    """
    return float(generator_option(path, "group_threshold", 0.0))


def evaluate_model(model, path, split="test", *, batch_size=100, max_sequences=None, noise_type="bitflip",
                   noise_prob=0.1, seed=0, average_method="max", progress=True):
    """Scores a model on a data set split (SPEC §6), a batch at a time.

    Args:
        model: a built NeuralEM with its weights.
        path: the data set file.
        split: "training", "validation" or "test".
        batch_size: sequences per batch.
        max_sequences: score the first n sequences only; None: all.
        noise_type, noise_prob: input noise, as in training.
        seed: seed of the input noise.
        average_method: AMI normaliser ("max" is comparable with the paper).
        progress: show a progress bar.
    Returns:
        An Evaluation.
    """
    batches = training.make_batches(path, split, batch_size, shuffle=False, seed=seed, with_groups=True,
                                    max_sequences=max_sequences, noise_type=noise_type, noise_prob=noise_prob,
                                    static_steps=model.nr_steps, reshuffle_each_iteration=False)
    overlap_threshold = group_threshold(path)
    per_batch, example = [], None
    for batch in tqdm(batches, total=len(batches), desc=f"evaluating {split}", unit="batch", disable=not progress):
        batch = {name: np.asarray(value) for name, value in batch.items()}
        batch_scores, outputs = training.score_batch(model, batch, average_method, overlap_threshold)
        per_batch.append(batch_scores)
        if example is None:
            frames = batch["features"].shape[1]
            example = dict(outputs, inputs=np.asarray(model.em_inputs(batch)), frames=frames)
    scores = {name: np.concatenate([batch_scores[name] for batch_scores in per_batch]) for name in per_batch[0]}
    return Evaluation(training.with_sequence_scores(scores, model.step_weights(example["frames"])), example)




# ----------------------------------------------------------------------------- reporting

SUMMARY_ROWS = (  # (name in the summary, array in the scores, label)
    ("ami", "ami_weighted", "AMI (weighted over steps)"),
    ("ami_last", "ami_last", "AMI (last step)"),
    ("ari", "ari_weighted", "ARI (weighted over steps)"),
    ("ari_last", "ari_last", "ARI (last step)"),
    ("confidence", "confidence_weighted", "confidence (weighted)"),
    ("upper_bound_bce", "upper_bound_bce_weighted", "next-step BCE, upper bound (weighted)"),
)


def summarize(scores):
    """Means and standard deviations over sequences, and per-step quartiles.

    Returns:
        dict: for each SUMMARY_ROWS name, {'mean', 'std'} over sequences; 'per_step' with lists
        (one entry per step) 'ami_q25', 'ami_median', 'ami_q75', 'ami_mean', 'upper_bound_bce';
        'num_sequences' and 'steps'; 'by_occlusion' (see ``split_by_occlusion``); 'objects_last_step'
        (see ``object_errors``).
    """
    summary = {}
    for name, key, _ in SUMMARY_ROWS:
        summary[name] = {"mean": float(np.mean(scores[key])), "std": float(np.std(scores[key]))}
    q25, median, q75 = np.percentile(scores["ami"], [25, 50, 75], axis=0)  # each (S,)
    summary["per_step"] = {
        "ami_q25": q25.tolist(), "ami_median": median.tolist(), "ami_q75": q75.tolist(),
        "ami_mean": scores["ami"].mean(axis=0).tolist(),
        "upper_bound_bce": scores["upper_bound_bce"].mean(axis=0).tolist(),
    }
    summary["num_sequences"], summary["steps"] = scores["ami"].shape
    summary["by_occlusion"] = split_by_occlusion(scores)
    summary["objects_last_step"] = object_errors(scores)
    return summary


def object_errors(scores):
    """At the last step, the share of objects split over components and of those merged with another.

    Returns:
        dict with 'objects' (the count over all sequences) and 'split', 'merged' (shares of it;
        None without objects, and without the counts, in scores saved before they existed).
    """
    if "objects" not in scores:
        return {"objects": 0, "split": None, "merged": None}
    total = int(scores["objects"][:, -1].sum())
    shares = {name: float(scores[f"objects_{name}"][:, -1].sum() / total) if total else None
              for name in ("split", "merged")}
    return {"objects": total, **shares}


def split_by_occlusion(scores):
    """Last-step AMI of the sequences whose last scored frame has overlapping objects, and of the rest.

    Overlap is where grouping is ambiguous (a pixel of two shapes belongs to either), so the
    split tells a model that fails on overlapping objects from one that fails everywhere.

    Returns:
        dict with 'occluded' and 'unoccluded', each {'count', 'ami_last_mean'} ('ami_last_mean'
        None for an empty part).
    """
    occluded = scores["occluded_pixels"][:, -1] > 0  # (N,)
    parts = {}
    for name, members in (("occluded", occluded), ("unoccluded", ~occluded)):
        count = int(members.sum())
        mean = float(np.mean(scores["ami_last"][members])) if count else None
        parts[name] = {"count": count, "ami_last_mean": mean}
    return parts


def format_report(summary, title):
    """The summary as a plain-text table."""
    lines = [title, f"{'score':<40}{'mean':>10}{'std':>10}"]
    for name, _, label in SUMMARY_ROWS:
        lines.append(f"{label:<40}{summary[name]['mean']:>10.4f}{summary[name]['std']:>10.4f}")
    total = summary["num_sequences"]
    for name, label in (("occluded", "objects overlap"), ("unoccluded", "no overlap")):
        part = summary["by_occlusion"][name]
        mean = "-" if part["ami_last_mean"] is None else f"{part['ami_last_mean']:.4f}"
        lines.append(f"{'AMI (last step), ' + label:<40}{mean:>10}  ({part['count']} of {total} sequences)")
    errors = summary["objects_last_step"]
    for name, label in (("split", "objects split (last step)"), ("merged", "objects merged (last step)")):
        if errors[name] is not None:
            lines.append(f"{label:<40}{errors[name]:>10.4f}  (share of {errors['objects']} objects)")
    per_step = summary["per_step"]
    lines += ["", f"{'step':>4}{'AMI q25':>10}{'median':>10}{'q75':>10}{'BCE':>10}"]
    for step in range(summary["steps"]):
        lines.append(f"{step + 1:>4}{per_step['ami_q25'][step]:>10.4f}{per_step['ami_median'][step]:>10.4f}"
                     f"{per_step['ami_q75'][step]:>10.4f}{per_step['upper_bound_bce'][step]:>10.3f}")
    return "\n".join(lines)


def save_scores(scores, folder):
    """Writes the per-sequence scores as ``scores.npz``; returns its path."""
    path = Path(folder) / "scores.npz"
    np.savez_compressed(path, **scores)
    return path


def draw_pictures(evaluation, folder, trained=None):
    """The AMI-per-step figure (Figure 6), the overview figure, and its GIF for sequences.

    Args:
        evaluation: an Evaluation.
        folder: output folder.
        trained: steps the model was trained for (a marker in Figure 6), or None.
    Returns:
        The paths written.
    """
    folder, example = Path(folder), evaluation.example
    paths = [plots.ami_per_step(evaluation.scores["ami"], folder / "ami_per_step.png", label="test AMI",
                                trained_steps=trained)]
    paths.append(plots.overview_figure(example["targets"], example["inputs"], example["psi"], example["gamma"],
                                       folder / "overview.png"))
    if example["frames"] > 1:
        paths.append(plots.overview_gif(example["targets"], example["psi"], example["gamma"],
                                        folder / "overview.gif"))
    return paths


def draw_figure5(evaluations, path):
    """Figure 5: next-step BCE against the number of objects, one line per K.

    Args:
        evaluations: dicts with 'k', 'objects' and 'upper_bound_bce' (one per evaluation), and
            optionally 'per_step', the BCE at each step (drawn in a second panel), and 'source',
            where the evaluation came from (named in errors).
        path: output image file.
    Returns:
        The path written.
    Raises:
        ValueError: an evaluation lacks its number of objects, or two evaluations have the same K
            and number of objects (one point of the figure; drawing only one would hide the other).
    """
    results, per_step, sources = {}, {}, {}
    for index, evaluation in enumerate(evaluations):
        source = evaluation.get("source", f"evaluation {index + 1} of {len(evaluations)}")
        if evaluation.get("objects") is None:
            raise ValueError(f"{source} has no number of objects; Figure 5 needs data sets "
                             "generated by neural_em.data (their files record it)")
        k, objects = int(evaluation["k"]), int(evaluation["objects"])
        if (k, objects) in sources:
            raise ValueError(f"{sources[k, objects]} and {source} are both K = {k} on {objects} objects; "
                             "Figure 5 has one point per K and number of objects, so pass one of them "
                             "(draw the other in a second figure)")
        sources[k, objects] = source
        results.setdefault(k, {})[objects] = evaluation["upper_bound_bce"]
        if evaluation.get("per_step") is not None:
            per_step[f"K = {k}, {objects} objects"] = evaluation["per_step"]
    return plots.next_step_bce(results, path, per_step=per_step)


def _figure5_entry(evaluation):
    summary = evaluation["summary"]
    return {"k": evaluation["k"], "objects": evaluation["objects"],
            "upper_bound_bce": summary["upper_bound_bce"]["mean"],
            "per_step": summary["per_step"]["upper_bound_bce"]}


def saved_evaluation(path):
    """The Figure 5 entry ('k', 'objects', 'upper_bound_bce', 'per_step') of an evaluation's summary.json file."""
    path = Path(path)
    try:
        saved = json.loads(path.read_text())
        return _figure5_entry(saved)
    except FileNotFoundError:
        raise FileNotFoundError(f"Evaluation summary {path} does not exist.") from None
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not an evaluation's summary.json (the file `evaluate` writes beside its "
                         f"scores, with 'k', 'objects' and summary.upper_bound_bce): {error!r}") from None


def recorded_evaluation(db, run_id):
    """The Figure 5 entry ('k', 'objects', 'upper_bound_bce', 'per_step') of an evaluation run in the database."""
    run = observers.get_run(db, run_id)
    recorded = (run["info"] or {}).get("evaluation")
    if run["experiment"] != ex.path or recorded is None:
        raise ValueError(f"Run {run_id} in {observers.describe_db_url(db)} is not a finished evaluation run "
                         f"({ex.path!r} with recorded scores); it is a {run['experiment']!r} run "
                         f"with status {run['status']}.")
    return _figure5_entry(recorded)


# ----------------------------------------------------------------------------- Sacred entry points


def _output_folder(config, run, steps):
    if config["output_dir"]:
        return Path(config["output_dir"])
    prefix = f"{run._id}" if run._id is not None else time.strftime("%Y%m%d-%H%M%S")
    return Path("runs/evaluations") / f"{prefix}_{config['dataset']['name']}_k{config['k']}_s{steps}_{config['split']}"


def _describe_source(source):
    if source.training_run is not None:
        return f"training run {source.training_run['id']}"
    return f"weights {source.weights}"


def _log_per_step(run, summary):
    for name, values in summary["per_step"].items():
        for step, value in enumerate(values, 1):
            run.log_scalar(name, value, step)


@ex.main
def evaluate(_config, _run):
    """Scores a trained model on a split; the result is the mean weighted AMI."""
    with tempfile.TemporaryDirectory() as scratch:
        source = resolve_model(_config, _run, EVALUATION_KEYS, scratch)
        config = source.config
        experiment.check_config(config)
        path = experiment.dataset_path(config["dataset"])
        info = dataset_info(path, config["split"])
        model = load_model(config, info, source.weights)
    _, noise_type = experiment.resolved_settings(config, info)
    evaluation = evaluate_model(
        model, path, config["split"], batch_size=config["batch_size"], max_sequences=config["max_sequences"],
        noise_type=noise_type, noise_prob=config["noise"]["prob"], seed=config["seed"],
        average_method=config["scoring"]["average_method"], progress=config["progress"])
    summary = summarize(evaluation.scores)
    title = (f"{_describe_source(source)} on {path} ({config['split']}, {summary['num_sequences']} sequences), "
             f"K={config['k']}, {summary['steps']} steps, AMI average_method={config['scoring']['average_method']}")
    print(format_report(summary, title))

    _log_per_step(_run, summary)
    trained = trained_steps(source.training_run["config"]) if source.training_run else None
    _run.info["evaluation"] = {
        "training_run": source.training_run["id"] if source.training_run else None,
        "weights": None if source.training_run else str(source.weights),
        "dataset": str(path), "objects": generator_option(path, "objects"), "k": config["k"], "trained_steps": trained,
        "summary": summary, "config": config,
    }
    folder = _output_folder(config, _run, summary["steps"])
    folder.mkdir(parents=True, exist_ok=True)
    written = [save_scores(evaluation.scores, folder)]
    if config["plots"]:
        written += draw_pictures(evaluation, folder, trained)
    (folder / "summary.json").write_text(json.dumps(_run.info["evaluation"], indent=1, default=str))
    for file in written + [folder / "summary.json"]:
        _run.add_artifact(str(file), file.name)
    print(f"Scores and pictures: {folder}")
    return experiment.finite_or_none(summary["ami"]["mean"])


@ex.command
def figure5(_config, _run):
    """Figure 5: next-step BCE against objects, one line per K.

    The evaluations are database runs (``figure5_runs``) and/or their ``summary.json`` files
    (``figure5_files``), so that evaluations made on other machines can be drawn together.
    """
    if not _config["figure5_runs"] and not _config["figure5_files"]:
        raise experiment.ConfigError("figure5 needs figure5_runs, a list of evaluation run ids, e.g. "
                                     "figure5_runs=[7,8,9], or figure5_files, a list of their summary.json files.")
    files = _config["figure5_files"] or []
    if isinstance(files, str):
        raise experiment.ConfigError(f"figure5_files must be a list of summary.json files, got the string {files!r}; "
                                     """quote each file: 'figure5_files=["a/summary.json","b/summary.json"]'.""")
    evaluations = [{**saved_evaluation(path), "source": str(path)} for path in files]
    if _config["figure5_runs"]:
        db = run_database(_config, _run)
        evaluations += [{**recorded_evaluation(db, run_id), "source": f"evaluation run {run_id}"}
                        for run_id in _config["figure5_runs"]]
    folder = Path(_config["output_dir"] or "runs/evaluations")
    path = draw_figure5(evaluations, folder / "figure5.png")
    _run.add_artifact(str(path), path.name)
    print(f"Figure 5: {path}")
    return str(path)


def main(argv=None):
    observers.run_commandline(ex, argv)


if __name__ == "__main__":
    main()
