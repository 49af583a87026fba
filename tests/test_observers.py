"""Sacred runs recorded by neural_em.observers and listed by neural_em.runs.

Each behaviour is checked against SQLite and against a throwaway PostgreSQL
server (the `postgres_url` fixture of conftest.py).
"""

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy
from sacred import Experiment

from neural_em import observers, runs

REPO_ROOT = Path(__file__).resolve().parents[1]

CONFIG = {"dataset": {"name": "shapes"}, "network": {"name": "NEM"}, "k": 4}
VAL_LOSS = [0.9, 0.7, 0.8]
VAL_AMI = [0.3, 0.6, 0.5]
RESULT = 0.625
ARTIFACT = b"weights\x00\x01\xff"


def tiny_experiment(tmp_path, observer, fail=False):
    """An experiment that opens a resource, logs three epochs of metrics, saves an artifact and returns RESULT.

    With `fail`, it raises after logging the first epoch.
    """
    ex = Experiment("tiny_nem", save_git_info=False, additional_cli_options=[observers.db_option])
    ex.add_config(CONFIG)
    ex.observers.append(observer)

    @ex.main
    def main(_run):
        resource = tmp_path / "vocabulary.txt"
        resource.write_text("square triangle")
        _run.add_resource(str(resource))
        for epoch, (loss, ami) in enumerate(zip(VAL_LOSS, VAL_AMI)):
            _run.log_scalar("val_loss", loss, epoch)
            _run.log_scalar("val_ami", ami, epoch)
            if fail:
                raise RuntimeError("loss diverged")
        weights = tmp_path / "model.bin"
        weights.write_bytes(ARTIFACT)
        _run.add_artifact(str(weights))
        return RESULT

    return ex


def run_quietly(ex, **options):
    # Sacred's default fd-level capture fights pytest's; sys-level is enough here.
    return ex.run(options={"--capture": "sys", **options})


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runs' / 'test.db'}"
    return request.getfixturevalue("postgres_url")


def test_completed_run_round_trips(db_url, tmp_path):
    run = run_quietly(tiny_experiment(tmp_path, observers.make_observer(db_url)))

    [recorded] = observers.list_runs(db_url)
    assert recorded["id"] == run._id
    assert recorded["experiment"] == "tiny_nem"
    assert recorded["status"] == "COMPLETED"
    assert recorded["result"] == RESULT
    assert recorded["host"] == platform.node()
    assert recorded["start_time"] <= recorded["stop_time"]
    assert {key: recorded["config"][key] for key in CONFIG} == CONFIG

    assert observers.run_metrics(db_url, run._id) == {
        "val_loss": list(enumerate(VAL_LOSS)),
        "val_ami": list(enumerate(VAL_AMI)),
    }
    assert observers.run_artifacts(db_url, run._id) == ["model.bin"]
    written = observers.load_artifact(db_url, run._id, "model.bin", tmp_path / "restored.bin")
    assert written.read_bytes() == ARTIFACT

    engine = sqlalchemy.create_engine(observers.parse_db_url(db_url))
    with engine.connect() as conn:
        stored = conn.execute(sqlalchemy.select(observers.resources.c.filename, observers.resources.c.content)).all()
    engine.dispose()
    assert stored == [(str(tmp_path / "vocabulary.txt"), b"square triangle")]


def test_failed_run_records_status_trace_and_metrics_so_far(db_url, tmp_path):
    with pytest.raises(RuntimeError, match="loss diverged"):
        run_quietly(tiny_experiment(tmp_path, observers.make_observer(db_url), fail=True))

    [recorded] = observers.list_runs(db_url)
    assert recorded["status"] == "FAILED"
    assert recorded["result"] is None
    assert "RuntimeError: loss diverged" in observers.get_run(db_url, recorded["id"])["fail_trace"]
    assert observers.run_metrics(db_url, recorded["id"]) == {"val_loss": [(0, 0.9)], "val_ami": [(0, 0.3)]}
    assert observers.list_runs(db_url, status="COMPLETED") == []


def test_runs_cli_lists_and_shows_the_run(db_url, tmp_path, capsys):
    run = run_quietly(tiny_experiment(tmp_path, observers.make_observer(db_url)))

    listing = subprocess.run([sys.executable, "-m", "neural_em.runs", "--db", db_url],
                             cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    header, row = listing.splitlines()
    assert header.split()[:8] == ["id", "dataset", "network", "k", "seed", "status", "epochs", "best"]
    assert row.split()[:8] == [str(run._id), "shapes", "NEM", "4", str(run.config["seed"]), "COMPLETED", "3", "0.625"]

    assert runs.main(["--db", db_url, "--show", str(run._id)]) == 0
    shown = capsys.readouterr().out
    assert "dataset.name = 'shapes'" in shown
    assert "model.bin" in shown
    assert any(line.split()[:2] == ["val_ami", "3"] for line in shown.splitlines())


def test_run_ids_count_up_and_honour_sacreds_id_option(db_url, tmp_path):
    observer = observers.make_observer(db_url)  # one observer for every run, as ex.observers holds it
    ex = tiny_experiment(tmp_path, observer)
    first = run_quietly(ex)
    chosen = run_quietly(ex, **{"--id": "40"})
    after = run_quietly(ex)
    with pytest.raises(ValueError, match="run id 'abc' is not an integer"):
        run_quietly(ex, **{"--id": "abc"})
    with pytest.raises(ValueError, match="run id '40' is already taken"):
        run_quietly(ex, **{"--id": "40"})

    assert (first._id, int(chosen._id), after._id) == (1, 40, 41)  # Sacred keeps --id as given
    # The run that could not start must not have touched the one before it.
    assert [(run["id"], run["status"]) for run in observers.list_runs(db_url)] == [
        (1, "COMPLETED"), (40, "COMPLETED"), (41, "COMPLETED")]


def test_default_database_is_sqlite_under_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    observer = observers.make_observer()
    assert observer.db_url.database == str(tmp_path / "runs" / "neural_em.db")
    assert not (tmp_path / "runs").exists(), "nothing is created before a run starts"

    run_quietly(tiny_experiment(tmp_path, observer))
    assert (tmp_path / "runs" / "neural_em.db").is_file()
    assert [run["status"] for run in observers.list_runs()] == ["COMPLETED"]


def test_db_option_replaces_the_default_observer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    chosen = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    run_quietly(tiny_experiment(tmp_path, observers.make_observer()), **{"--db": chosen})
    assert [run["status"] for run in observers.list_runs(chosen)] == ["COMPLETED"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("url, expected", [
    ("not a url", "is not a valid URL"),
    ("mysql://user@host/db", "names the database 'mysql'"),
    ("sqlite://", "has no file path"),
    ("mongodb://localhost:27017/db", "Sacred's own flag"),
])
def test_bad_urls_are_named_in_the_error(url, expected):
    with pytest.raises(ValueError, match=expected) as error:
        observers.make_observer(url)
    assert url in str(error.value)


def test_bare_postgresql_url_gets_the_installed_driver_and_hides_the_password():
    url = observers.parse_db_url("postgresql://user:secret@host:5432/db")
    assert url.drivername == "postgresql+psycopg2"
    assert "secret" not in repr(observers.MetricsSqlObserver.create("postgresql://user:secret@host:5432/db"))


def test_missing_database_is_reported_and_not_created(tmp_path, capsys):
    missing = tmp_path / "missing.db"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        observers.list_runs(f"sqlite:///{missing}")
    assert runs.main(["--db", f"sqlite:///{missing}"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not missing.exists()


def test_run_starting_while_another_creates_the_tables_still_opens(tmp_path, monkeypatch):
    # Two evaluations started side by side on a new database: the other process creates the
    # tables between this one's check and its CREATE, which then fails with "already exists".
    url = f"sqlite:///{tmp_path / 'runs' / 'new.db'}"
    real_create_all = observers.schema.create_all
    calls = []

    def create_all_losing_the_race(engine, **options):
        calls.append(engine)
        if len(calls) == 1:
            other = sqlalchemy.create_engine(url)
            real_create_all(other)  # the other process wins
            other.dispose()
            return real_create_all(engine, checkfirst=False)  # raises: table already exists
        return real_create_all(engine, **options)

    monkeypatch.setattr(observers.schema, "create_all", create_all_losing_the_race)
    run = run_quietly(tiny_experiment(tmp_path, observers.make_observer(url)))
    assert len(calls) == 2
    assert observers.list_runs(url)[0]["id"] == run._id


def test_empty_database_prints_no_runs(tmp_path, capsys):
    empty = tmp_path / "empty.db"
    empty.touch()
    assert runs.main(["--db", f"sqlite:///{empty}"]) == 0
    assert "no runs recorded" in capsys.readouterr().out


def test_unknown_run_and_artifact_are_lookup_errors(tmp_path):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    run = run_quietly(tiny_experiment(tmp_path, observers.make_observer(url)))
    with pytest.raises(LookupError, match="no run with id 99"):
        observers.run_metrics(url, 99)
    with pytest.raises(LookupError, match=r"no artifact 'nope.bin'; it has \['model.bin'\]"):
        observers.load_artifact(url, run._id, "nope.bin", tmp_path)


def test_table_prints_dash_for_missing_keys_and_falls_back_to_val_ami():
    recorded = [
        {"id": 1, "status": "COMPLETED", "config": {"dataset": {"name": "shapes"}, "seed": 3}, "result": {"not": "a number"},
         "start_time": None},
        {"id": 2, "status": "RUNNING", "config": None, "result": None, "start_time": None},
    ]
    summaries = {1: {"val_ami": {"count": 3, "max": 0.6}, "val_loss": {"count": 3, "max": 0.9}}}
    _, first, second = runs.run_table_rows(recorded, summaries)
    assert first == ["1", "shapes", "-", "-", "3", "COMPLETED", "3", "0.600", "-"]
    assert second == ["2", "-", "-", "-", "-", "RUNNING", "-", "-", "-"]
