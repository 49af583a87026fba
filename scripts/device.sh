#!/usr/bin/env bash
# Train on a GPU machine that has JAX but no TensorFlow (or Keras, or Sacred), in time-boxed calls.
#
#   bash scripts/device.sh wheels
#       Here, once: download into .whl/ the wheels that machine lacks, at the versions installed in
#       .venv, built for its Python 3.12. Name .whl in the device call's carry (about 8 MB).
#   bash scripts/device.sh train MINUTES CHECKPOINT_DIR [Sacred updates...]
#       There, in the repository root: install the carried wheels (when ./.whl is there), train under
#       KERAS_BACKEND=jax with training.time_limit_minutes=MINUTES, then copy the checkpoint's weights
#       and state to $OUT/checkpoint and the log to $OUT/train.log, files over 15 MiB in parts (a file
#       comes back only up to 16 MiB). E.g. bash scripts/device.sh train 8 runs/checkpoints/fs3k3 \
#                            sacred_configs/flying_shapes_3obj_k3.yaml seed=0
#   bash scripts/device.sh restore FILES_AT CHECKPOINT_DIR
#       Here: put what came back (the call's files_at) together again in CHECKPOINT_DIR; the same
#       train command then goes on from its last epoch, here or there.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

PART_BYTES=${DEVICE_PART_BYTES:-$((15 * 1024 * 1024))}
# What the GPU machine's image lacks of requirements.txt (it has numpy, h5py, scipy, scikit-learn,
# matplotlib, tqdm, pyyaml, pillow, absl-py, rich, ml-dtypes, packaging, colorama, py-cpuinfo).
DEVICE_MISSING=(keras namex optree sacred docopt-ng jsonpickle munch GitPython gitdb smmap wrapt sqlalchemy)

usage() {
    sed -n '2,15p' "$0" >&2
    exit 2
}

wheels() {
    cd "$ROOT"
    local python=.venv/bin/python packages=() name version
    [ -x "$python" ] || { echo "device.sh wheels: $python not found; install first (README)" >&2; exit 1; }
    for name in "${DEVICE_MISSING[@]}"; do
        version=$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") || {
            echo "device.sh wheels: $name is not installed in .venv" >&2; exit 1; }
        packages+=("$name==$version")
    done
    rm -rf .whl && mkdir .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "${packages[@]}"
    ls -1 .whl
    du -sh .whl
}

train() {
    [ $# -ge 2 ] || usage
    local minutes=$1 folder=$2 out=${OUT:?device.sh train: OUT is not set (it runs on the device machine)}
    shift 2
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    local status=0
    python3 -m neural_em.train with "$@" "training.time_limit_minutes=$minutes" "checkpoint_dir=$folder" \
        2>&1 | tee "$out/train.log" || status=$?
    # The weights and the state, not the plots (train redraws them) nor the run database (Sacred's
    # record of this call stays there: it holds the best weights again, and 64 MiB come back at most).
    mkdir -p "$out/checkpoint"
    for file in "$folder"/*.keras "$folder"/*.h5 "$folder"/*.json; do
        [ -f "$file" ] || continue
        if [ "$(stat -c %s "$file")" -gt "$PART_BYTES" ]; then
            split -b "$PART_BYTES" -d "$file" "$out/checkpoint/$(basename "$file").part"
        else
            cp "$file" "$out/checkpoint/"
        fi
    done
    ls -l "$out/checkpoint"
    return "$status"
}

epoch_of() {
    python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['epoch'])" "$1"
}

restore() {
    [ $# -eq 2 ] || usage
    local from=$1/checkpoint folder=$2 part name ours theirs
    [ -d "$from" ] || { echo "device.sh restore: no folder $from (what did the call bring back?)" >&2; exit 1; }
    [ -f "$from/state.json" ] || { echo "device.sh restore: $from holds no state.json" >&2; exit 1; }
    if [ -f "$folder/state.json" ]; then
        ours=$(epoch_of "$folder/state.json") theirs=$(epoch_of "$from/state.json")
        if [ "$ours" -gt "$theirs" ]; then
            echo "device.sh restore: $folder is at epoch $ours, past the $theirs brought back; left as it is" >&2
            exit 1
        fi
    fi
    mkdir -p "$folder"
    for part in "$from"/*; do
        name=$(basename "$part")
        case "$name" in
            *.part00) cat "$from/${name%.part00}".part* > "$folder/${name%.part00}.tmp"
                      mv "$folder/${name%.part00}.tmp" "$folder/${name%.part00}" ;;
            *.part[0-9][0-9]) ;;
            *) cp "$part" "$folder/" ;;
        esac
    done
    ls -l "$folder"
}

case "${1:-}" in
    wheels) shift; wheels "$@" ;;
    train) shift; train "$@" ;;
    restore) shift; restore "$@" ;;
    *) usage ;;
esac
