"""Command line: `python -m neural_em.data generate NAME [options]` and `python -m neural_em.data list`.

Errors print one line to stderr and exit with code 2.
"""

import argparse
import sys

from neural_em.data import registry
from neural_em.data.mnist import DIGIT_POOLS

PROGRAM = "python -m neural_em.data"


class _OneLineErrorParser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line, like the other errors of this command."""

    def error(self, message):
        self.exit(2, f"{PROGRAM}: error: {message} (see --help)\n")


def build_parser():
    """The argument parser with the `generate` and `list` commands."""
    parser = _OneLineErrorParser(prog=PROGRAM, description="Generate the data sets of Neural EM as HDF5.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,list}")

    generate = commands.add_parser("generate", help="generate a data set and print the path written")
    generate.add_argument("name", help="data set name (see `list`)")
    for option, meaning in (("train", "training sequences"), ("valid", "validation sequences"),
                            ("test", "test sequences"), ("seed", "random seed"),
                            ("objects", "objects per frame"), ("frames", "frames per sequence"),
                            ("size", "frame height and width in pixels")):
        generate.add_argument(f"--{option}", type=int, metavar="N", help=f"{meaning} (default: the data set's)")
    generate.add_argument("--digits", choices=DIGIT_POOLS, help="MNIST digit pool (MNIST sets only)")
    generate.add_argument("--mnist-dir", metavar="DIR",
                          help="folder of MNIST IDX files (default: tensorflow-datasets)")
    generate.add_argument("--out", metavar="FILE", help="output file (default: data/NAME.h5)")
    generate.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    commands.add_parser("list", help="list the data sets with their defaults")
    return parser


def list_datasets():
    """One block per data set: name, description, defaults."""
    lines = []
    for name, spec in registry.DATASETS.items():
        defaults = " ".join(f"{key}={value}" for key, value in spec.defaults.items())
        lines.append(f"{name:26s} {spec.description}\n{'':26s} defaults: {defaults}")
    return "\n".join(lines)


def main(argv=None):
    """Runs the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "list":
        print(list_datasets())
        return 0
    try:
        path = registry.generate(
            args.name, out=args.out, train=args.train, valid=args.valid, test=args.test, seed=args.seed,
            objects=args.objects, frames=args.frames, size=args.size, digits=args.digits,
            mnist_dir=args.mnist_dir, progress=not args.no_progress)
    except (ValueError, KeyError, OSError) as error:
        message = " ".join(str(error).split())  # one line, whatever the message holds
        print(f"{PROGRAM}: error: {message}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
