"""Average the weights of several checkpoints of one run into one weights file.

A trained model's test AMI moves from one epoch's weights to the next by more than its
standard error over the test set, because the weights oscillate about a minimum. The mean
of the weights of the last few epochs (Polyak averaging over epochs, as in stochastic weight
averaging) sits nearer its bottom. Training keeps every epoch's weights with
``training.keep_epoch_weights=True``; this module averages any such files, or ``last.keras``
checkpoints, into a ``*.weights.h5`` file that ``evaluate``, ``export`` and ``init_weights``
take like ``best.weights.h5``::

    python -m neural_em.averaging runs/checkpoints/<run>/epochs/epoch01[6-9].weights.h5 \\
        runs/checkpoints/<run>/epochs/epoch020.weights.h5 --out runs/averaged_16_20.weights.h5

It works on the saved files alone, so it needs neither the model's configuration nor a
particular Keras backend. Every file must come from the same model: the same weights under the
same names and shapes.
"""

import argparse
import io
import os
import tempfile
import zipfile
from pathlib import Path

import h5py
import numpy as np

WEIGHTS_SUFFIX = ".weights.h5"
KERAS_SUFFIX = ".keras"
WEIGHTS_IN_KERAS_FILE = "model.weights.h5"  # where a .keras archive keeps its weights
OPTIMIZER_GROUP = "optimizer"  # a .keras file's Adam state: not the model's weights, not averaged


def _open_weights(path):
    """The h5py file of a *.weights.h5 file, or of the weights inside a .keras archive."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No weights file {path}.")
    if path.name.endswith(WEIGHTS_SUFFIX):
        return h5py.File(path, "r")
    if path.suffix == KERAS_SUFFIX:
        try:
            with zipfile.ZipFile(path) as archive:
                return h5py.File(io.BytesIO(archive.read(WEIGHTS_IN_KERAS_FILE)), "r")
        except (zipfile.BadZipFile, KeyError) as error:
            raise ValueError(f"{path} is not a Keras checkpoint with {WEIGHTS_IN_KERAS_FILE} inside: {error}") from error
    raise ValueError(f"{path}: expected a *{WEIGHTS_SUFFIX} file or a *{KERAS_SUFFIX} checkpoint.")


def _weight_arrays(weights_file):
    """{path: dataset} of every stored variable but the optimizer's."""
    arrays = {}

    def collect(name, item):
        if isinstance(item, h5py.Dataset) and name.split("/")[0] != OPTIMIZER_GROUP:
            arrays[name] = item

    weights_file.visititems(collect)
    return arrays


def average_weights(sources, destination):
    """Writes the element-wise mean of the sources' weights to ``destination``.

    Args:
        sources: two or more *.weights.h5 files or .keras checkpoints of the same model.
        destination: the *.weights.h5 file to write; it must not be one of the sources. It is
            written in full beside its final name and then moved there, so an interrupted run
            leaves no half-written file.

    Returns:
        the number of weight arrays averaged.

    Raises:
        ValueError: fewer than two sources, a destination that is not a *.weights.h5 file or
            is a source, or sources that hold other weights (named by file and key).
    """
    sources = [Path(source) for source in sources]
    destination = Path(destination)
    if len(sources) < 2:
        raise ValueError(f"Averaging needs at least two weights files, got {len(sources)}.")
    if not destination.name.endswith(WEIGHTS_SUFFIX):
        raise ValueError(f"--out {destination}: expected a file name ending in {WEIGHTS_SUFFIX} "
                         "(Keras loads weights only from such files).")
    if any(destination.resolve() == source.resolve() for source in sources):
        raise ValueError(f"--out {destination} is one of the files to average; name a new file.")

    files = []  # filled one by one, so a file that fails to open leaves the others closed
    try:
        for source in sources:
            files.append(_open_weights(source))
        reference = _weight_arrays(files[0])
        if not reference:
            raise ValueError(f"{sources[0]} holds no weights.")
        for source, weights_file in zip(sources[1:], files[1:]):
            arrays = _weight_arrays(weights_file)
            missing, extra = sorted(reference.keys() - arrays.keys()), sorted(arrays.keys() - reference.keys())
            if missing or extra:
                raise ValueError(f"{source} does not hold the weights of {sources[0]}: "
                                 f"missing {missing[:3]}, not in the first file {extra[:3]}.")
            for key, dataset in reference.items():
                if arrays[key].shape != dataset.shape:
                    raise ValueError(f"{source}: weight {key} has shape {arrays[key].shape}, "
                                     f"{sources[0]} has {dataset.shape}.")

        averaged = [key for key, dataset in reference.items() if np.issubdtype(dataset.dtype, np.floating)]
        destination.parent.mkdir(parents=True, exist_ok=True)
        handle, scratch = tempfile.mkstemp(suffix=WEIGHTS_SUFFIX, dir=destination.parent)
        os.close(handle)
        try:
            with h5py.File(scratch, "w") as out:
                # Copy the first file's layout (groups, attributes, non-float variables), then
                # overwrite its float weights with the means.
                for name, item in files[0].items():
                    if name != OPTIMIZER_GROUP:
                        files[0].copy(item, out, name=name)
                for key in averaged:
                    stacked = np.stack([f[key][()].astype(np.float64) for f in files])  # (n_sources, *shape)
                    out[key][...] = stacked.mean(axis=0).astype(reference[key].dtype)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(scratch, 0o666 & ~umask)  # mkstemp's file is private; the result is an ordinary file
            os.replace(scratch, destination)
        except BaseException:
            Path(scratch).unlink(missing_ok=True)
            raise
    finally:
        for weights_file in files:
            weights_file.close()
    return len(averaged)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m neural_em.averaging",
        description="Average the weights of several checkpoints of one run (e.g. the last epochs' "
                    "epochs/epochNNN.weights.h5) into one *.weights.h5 file for evaluate and export.")
    parser.add_argument("sources", nargs="+", help="*.weights.h5 files or .keras checkpoints of the same model")
    parser.add_argument("--out", required=True, help="the *.weights.h5 file to write")
    args = parser.parse_args(argv)
    try:
        count = average_weights(args.sources, args.out)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    print(f"Averaged {count} weight arrays over {len(args.sources)} checkpoints into {args.out}.")


if __name__ == "__main__":
    main()
