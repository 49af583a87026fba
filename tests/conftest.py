"""Shared pytest fixtures."""

# ------------------------------------------------------------- PostgreSQL ---
# `postgres_url`: a fresh database on a throwaway PostgreSQL server that lives
# for the test session (initdb into a temporary folder, listening on a free
# port of 127.0.0.1 only, trust authentication). Without PostgreSQL's binaries
# the tests that use it are skipped, except on CI (CI=true), where they fail:
# CI must exercise PostgreSQL (run scripts/install_postgres.sh first).

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

_POSTGRES_SERVER_USER = "postgres"
_database_numbers = itertools.count()


def _postgres_bin_dir():
    """The folder of initdb/pg_ctl/createdb, newest version first; None if absent."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    # Debian keeps the server binaries off PATH, one folder per major version.
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    newest = max(found, key=lambda path: [int(part) for part in Path(path).parts[-3].split(".")], default=None)
    return Path(newest).parent if newest else None


def _skip_or_fail(message):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: the PostgreSQL tests must run; install it with scripts/install_postgres.sh)")
    pytest.skip(message)


def _server_user_prefix():
    """Command prefix that runs the server as a non-root user: initdb refuses root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(_POSTGRES_SERVER_USER)
    except KeyError:
        _skip_or_fail(f"running as root, but the system user {_POSTGRES_SERVER_USER!r} (created by Debian's "
                      "postgresql package) does not exist to run the PostgreSQL server")
    return ["runuser", "-u", _POSTGRES_SERVER_USER, "--"]


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def _postgres_server():
    bin_dir = _postgres_bin_dir()
    if bin_dir is None:
        _skip_or_fail("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin")
    as_server_user = _server_user_prefix()
    # Not pytest's tmp_path: its parent folders are private to the current user.
    root = Path(tempfile.mkdtemp(prefix="neural_em_pg_"))
    if as_server_user:
        shutil.chown(root, _POSTGRES_SERVER_USER, _POSTGRES_SERVER_USER)
    data_dir, log_file, port = root / "data", root / "server.log", _free_port()

    def server_command(*args):
        subprocess.run([*as_server_user, *map(str, args)], cwd=root, check=True, capture_output=True, text=True)

    try:
        server_command(bin_dir / "initdb", "-D", data_dir, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        # -F: no fsync; the data is thrown away.
        server_command(bin_dir / "pg_ctl", "-D", data_dir, "-l", log_file, "-w", "-t", "60",
                       "-o", f"-p {port} -h 127.0.0.1 -k {root} -F", "start")
    except subprocess.CalledProcessError as error:
        log = log_file.read_text() if log_file.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start a test PostgreSQL server ({error.cmd}): {error.stderr}\n{log}")
    try:
        yield {"bin_dir": bin_dir, "port": port}
    finally:
        subprocess.run([*as_server_user, str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "stop"],
                       cwd=root, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(_postgres_server):
    """URL of a new, empty PostgreSQL database (superuser postgres, no password)."""
    name = f"neural_em_test_{next(_database_numbers)}"
    subprocess.run([str(_postgres_server["bin_dir"] / "createdb"), "-h", "127.0.0.1",
                    "-p", str(_postgres_server["port"]), "-U", "postgres", name],
                   check=True, capture_output=True, text=True)
    return f"postgresql://postgres@127.0.0.1:{_postgres_server['port']}/{name}"
# ------------------------------------------------------- end of PostgreSQL ---


# ------------------------------------------------------------ tiny models ---
# `flying`: tiny flying shapes and an untrained K = 3 sequence model, for the
# tests that need a saved model but not a trained one.


@pytest.fixture(scope="session")
def flying(tmp_path_factory):
    """Tiny flying shapes (4 frames, so 3 next-step predictions) and an untrained K = 3 model.

    Returns a namespace with ``data`` (the .h5 file), ``weights`` (a .weights.h5 file) and
    ``model`` (the whole model as a .keras file).
    """
    from neural_em.data import registry
    from neural_em.data.pipeline import dataset_info
    from neural_em.model.nem import NeuralEM, build

    folder = tmp_path_factory.mktemp("flying")
    data = registry.generate("flying_shapes_3", out=folder / "flying.h5", train=8, valid=8, test=8, frames=4,
                             progress=False)
    model = build(NeuralEM("flying_shapes", dataset_info(data).image_shape, k=3, seed=0), frames=4)
    model.save_weights(folder / "flying.weights.h5")
    model.save(folder / "flying.keras")
    return SimpleNamespace(data=data, weights=folder / "flying.weights.h5", model=folder / "flying.keras")
