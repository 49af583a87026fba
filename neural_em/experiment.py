"""Sacred configuration: ingredients, named configs, and config -> objects.

Every experiment is one command line, in the published code's style::

    python -m neural_em.train with k=3
    python -m neural_em.train with dataset.flying_shapes network.flying_shapes sequential noise.prob=0.2
    python -m neural_em.train with sacred_configs/flying_shapes_3obj_k3.yaml

``dataset`` and ``network`` are ingredients with named configs; ``sequential``
switches to the sequence settings (loss at every step, no γ gradient).
"""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
from sacred import Experiment, Ingredient

from neural_em.data import registry
from neural_em.data.pipeline import NOISE_TYPES, dataset_info
from neural_em.model.losses import loss_step_weights
from neural_em.model.nem import NeuralEM, build  # noqa: F401  (build: re-exported for entry points)
from neural_em.model.networks import PRESETS, network_config
from neural_em.observers import db_option
from neural_em.training import MONITORS

dataset_ingredient = Ingredient("dataset")
network_ingredient = Ingredient("network")


@dataset_ingredient.config
def dataset_config():
    name = "shapes"  # a data set of `python -m neural_em.data list`
    path = None  # the HDF5 file; None: data/<name>.h5, generated if missing
    generate_if_missing = True  # with the paper's split sizes and seed 0
    mnist_dir = None  # MNIST IDX folder for generating MNIST sets; None: tensorflow-datasets


DATASET_NAMED_CONFIGS = {
    "shapes": "shapes", "shapes_20x20": "shapes_20x20",
    "flying_shapes": "flying_shapes_3", "flying_shapes_3": "flying_shapes_3",
    "flying_shapes_4": "flying_shapes_4", "flying_shapes_5": "flying_shapes_5",
    "flying_mnist": "flying_mnist_all", "flying_mnist_20": "flying_mnist_20",
    "flying_mnist_500": "flying_mnist_500", "flying_mnist_all": "flying_mnist_all",
    "flying_mnist_3digits": "flying_mnist_all_3digits", "flying_mnist_51": "flying_mnist_all_51",
    "static_mnist": "static_mnist_2",
}
for _named, _dataset in DATASET_NAMED_CONFIGS.items():
    dataset_ingredient.add_named_config(_named, {"name": _dataset})


@network_ingredient.config
def network_config_defaults():
    name = "shapes"  # a preset of neural_em.model.networks.PRESETS
    layers = None  # None: the preset's layer lists; else {'input': [...], 'recurrent': [...], 'output': [...]}
    step_size = None  # N-EM only, η's start: None (the preset's 1.0), a number, or 'uniform' (published: U(±√3))


for _preset in PRESETS:
    network_ingredient.add_named_config(_preset, {"name": _preset})


def shared_config():
    """The top-level configuration (Sacred reads the local variables)."""
    k = 3  # number of components K
    nr_steps = 15  # EM steps for static images; sequences use one step per frame
    seed = 0  # seeds the initial γ, the shuffling and the noise
    noise = {
        "type": None,  # 'bitflip', 'masked_uniform' or 'none'; None: bitflip for binary data, else masked_uniform
        "prob": 0.1,
    }
    em = {
        "distribution": None,  # 'bernoulli' or 'gaussian'; None: from the data (binary -> bernoulli)
        "e_sigma": 0.25,  # σ of the Gaussian E-step
        "pred_init": 0.0,
        "gradient_gamma": True,  # False stops gradients through γ
        "inter_weight": 1.0,  # weight of the inter-cluster loss
        "loss_step_weights": "last",  # 'last', 'all' or a list with one weight per step
    }
    training = {
        "batch_size": 64,
        "learning_rate": 0.001,
        "max_epochs": 500,
        "patience": 10,  # epochs without a better monitored value before stopping
        "monitor": "val_loss",  # picks best.weights.h5 and stops early: 'val_loss' (lowest) or 'val_ami' (highest)
        "train_sequences": None,  # None: the whole training split
        "valid_sequences": None,  # None: the whole validation split
        "jit_compile": "auto",
        "unroll": False,  # unroll the EM loop instead of a symbolic loop
        "verbose": 1,
        "time_limit_minutes": None,  # pause after the last epoch that ends in time; the same command resumes
        "keep_epoch_weights": False,  # also keep every epoch's weights in <checkpoint_dir>/epochs/ (for averaging)
    }
    scoring = {
        "valid_sequences": 1000,  # validation subset scored (AMI, ARI) every epoch; 0: none
        "average_method": "max",  # AMI normaliser; 'max' is comparable with the paper
    }
    init_weights = None  # stage-wise training: *.weights.h5 (weights, fresh Adam) or *.keras (weights and Adam's state)
    checkpoint_dir = None  # None: runs/checkpoints/<data set>_<network>_k<k>_<config hash>
    resume = True  # go on from the checkpoint folder's last epoch


SEQUENTIAL = {"em": {"gradient_gamma": False, "loss_step_weights": "all"}}


def make_experiment(name):
    """A Sacred experiment with the shared ingredients, configuration and named configs."""
    ex = Experiment(name, ingredients=[dataset_ingredient, network_ingredient],
                    additional_cli_options=[db_option], save_git_info=False)
    ex.config(shared_config)
    ex.add_named_config("sequential", SEQUENTIAL)
    return ex


class ConfigError(ValueError):
    """Invalid configuration, found before any training starts."""


def check_config(config):
    """Checks the values that would otherwise fail late; raises ConfigError naming the key."""
    def fail(key, value, expected):
        raise ConfigError(f"Invalid configuration {key}={value!r}: expected {expected}.")

    if not isinstance(config["k"], int) or config["k"] < 1:
        fail("k", config["k"], "an integer >= 1")
    if not isinstance(config["nr_steps"], int) or config["nr_steps"] < 1:
        fail("nr_steps", config["nr_steps"], "an integer >= 1")
    if config["dataset"]["name"] not in registry.DATASETS and config["dataset"]["path"] is None:
        fail("dataset.name", config["dataset"]["name"], f"one of {sorted(registry.DATASETS)} or a dataset.path")
    if config["network"]["layers"] is None and config["network"]["name"] not in PRESETS:
        fail("network.name", config["network"]["name"], f"one of {sorted(PRESETS)} or network.layers")
    prob = config["noise"]["prob"]
    if not isinstance(prob, (int, float)) or not 0 <= prob <= 1:
        fail("noise.prob", prob, "a probability in [0, 1]")
    if config["noise"]["type"] not in (None,) + tuple(NOISE_TYPES):
        fail("noise.type", config["noise"]["type"], f"None or one of {list(NOISE_TYPES)}")
    if config["em"]["distribution"] not in (None, "bernoulli", "gaussian"):
        fail("em.distribution", config["em"]["distribution"], "None, 'bernoulli' or 'gaussian'")
    for key in ("batch_size", "max_epochs", "patience"):
        value = config["training"][key]
        if not isinstance(value, int) or value < 1:
            fail(f"training.{key}", value, "an integer >= 1")
    limit = config["training"].get("time_limit_minutes")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0):
        fail("training.time_limit_minutes", limit, "None or a positive number of minutes")
    keep = config["training"].get("keep_epoch_weights", False)
    if not isinstance(keep, bool):
        fail("training.keep_epoch_weights", keep, "True or False")
    monitor = config["training"]["monitor"]
    if monitor not in MONITORS:
        fail("training.monitor", monitor, " or ".join(map(repr, MONITORS)))
    if monitor == "val_ami" and not config["scoring"]["valid_sequences"]:
        fail("training.monitor", monitor, "'val_loss' when scoring.valid_sequences=0 (no validation AMI is scored)")
    if not config["training"]["learning_rate"] > 0:
        fail("training.learning_rate", config["training"]["learning_rate"], "a positive number")
    if config["scoring"]["average_method"] not in ("max", "arithmetic", "min", "geometric"):
        fail("scoring.average_method", config["scoring"]["average_method"], "'max', 'arithmetic', 'min' or 'geometric'")
    weights = config["em"]["loss_step_weights"]
    if isinstance(weights, str) and weights not in ("last", "all"):
        fail("em.loss_step_weights", weights, "'last', 'all' or a list of numbers")
    if config.get("init_weights") is not None and not Path(config["init_weights"]).is_file():
        fail("init_weights", config["init_weights"], "an existing weights file (*.weights.h5 or a *.keras model)")
    network_spec(config)


def network_spec(config):
    """The inner network of a config: a preset name, or a layer-list dict where a key overrides the preset.

    ``network.step_size`` sets N-EM's initial η. 'uniform' draws it from U(−√3, √3) with
    the run's seed: the published code left η, a (1, 1) variable, to TF1's default
    initialiser, so every run started from another η.
    """
    network = config["network"]
    step_size = network.get("step_size")
    if step_size is None:
        return network["layers"] or network["name"]
    spec = network_config(network["layers"] or network["name"])
    if not spec["use_NEM_formulation"]:
        raise ConfigError(f"Invalid configuration network.step_size={step_size!r}: it applies to N-EM networks "
                          f"only (network.name='NEM' or layers with use_NEM_formulation), not "
                          f"{'the given network.layers' if network['layers'] else repr(network['name'])}.")
    if step_size == "uniform":
        step_size = float(np.random.default_rng(config["seed"]).uniform(-math.sqrt(3), math.sqrt(3)))
    elif isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not math.isfinite(step_size):
        raise ConfigError(f"Invalid configuration network.step_size={step_size!r}: expected None, a finite number "
                          "or 'uniform'.")
    spec["step_size"] = float(step_size)
    return spec


def dataset_path(dataset_cfg, *, progress=True):
    """The data set file of the config, generated first if missing and allowed."""
    name = dataset_cfg["name"]
    path = Path(dataset_cfg["path"]) if dataset_cfg["path"] else registry.default_path(name)
    if not path.exists():
        if not dataset_cfg["generate_if_missing"] or name not in registry.DATASETS:
            raise FileNotFoundError(
                f"Data set file {path} does not exist; generate it with "
                f"`python -m neural_em.data generate {name} --out {path}` or set dataset.path.")
        print(f"Data set {path} is missing: generating {name!r} (once).")
        registry.generate(name, out=path, mnist_dir=dataset_cfg["mnist_dir"], progress=progress)
    return path


def resolved_settings(config, info):
    """Fills the data-dependent defaults: pixel distribution and noise type."""
    distribution = config["em"]["distribution"] or ("bernoulli" if info.binary else "gaussian")
    noise_type = config["noise"]["type"] or ("bitflip" if info.binary else "masked_uniform")
    return distribution, noise_type


def make_model(config, info, **overrides):
    """The NeuralEM model a config describes, for a data set with ``info`` (see dataset_info)."""
    distribution, _ = resolved_settings(config, info)
    em = config["em"]
    steps = config["nr_steps"] if info.frames == 1 else info.frames - 1
    loss_step_weights(em["loss_step_weights"], steps)  # fails early on a wrong-length list
    settings = dict(
        network=network_spec(config), image_shape=info.image_shape,
        k=config["k"], nr_steps=config["nr_steps"], distribution=distribution, pred_init=em["pred_init"],
        e_sigma=em["e_sigma"], gradient_gamma=em["gradient_gamma"], inter_weight=em["inter_weight"],
        loss_step_weights=em["loss_step_weights"], unroll=config["training"]["unroll"], seed=config["seed"],
    )
    settings.update(overrides)
    return NeuralEM(**settings)


IGNORED_FOR_CHECKPOINT = ("checkpoint_dir", "resume", "training.verbose", "training.max_epochs", "training.patience",
                          "training.time_limit_minutes", "training.keep_epoch_weights")


def checkpoint_dir(config, root="runs/checkpoints"):
    """The checkpoint folder of a config: the same config resumes in the same folder."""
    if config["checkpoint_dir"]:
        return Path(config["checkpoint_dir"])
    flat = {key: value for key, value in _flatten(config).items() if key not in IGNORED_FOR_CHECKPOINT}
    # Default values of keys added later are left out: the folders of older runs keep their names.
    if flat.get("network.step_size", 0) is None:
        del flat["network.step_size"]
    if flat.get("training.monitor") == "val_loss":
        del flat["training.monitor"]
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:10]
    name = f"{config['dataset']['name']}_{config['network']['name']}_k{config['k']}_{digest}"
    return Path(root) / name


def _flatten(config, prefix=""):
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "layers":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def finite_or_none(value):
    """JSON-safe float for Sacred results."""
    return None if value is None or not math.isfinite(value) else float(value)
