"""neural_em.averaging and training.keep_epoch_weights: averaging the weights of a run's epochs."""

import h5py
import numpy as np
import pytest

from neural_em import averaging, training
from neural_em.model.nem import NeuralEM, build


def _model(seed):
    return build(NeuralEM("shapes", (6, 6, 1), k=2, nr_steps=2, seed=seed))


def _saved(model, path):
    training.save_model_weights(model, path)
    return path


def _batch():
    features = (np.random.default_rng(0).random((4, 1, 6, 6, 1)) > 0.5).astype("float32")
    return {"features": features, "noisy": features}


def test_average_of_weight_files_is_the_mean_of_each_weight_and_reloads(tmp_path):
    models = [_model(seed) for seed in (0, 1, 2)]  # three initialisations: every weight differs
    sources = [_saved(model, tmp_path / f"m{i}.weights.h5") for i, model in enumerate(models)]
    out = tmp_path / "mean.weights.h5"

    count = averaging.average_weights(sources, out)

    restored = _model(seed=3)
    restored.load_weights(out)
    assert count == len(restored.get_weights())
    for loaded, *originals in zip(restored.get_weights(), *(m.get_weights() for m in models), strict=True):
        np.testing.assert_allclose(loaded, np.mean(originals, axis=0), rtol=1e-6, atol=1e-7)
    assert not list(tmp_path.glob("tmp*"))  # no scratch file left behind
    assert out.stat().st_mode & 0o777 == sources[0].stat().st_mode & 0o777  # as readable as the weights it came from


def test_keras_checkpoints_average_like_their_weights_and_drop_adams_state(tmp_path):
    folders = [tmp_path / "a", tmp_path / "b"]
    models = [training.train(NeuralEM("shapes", (6, 6, 1), k=2, nr_steps=2, seed=seed), folder, _batch(), None,
                             max_epochs=1, patience=3, verbose=0)[0] for seed, folder in zip((0, 1), folders)]
    out = tmp_path / "mean.weights.h5"

    averaging.average_weights([folder / training.LAST_MODEL for folder in folders], out)

    with h5py.File(out) as saved:
        assert averaging.OPTIMIZER_GROUP not in saved
    restored = _model(seed=3)
    restored.load_weights(out)
    for loaded, first, second in zip(restored.get_weights(), models[0].get_weights(), models[1].get_weights(),
                                     strict=True):
        np.testing.assert_allclose(loaded, (first + second) / 2, rtol=1e-6, atol=1e-7)


def test_training_keeps_every_epochs_weights_and_the_last_equals_the_checkpoint(tmp_path):
    training.train(NeuralEM("shapes", (6, 6, 1), k=2, nr_steps=2, seed=0), tmp_path, _batch(), None,
                   max_epochs=3, patience=5, verbose=0, keep_epoch_weights=True)

    kept = sorted(path.name for path in (tmp_path / "epochs").iterdir())
    assert kept == ["epoch001.weights.h5", "epoch002.weights.h5", "epoch003.weights.h5"]
    epoch_1, epoch_3 = _model(seed=5), _model(seed=5)
    epoch_1.load_weights(tmp_path / training.EPOCH_WEIGHTS.format(epoch=1))
    epoch_3.load_weights(tmp_path / training.EPOCH_WEIGHTS.format(epoch=3))
    last = _model(seed=5)
    training.load_model_weights(last, tmp_path / training.LAST_MODEL)
    for at_3, at_last in zip(epoch_3.get_weights(), last.get_weights(), strict=True):
        np.testing.assert_array_equal(at_3, at_last)
    assert any(not np.array_equal(a, b) for a, b in zip(epoch_1.get_weights(), epoch_3.get_weights()))


def test_training_keeps_no_epoch_weights_by_default(tmp_path):
    training.train(NeuralEM("shapes", (6, 6, 1), k=2, nr_steps=2, seed=0), tmp_path, _batch(), None,
                   max_epochs=1, patience=5, verbose=0)
    assert not (tmp_path / "epochs").exists()


def test_weights_of_another_model_are_refused_by_file_and_key(tmp_path):
    first = _saved(_model(0), tmp_path / "small.weights.h5")
    other = _saved(build(NeuralEM("shapes", (8, 8, 1), k=2, nr_steps=2, seed=0)), tmp_path / "large.weights.h5")
    with pytest.raises(ValueError, match=r"large\.weights\.h5: weight \S+ has shape"):
        averaging.average_weights([first, other], tmp_path / "mean.weights.h5")
    assert not (tmp_path / "mean.weights.h5").exists()


@pytest.mark.parametrize("case, message", [
    ("one source", "at least two"),
    ("out is not .weights.h5", "ending in .weights.h5"),
    ("out is a source", "is one of the files to average"),
    ("missing source", "No weights file"),
    ("not a checkpoint", "expected a \\*.weights.h5 file or a \\*.keras checkpoint"),
])
def test_bad_arguments_get_a_clear_error_and_leave_the_sources_alone(tmp_path, case, message):
    a = _saved(_model(0), tmp_path / "a.weights.h5")
    b = _saved(_model(1), tmp_path / "b.weights.h5")
    before = a.read_bytes()
    sources, out = [a, b], tmp_path / "mean.weights.h5"
    if case == "one source":
        sources = [a]
    elif case == "out is not .weights.h5":
        out = tmp_path / "mean.h5"
    elif case == "out is a source":
        out = a
    elif case == "missing source":
        sources = [a, tmp_path / "nowhere.weights.h5"]
    elif case == "not a checkpoint":
        sources = [a, tmp_path / "notes.txt"]
        sources[1].write_text("not weights")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        averaging.average_weights(sources, out)
    assert a.read_bytes() == before


def test_command_line_writes_the_average_and_reports_errors(tmp_path, capsys):
    a = _saved(_model(0), tmp_path / "a.weights.h5")
    b = _saved(_model(1), tmp_path / "b.weights.h5")
    averaging.main([str(a), str(b), "--out", str(tmp_path / "mean.weights.h5")])
    assert "Averaged" in capsys.readouterr().out and (tmp_path / "mean.weights.h5").is_file()
    with pytest.raises(SystemExit) as exit_info:
        averaging.main([str(a), "--out", str(tmp_path / "again.weights.h5")])
    assert exit_info.value.code == 2 and "at least two" in capsys.readouterr().err
