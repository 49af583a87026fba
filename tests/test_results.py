"""The checkpoints committed under results/ still load and still group as RESULTS.md reports."""

import json
from pathlib import Path

import numpy as np
import pytest

from neural_em import training
from neural_em.data import registry
from neural_em.model.nem import NeuralEM, build

RESULTS = Path(__file__).resolve().parents[1] / "results"
STATIC_SHAPES = RESULTS / "static_shapes_rnn_em_k3_seed0"


@pytest.mark.skipif(not STATIC_SHAPES.is_dir(), reason="no committed static shapes checkpoint")
def test_static_shapes_checkpoint_groups_fresh_images(tmp_path):
    state = json.loads((STATIC_SHAPES / training.STATE).read_text())
    assert state["best_epoch"] <= state["epoch"]
    summary = json.loads((STATIC_SHAPES / "test_k3_summary.json").read_text())["summary"]

    model = build(NeuralEM("shapes", (28, 28, 1), k=3, nr_steps=15, seed=0))
    model.load_weights(STATIC_SHAPES / training.BEST_WEIGHTS)
    # Images the model never saw (another seed than the data set's 0), with the training noise.
    path = registry.generate("shapes", out=tmp_path / "shapes.h5", train=1, valid=1, test=64, seed=123,
                             progress=False)
    batches = training.make_batches(path, "test", 64, shuffle=False, with_groups=True, noise_type="bitflip",
                                    noise_prob=0.1, static_steps=15, seed=1)
    scores = training.score_model(model, batches)
    ami = float(np.mean(scores["ami_last"]))
    # Chance is 0; 64 images have a standard error of about 0.2 / 8 around the reported mean.
    assert ami > summary["ami"]["mean"] - 0.1, (ami, summary["ami"]["mean"])
    per_step = np.mean(scores["ami"], axis=0)  # (S,)
    assert per_step[-1] > per_step[0] + 0.2  # the EM iterations do the grouping
