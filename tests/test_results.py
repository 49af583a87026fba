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
STATIC_SHAPES_NEM = RESULTS / "static_shapes_nem_k4_seed0"
STATIC_SHAPES_NEM_SEED1 = RESULTS / "static_shapes_nem_k4_seed1"
STATIC_SHAPES_NEM_SEED3 = RESULTS / "static_shapes_nem_k4_seed3"
STATIC_SHAPES_NEM_SEED4 = RESULTS / "static_shapes_nem_k4_seed4"


@pytest.mark.parametrize("folder, network, k", [(STATIC_SHAPES, "shapes", 3), (STATIC_SHAPES_NEM, "NEM", 4),
                                                (STATIC_SHAPES_NEM_SEED1, "NEM", 4),
                                                (STATIC_SHAPES_NEM_SEED3, "NEM", 4),
                                                (STATIC_SHAPES_NEM_SEED4, "NEM", 4)],
                         ids=["rnn_em", "nem", "nem_seed1", "nem_seed3", "nem_seed4"])
def test_static_shapes_checkpoint_groups_fresh_images(tmp_path, folder, network, k):
    if not folder.is_dir():
        pytest.skip(f"no committed checkpoint {folder.name}")
    state = json.loads((folder / training.STATE).read_text())
    assert state["best_epoch"] <= state["epoch"]
    summary = json.loads((folder / f"test_k{k}_summary.json").read_text())["summary"]

    model = build(NeuralEM(network, (28, 28, 1), k=k, nr_steps=15, seed=0))
    model.load_weights(folder / training.BEST_WEIGHTS)
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
