"""Evaluation: recorded runs, AMI against scikit-learn, generalisation settings, pictures, bad input."""

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import adjusted_mutual_info_score

from neural_em import evaluate, experiment, observers, training
from neural_em.data import registry
from neural_em.data.pipeline import dataset_info
from neural_em.data.store import open_dataset
from neural_em.model.losses import upper_bound_loss
from neural_em.model.nem import NeuralEM, build

QUIET = {"progress": False, "batch_size": 16}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch training run (K = 2, 2 steps) on tiny static shapes, recorded in a tmp database."""
    from neural_em.train import ex as train_ex

    folder = tmp_path_factory.mktemp("evaluate")
    data = registry.generate("shapes", out=folder / "shapes.h5", train=64, valid=32, test=32, progress=False)
    db = f"sqlite:///{folder / 'runs.db'}"
    updates = {"dataset.path": str(data), "k": 2, "nr_steps": 2, "checkpoint_dir": str(folder / "checkpoints"),
               "training": {"max_epochs": 1, "batch_size": 16, "verbose": 0}, "scoring.valid_sequences": 16}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        run = train_ex.run(config_updates=updates, options={"--db": db})
    return SimpleNamespace(folder=folder, data=data, db=db, run_id=run._id)


def _evaluate(db, named_configs=(), command=None, **updates):
    return evaluate.ex.run(command, config_updates={**QUIET, **updates}, named_configs=named_configs,
                           options={"--db": db})


def _load_scores(folder):
    with np.load(folder / "scores.npz") as scores:
        return dict(scores)


def _assert_picture_shows_something(path):
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels.std() > 10  # not a blank canvas


def test_evaluation_of_a_training_run_is_recorded_with_scores_and_pictures(trained, tmp_path):
    run = _evaluate(trained.db, run_id=trained.run_id, output_dir=str(tmp_path / "eval"))

    recorded = observers.get_run(trained.db, run._id)
    assert recorded["experiment"] == "neural_em_evaluate" and recorded["status"] == "COMPLETED"
    info = recorded["info"]["evaluation"]
    # Settings not given on the command line come from the training run, not the defaults (k=3, 15 steps).
    assert info["k"] == 2 and info["config"]["nr_steps"] == 2 and info["training_run"] == trained.run_id
    assert info["objects"] == 3 and info["trained_steps"] == 2

    scores = _load_scores(tmp_path / "eval")
    assert scores["ami"].shape == scores["ari"].shape == scores["upper_bound_bce"].shape == (32, 2)
    assert np.all((-1 <= scores["ami"]) & (scores["ami"] <= 1))
    assert np.all((0.5 <= scores["confidence"]) & (scores["confidence"] <= 1))  # max of 2 γ's summing to 1
    np.testing.assert_array_equal(scores["ami_weighted"], scores["ami"][:, -1])  # static images: loss on 'last'
    assert recorded["result"] == pytest.approx(scores["ami_weighted"].mean())
    # Three shapes on 28x28 overlap in most images but not all: both parts of the split are filled.
    occluded = scores["occluded_pixels"][:, -1] > 0  # (32,)
    by_occlusion = info["summary"]["by_occlusion"]
    assert by_occlusion["occluded"]["count"] == occluded.sum() > 0
    assert by_occlusion["unoccluded"]["count"] == (~occluded).sum() > 0
    assert by_occlusion["occluded"]["ami_last_mean"] == pytest.approx(scores["ami_last"][occluded].mean())
    assert by_occlusion["unoccluded"]["ami_last_mean"] == pytest.approx(scores["ami_last"][~occluded].mean())
    # Every image shows 1-3 of its 3 objects (overlap can hide one); merging takes two of them.
    assert np.all((1 <= scores["objects"]) & (scores["objects"] <= 3))
    assert np.all((0 <= scores["objects_split"]) & (scores["objects_split"] <= scores["objects"]))
    assert np.all((scores["objects_merged"] != 1) & (scores["objects_merged"] <= scores["objects"]))
    errors = info["summary"]["objects_last_step"]
    assert errors["objects"] == scores["objects"][:, -1].sum()
    assert errors["merged"] == pytest.approx(scores["objects_merged"][:, -1].sum() / errors["objects"])

    assert {"scores.npz", "ami_per_step.png", "overview.png", "summary.json"} <= set(
        observers.run_artifacts(trained.db, run._id))
    assert not (tmp_path / "eval" / "overview.gif").exists()  # static images: no animation
    for picture in ("ami_per_step.png", "overview.png"):
        _assert_picture_shows_something(tmp_path / "eval" / picture)
    logged = observers.run_metrics(trained.db, run._id)
    assert [step for step, _ in logged["ami_median"]] == [1, 2]
    assert [value for _, value in logged["upper_bound_bce"]] == pytest.approx(scores["upper_bound_bce"].mean(0))


def test_generalisation_to_another_k_and_more_steps(trained, tmp_path):
    # k=3 is also the default value: it must still replace the trained K = 2.
    run = _evaluate(trained.db, run_id=trained.run_id, k=3, nr_steps=5, output_dir=str(tmp_path), plots=False)

    info = observers.get_run(trained.db, run._id)["info"]["evaluation"]
    assert info["k"] == 3 and info["summary"]["steps"] == 5 and info["trained_steps"] == 2
    scores = _load_scores(tmp_path)
    assert scores["ami"].shape == (32, 5)
    assert np.all(scores["confidence"] <= 1) and np.all(scores["confidence"] >= 1 / 3)


def test_named_configs_and_config_files_replace_the_training_config(trained, tmp_path):
    config_file = tmp_path / "no_noise.yaml"
    config_file.write_text("noise: {prob: 0.0}\n")
    run = _evaluate(trained.db, named_configs=["sequential", str(config_file)], run_id=trained.run_id,
                    max_sequences=16, plots=False, output_dir=str(tmp_path))

    config = observers.get_run(trained.db, run._id)["info"]["evaluation"]["config"]
    assert config["em"]["loss_step_weights"] == "all" and config["em"]["gradient_gamma"] is False
    assert config["noise"]["prob"] == 0.0 and config["k"] == 2
    scores = _load_scores(tmp_path)
    np.testing.assert_allclose(scores["ami_weighted"], scores["ami"].mean(axis=1))


def _trained_model(trained, tmp_path, **overrides):
    weights = observers.load_artifact(trained.db, trained.run_id, "best.weights.h5", tmp_path)
    model = build(NeuralEM("shapes", dataset_info(trained.data).image_shape, **{"k": 2, "nr_steps": 2, **overrides}))
    model.load_weights(weights)
    return model


@pytest.mark.parametrize("average_method", ["max", "arithmetic"])
def test_static_ami_equals_scikit_learn_on_argmax_gamma(trained, tmp_path, average_method):
    model = _trained_model(trained, tmp_path, k=3, nr_steps=3)
    evaluation = evaluate.evaluate_model(model, trained.data, batch_size=8, max_sequences=8, noise_prob=0.1,
                                         average_method=average_method, progress=False)
    with open_dataset(trained.data) as dataset:
        groups = dataset.split("test").groups(np.arange(8))[:, 0, ..., 0]  # (8, H, W): the one frame
    gamma = evaluation.example["gamma"][..., 0]  # (8, S, K, H, W)
    for image in (0, 5):
        for step in range(3):
            scored = groups[image] != 0
            predicted = gamma[image, step].argmax(axis=0)  # (H, W)
            expected = adjusted_mutual_info_score(groups[image][scored], predicted[scored],
                                                  average_method=average_method)
            assert evaluation.scores["ami"][image, step] == pytest.approx(expected, abs=1e-9)
            confidence = gamma[image, step].max(axis=0)[scored].mean()
            assert evaluation.scores["confidence"][image, step] == pytest.approx(confidence, rel=1e-6)


def test_sequences_are_scored_against_the_frame_each_step_predicts(flying):
    image_shape = dataset_info(flying.data).image_shape
    model = build(NeuralEM("flying_shapes", image_shape, k=3, loss_step_weights="all", seed=0), frames=4)
    model.load_weights(flying.weights)
    evaluation = evaluate.evaluate_model(model, flying.data, batch_size=4, noise_prob=0.2, progress=False)
    with open_dataset(flying.data) as dataset:
        split = dataset.split("test")
        groups = split.groups(np.arange(8))[..., 0]  # (8, T, H, W)
        frames = split.features(np.arange(8))  # (8, T, H, W, 1)
    gamma = evaluation.example["gamma"][..., 0]  # (4, S, K, H, W), the first batch
    assert evaluation.scores["ami"].shape == (8, 3)
    for step in range(3):
        target_groups = groups[1, step + 1]  # step t predicts frame t + 1
        scored = target_groups != 0
        expected = adjusted_mutual_info_score(target_groups[scored], gamma[1, step].argmax(axis=0)[scored],
                                              average_method="max")
        assert evaluation.scores["ami"][1, step] == pytest.approx(expected, abs=1e-9)
        # The reported next-step BCE is the upper-bound loss of that step.
        bound = upper_bound_loss(evaluation.example["psi"][:, step], frames[:4, step + 1][:, None])
        assert evaluation.scores["upper_bound_bce"][:4, step].mean() == pytest.approx(float(bound), rel=1e-5)
    np.testing.assert_allclose(evaluation.scores["ami_weighted"], evaluation.scores["ami"].mean(axis=1))


def test_weights_file_evaluation_of_sequences_draws_an_animation(flying, tmp_path):
    run = evaluate.ex.run(
        config_updates={**QUIET, "weights": str(flying.weights), "dataset.path": str(flying.data),
                        "output_dir": str(tmp_path), "batch_size": 4},
        named_configs=["network.flying_shapes", "sequential"], options={"--unobserved": True})
    assert -1 <= run.result <= 1
    assert _load_scores(tmp_path)["ami"].shape == (8, 3)
    with Image.open(tmp_path / "overview.gif") as animation:
        assert animation.n_frames == 3
    _assert_picture_shows_something(tmp_path / "overview.png")


def test_a_last_keras_checkpoint_scores_as_the_weights_it_holds(trained, tmp_path):
    # After one epoch the last checkpoint and the best weights hold the same model; a checkpoint whose
    # weights were not read would score as the untrained initialisation instead.
    folder = trained.folder / "checkpoints"
    settings = {"dataset.path": str(trained.data), "k": 2, "nr_steps": 2, "plots": False}
    untrained = build(NeuralEM("shapes", dataset_info(trained.data).image_shape, k=2, seed=0), frames=1)
    untrained.save_weights(tmp_path / "untrained.weights.h5")
    weights = {"last.keras": folder / "last.keras", "best.weights.h5": folder / "best.weights.h5",
               "untrained": tmp_path / "untrained.weights.h5"}
    scores = {}
    for name, path in weights.items():
        evaluate.ex.run(config_updates={**QUIET, **settings, "weights": str(path),
                                        "output_dir": str(tmp_path / name)}, options={"--unobserved": True})
        scores[name] = _load_scores(tmp_path / name)["ami"]
    np.testing.assert_array_equal(scores["last.keras"], scores["best.weights.h5"])
    assert not np.array_equal(scores["last.keras"], scores["untrained"])


def test_figure5_from_recorded_evaluations(trained, tmp_path):
    ids = [_evaluate(trained.db, run_id=trained.run_id, k=k, max_sequences=16, plots=False,
                     output_dir=str(tmp_path / f"k{k}"))._id for k in (1, 4)]
    run = _evaluate(trained.db, command="figure5", figure5_runs=ids, output_dir=str(tmp_path))
    assert run.result == str(tmp_path / "figure5.png")
    _assert_picture_shows_something(tmp_path / "figure5.png")
    assert "figure5.png" in observers.run_artifacts(trained.db, run._id)

    # The same evaluations from their summary.json files, as evaluations from another machine are drawn.
    files = [str(tmp_path / f"k{k}" / "summary.json") for k in (1, 4)]
    assert [evaluate.saved_evaluation(path) for path in files] == [
        evaluate.recorded_evaluation(trained.db, run_id) for run_id in ids]
    _evaluate(trained.db, command="figure5", figure5_files=files, output_dir=str(tmp_path / "files"))
    _assert_picture_shows_something(tmp_path / "files" / "figure5.png")

    # A run and its own file are the same point of the figure: named, not silently one of them.
    with pytest.raises(ValueError, match=rf"k1/summary.json and evaluation run {ids[0]} are both K = 1 on"):
        _evaluate(trained.db, command="figure5", figure5_runs=ids[:1], figure5_files=files[:1],
                  output_dir=str(tmp_path / "twice"))
    assert not (tmp_path / "twice" / "figure5.png").exists()


def test_figure5_names_two_evaluations_of_the_same_k_and_objects(tmp_path):
    epoch5 = {"k": 3, "objects": 3, "upper_bound_bce": 163.7, "source": "k3/epoch5/summary.json"}
    epoch16 = {"k": 3, "objects": 3, "upper_bound_bce": 140.0, "source": "k3/epoch16/summary.json"}
    with pytest.raises(ValueError, match="k3/epoch5/summary.json and k3/epoch16/summary.json are both K = 3 on 3"):
        evaluate.draw_figure5([epoch5, epoch16], tmp_path / "figure5.png")
    unnamed = [{key: value for key, value in entry.items() if key != "source"} for entry in (epoch5, epoch16)]
    with pytest.raises(ValueError, match="evaluation 1 of 2 and evaluation 2 of 2 are both K = 3 on 3 objects"):
        evaluate.draw_figure5(unnamed, tmp_path / "figure5.png")
    assert not (tmp_path / "figure5.png").exists()
    # Other objects or another K are other points.
    path = evaluate.draw_figure5([epoch16, {**epoch5, "objects": 5}, {**epoch5, "k": 1}], tmp_path / "figure5.png")
    _assert_picture_shows_something(path)


def test_figure5_files_that_are_not_evaluation_summaries_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone/summary.json does not exist"):
        evaluate.saved_evaluation(tmp_path / "gone" / "summary.json")
    (tmp_path / "state.json").write_text('{"epoch": 3}')
    with pytest.raises(ValueError, match="state.json is not an evaluation's summary.json"):
        evaluate.saved_evaluation(tmp_path / "state.json")
    with pytest.raises(experiment.ConfigError, match="must be a list of summary.json files"):
        evaluate.ex.run("figure5", config_updates={**QUIET, "figure5_files": "[a/summary.json]"},
                        options={"--unobserved": True})


def test_command_line_values_replace_the_training_config():
    training = {"k": 5, "nr_steps": 20, "seed": 0, "init_weights": "/gone/stage1.weights.h5",
                "em": {"e_sigma": 0.25, "gradient_gamma": False},
                "dataset": {"name": "shapes", "path": "/data/shapes_small.h5"},
                "network": {"name": "shapes", "layers": None}}
    current = {"k": 3, "nr_steps": 15, "seed": 0, "init_weights": None, "run_id": 1, "output_dir": "out",
               "em": {"e_sigma": 0.5, "gradient_gamma": True, "pred_init": 0.0},
               "dataset": {"name": "flying_shapes_5", "path": None},
               "network": {"name": "shapes", "layers": {"input": [], "recurrent": [], "output": []}}}
    merged = evaluate.merged_config(current, training, {"k", "dataset.name", "network.layers.input"},
                                    own_keys=("run_id", "output_dir"))
    assert merged["k"] == 3 and merged["nr_steps"] == 20  # explicit vs not given
    assert merged["em"] == {"e_sigma": 0.25, "gradient_gamma": False, "pred_init": 0.0}  # new keys filled in
    assert merged["dataset"] == {"name": "flying_shapes_5", "path": None}  # the old file is another data set
    assert merged["network"]["layers"] == current["network"]["layers"]
    assert merged["run_id"] == 1 and merged["output_dir"] == "out" and merged["init_weights"] is None
    assert training["k"] == 5  # not modified in place


def test_unknown_run_id_is_a_clear_error(trained):
    with pytest.raises(LookupError, match="no run with id 999"):
        evaluate.ex.run(config_updates={**QUIET, "run_id": 999, "db": trained.db}, options={"--unobserved": True})


def test_a_run_that_is_not_a_training_run_is_refused(trained, tmp_path):
    evaluation = _evaluate(trained.db, run_id=trained.run_id, max_sequences=16, plots=False,
                           output_dir=str(tmp_path))
    with pytest.raises(experiment.ConfigError, match=f"Run {evaluation._id} .* not a training run"):
        evaluate.ex.run(config_updates={**QUIET, "run_id": evaluation._id, "db": trained.db},
                        options={"--unobserved": True})


@pytest.mark.parametrize("updates,message", [
    ({"weights": "/nonexistent/best.weights.h5"}, "weights='/nonexistent/best.weights.h5': no such file"),
    ({"weights": "model.h5"}, "weights='model.h5': expected a file written by training, .*weights.h5.*last.keras"),
    ({}, "exactly one of run_id .* and weights"),
    ({"run_id": 1, "weights": "x.weights.h5"}, "exactly one of run_id .* and weights"),
    ({"run_id": "latest"}, "run_id='latest': expected an integer"),
])
def test_bad_model_source_is_a_clear_error(tmp_path, monkeypatch, updates, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(experiment.ConfigError, match=message):
        evaluate.ex.run(config_updates={**QUIET, **updates}, options={"--unobserved": True})
    assert not (tmp_path / "runs").exists()


def test_occlusion_split_of_a_summary_by_hand():
    ami = np.array([[0.1, 0.2], [0.3, 0.9], [0.0, 0.5]])  # (N=3, S=2)
    scores = {"ami": ami, "ari": ami, "confidence": np.ones_like(ami), "upper_bound_bce": np.ones_like(ami),
              "occluded_pixels": np.array([[0, 4], [3, 0], [0, 0]])}  # only the last step decides
    scores = training.with_sequence_scores(scores, [0.0, 1.0])
    summary = evaluate.summarize(scores)
    assert summary["by_occlusion"] == {"occluded": {"count": 1, "ami_last_mean": pytest.approx(0.2)},
                                       "unoccluded": {"count": 2, "ami_last_mean": pytest.approx(0.7)}}
    assert "AMI (last step), objects overlap" in evaluate.format_report(summary, "title")
    scores["occluded_pixels"] = np.zeros_like(ami, dtype=int)
    assert evaluate.summarize(scores)["by_occlusion"]["occluded"] == {"count": 0, "ami_last_mean": None}
    assert "(0 of 3 sequences)" in evaluate.format_report(evaluate.summarize(scores), "title")


def test_object_errors_of_a_summary_by_hand():
    ami = np.array([[0.1, 0.2], [0.3, 0.9]])  # (N=2, S=2)
    scores = {"ami": ami, "ari": ami, "confidence": np.ones_like(ami), "upper_bound_bce": np.ones_like(ami),
              "occluded_pixels": np.zeros_like(ami, dtype=int)}
    scores = training.with_sequence_scores(scores, [0.0, 1.0])
    # Scores saved before the object counts existed still summarise.
    assert evaluate.summarize(scores)["objects_last_step"] == {"objects": 0, "split": None, "merged": None}
    assert "objects split" not in evaluate.format_report(evaluate.summarize(scores), "title")
    scores.update(objects=np.array([[3, 3], [2, 2]]), objects_split=np.array([[3, 1], [0, 0]]),
                  objects_merged=np.array([[0, 0], [2, 2]]))  # only the last step counts
    summary = evaluate.summarize(scores)
    assert summary["objects_last_step"] == {"objects": 5, "split": pytest.approx(0.2), "merged": pytest.approx(0.4)}
    report = evaluate.format_report(summary, "title")
    assert "objects split (last step)" in report and "(share of 5 objects)" in report


def test_group_threshold_comes_from_the_data_set_file(tmp_path):
    from tests.test_generators import write_idx
    digits = np.random.default_rng(0).integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", digits)
    grey = registry.generate("static_mnist_2", out=tmp_path / "mnist.h5", train=4, valid=4, test=4,
                             mnist_dir=tmp_path, progress=False)
    binary = registry.generate("shapes", out=tmp_path / "shapes.h5", train=4, valid=4, test=4, progress=False)
    assert evaluate.group_threshold(grey) == 0.1
    assert evaluate.group_threshold(binary) == 0.0
