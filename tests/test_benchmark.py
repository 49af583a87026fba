"""The benchmark runs on tiny sizes, and its hand-written reference computes what the model computes.

Nothing here looks at how fast anything is: the figures belong in BENCHMARKS.md.
"""

import argparse
import numpy as np
import pytest
import tensorflow as tf

from neural_em import benchmark

KEPT_SECTION = "## Data generation\n\nA table measured by someone else: 4.5 seconds.\n"


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """A quick run over an existing file that has a section this run does not measure."""
    folder = tmp_path_factory.mktemp("benchmark")
    output = folder / "BENCHMARKS.md"
    output.write_text("# Benchmarks\n\n" + KEPT_SECTION)
    benchmark.main(["--quick", "--output", str(output), "--workdir", str(folder / "work"),
                    "--sections", "training", "memory", "evaluation", "--variants", "default", "unrolled",
                    "--skip", "shapes:unrolled", "flying_shapes:unrolled"])
    return output.read_text()


def _section(text, heading):
    """The body of the ``## heading`` section of a markdown text."""
    sections = text.split("\n## ")
    (body,) = [s.split("\n", 1)[1] for s in sections if s.startswith(heading + "\n")]
    return body


def _table_rows(body):
    """The rows of the first markdown table of a section, as lists of cells (header and rule left out)."""
    lines = [line for line in body.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


@pytest.mark.parametrize("config_name", ["shapes", "flying_shapes"])
def test_reference_loss_equals_the_model_loss_for_the_same_weights(config_name, tmp_path):
    config = benchmark.get_config(config_name, quick=True)
    path = benchmark.make_benchmark_data(config, tmp_path, train_sequences=4)
    model = benchmark.build_model(config, benchmark.VARIANTS["default"], benchmark.IMAGE_SHAPE)
    batch = next(iter(benchmark.training_batches(config, path, batch_size=4, num_batches=1)))
    for unroll in (False, True):
        comparison = benchmark.compare_losses(model, batch, unroll=unroll)
        assert comparison["relative_difference"] < 1e-4
        for name in benchmark.LOSS_NAMES:
            assert comparison["reference"][name] == pytest.approx(comparison["model"][name], rel=1e-4)


@pytest.mark.parametrize("config_name", ["shapes", "flying_shapes"])
def test_reference_gradients_equal_the_model_gradients(config_name, tmp_path):
    # shapes keeps the gradient through γ, flying_shapes stops it: both paths are checked.
    config = benchmark.get_config(config_name, quick=True)
    path = benchmark.make_benchmark_data(config, tmp_path, train_sequences=4)
    model = benchmark.build_model(config, benchmark.VARIANTS["default"], benchmark.IMAGE_SHAPE)
    batch = next(iter(benchmark.training_batches(config, path, batch_size=4, num_batches=1)))
    gamma = benchmark.fixed_initial_gamma(model, batch_size=4)
    inputs = {"features": batch["features"], "noisy": batch["noisy"], "initial_gamma": gamma}

    model_variables = benchmark.model_variables_by_name(model)
    with tf.GradientTape() as tape:
        model_loss = model.loss_terms(inputs, model(inputs, training=True))["loss"]
    model_gradients = dict(zip(model_variables, tape.gradient(model_loss, list(model_variables.values()))))

    settings = benchmark.em_settings(model, config.frames)
    params = benchmark.reference_parameters(model, settings.plan)
    with tf.GradientTape() as tape:
        reference_loss = benchmark.reference_loss_terms(params, settings, batch["features"], batch["noisy"],
                                                        gamma)["loss"]
    reference_gradients = dict(zip(params, tape.gradient(reference_loss, list(params.values()))))

    assert set(reference_gradients) == set(model_gradients)
    for name, gradient in model_gradients.items():
        expected = np.asarray(gradient)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(np.asarray(reference_gradients[name]), expected, rtol=1e-3, atol=1e-4 * scale,
                                   err_msg=name)


def test_quick_run_writes_every_measured_table_with_its_command(quick_report):
    for heading, section in (("Training throughput: TensorFlow on CPU", "training"),
                             ("Peak memory of a training step: TensorFlow on CPU", "memory"),
                             ("Evaluation: AMI against scikit-learn", "evaluation")):
        body = _section(quick_report, heading)
        assert _table_rows(body), heading
        assert f"python -m neural_em.benchmark --sections {section}" in body
        assert "tensorflow" in body and "keras" in body  # the library versions
        assert "--quick" in body


def test_quick_training_table_has_both_configurations_model_and_reference(quick_report):
    rows = _table_rows(_section(quick_report, "Training throughput: TensorFlow on CPU"))
    assert [(row[0], row[1]) for row in rows] == [
        ("`shapes`", "default"), ("`shapes`", "unrolled"), ("`flying_shapes`", "default"),
        ("`flying_shapes`", "unrolled")]
    skipped = [row for row in rows if row[1] == "unrolled"]
    assert all("not run (`--skip`)" in row[-1] and row[5] == "—" for row in skipped), skipped
    assert "--skip shapes:unrolled flying_shapes:unrolled" in quick_report
    for row in rows[::2]:
        model_rate, reference_rate, ratio, loss_difference = row[5], row[6], row[7], row[8]
        assert "—" not in (model_rate, reference_rate, ratio), row
        assert float(loss_difference) < 1e-4, row


def test_quick_memory_table_reports_a_peak_per_configuration(quick_report):
    rows = _table_rows(_section(quick_report, "Peak memory of a training step: TensorFlow on CPU"))
    assert [row[0] for row in rows] == ["`shapes`", "`flying_shapes`"]
    for row in rows:
        before, peak = (float(cell.replace(",", "")) for cell in row[2:4])
        assert 0 < before <= peak


def test_quick_evaluation_agrees_with_scikit_learn(quick_report):
    body = _section(quick_report, "Evaluation: AMI against scikit-learn")
    difference = float(body.split("Largest difference between the two AMIs on those images: ")[1].split(".\n")[0])
    assert difference < 1e-9


def test_sections_not_measured_are_kept_or_stubbed(quick_report):
    assert "\n" + KEPT_SECTION in quick_report
    assert "Not measured yet" in _section(quick_report, "Training throughput: JAX on GPU")
    assert "KERAS_BACKEND=jax" in _section(quick_report, "Training throughput: JAX on GPU")


def test_generation_is_measured_on_request_and_other_sections_are_kept(tmp_path):
    output = tmp_path / "BENCHMARKS.md"
    output.write_text("# Benchmarks\n\n## Evaluation: AMI against scikit-learn\n\nKept as it was.\n")
    benchmark.main(["--quick", "--output", str(output), "--workdir", str(tmp_path / "work"),
                    "--sections", "generation", "--datasets", "shapes", "flying_mnist_20"])
    text = output.read_text()
    assert "Kept as it was." in _section(text, "Evaluation: AMI against scikit-learn")
    shapes_row, mnist_row = _table_rows(_section(text, "Data generation"))
    assert shapes_row[0] == "`shapes`" and float(shapes_row[4]) > 0 and float(shapes_row[6]) > 0
    assert "needs --mnist-dir" in mnist_row[-1]


def test_unknown_configuration_is_named_with_the_known_ones(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--configs", "tiny_shapes", "--output", "unused.md"])
    error = capsys.readouterr().err
    assert "tiny_shapes" in error and "flying_shapes" in error
    with pytest.raises(ValueError, match="'tiny_shapes'.*flying_shapes"):
        benchmark.get_config("tiny_shapes")
    with pytest.raises(ValueError, match="'fp8'.*mixed_precision"):
        benchmark.get_variant("fp8")


def test_quick_run_refuses_to_overwrite_the_real_benchmarks(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--quick"])
    assert "--output" in capsys.readouterr().err


def test_timing_stops_once_the_timed_steps_use_up_max_seconds():
    assert not benchmark.out_of_time([0.0, 1.0, 2.0], warmup=1, max_seconds=3.0)
    assert benchmark.out_of_time([0.0, 1.0, 4.0], warmup=1, max_seconds=3.0)
    assert not benchmark.out_of_time([0.0, 100.0], warmup=2, max_seconds=3.0)  # still warming up
    assert not benchmark.out_of_time([0.0, 1.0, 400.0], warmup=1, max_seconds=None)


def test_skip_names_a_configuration_and_variant():
    assert benchmark.parse_skip("flying_shapes:mixed_precision") == ("flying_shapes", "mixed_precision")
    with pytest.raises(argparse.ArgumentTypeError, match="CONFIG:VARIANT"):
        benchmark.parse_skip("flying_shapes")
    with pytest.raises(argparse.ArgumentTypeError, match="CONFIG:VARIANT"):
        benchmark.parse_skip("shapes:fp8")
