"""Record Sacred runs, with their metrics and artifacts, in a SQL database.

Every training run is recorded by default in an embedded SQLite file,
``runs/neural_em.db`` under the current directory; the same code records into
PostgreSQL given a ``postgresql://`` URL. MongoDB stays Sacred's own business
(its ``-m`` flag) and needs nothing from this module.

Why not Sacred's ``SqlObserver``: under SQLAlchemy 2 it still runs on SQLite,
but its schema has fixed ``VARCHAR`` lengths that PostgreSQL enforces (a code
directory path longer than 64 characters fails the run at start), it has no
metrics table, its run ids skip numbers (0, 2, 3, ...), and its thread-local ORM
session is used from Sacred's heartbeat thread. ``MetricsSqlObserver`` below is a
plain ``RunObserver`` on SQLAlchemy Core: one short transaction per event, so the
heartbeat thread and the main thread never share a session.

Tables: ``experiments`` (one row per distinct code version) with its
``sources``; ``runs`` (config, host, status, times, result, captured output,
failure trace); ``metrics`` (one row per ``_run.log_scalar`` call);
``artifacts`` and ``resources`` (file contents stored in the database).
Times are naive UTC datetimes, as Sacred produces them. JSON columns use
Sacred's own serializer, so numpy values survive the round-trip.

The query helpers at the end (``list_runs``, ``get_run``, ``run_metrics``,
``summarize_metrics``, ``run_artifacts``, ``load_artifact``) read a database
back without Sacred's experiment; ``neural_em.runs`` prints them.
"""

import contextlib
import hashlib
import json
import math
from pathlib import Path

import sqlalchemy as sa
from sacred.commandline_options import cli_option
from sacred.dependencies import get_digest
from sacred.observers import RunObserver
from sacred.serializer import flatten, restore

DEFAULT_DB_URL = "sqlite:///runs/neural_em.db"

# Same priority as Sacred's SqlObserver, above MongoDB (30) and file storage
# (20): this observer numbers the run and the others reuse that id.
DEFAULT_PRIORITY = 40

# Resources are files the run opened for reading, data sets included (hundreds
# of MB). Beyond this size only their name and digest are stored.
MAX_STORED_RESOURCE_BYTES = 32 * 2**20

_SUPPORTED_BACKENDS = ("sqlite", "postgresql")
_URL_FORMS = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db or postgresql://user:password@host:port/database"
)

schema = sa.MetaData()

experiments = sa.Table(
    "experiments",
    schema,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    # Digest of Sacred's whole ex_info: a new row whenever code or dependencies change.
    sa.Column("md5sum", sa.String(32), nullable=False, index=True),
    sa.Column("base_dir", sa.Text),
    sa.Column("dependencies", sa.Text),  # JSON list of "name==version"
    sa.Column("repositories", sa.Text),  # JSON list of {url, commit, dirty}
)

sources = sa.Table(
    "sources",
    schema,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("experiment_id", sa.ForeignKey("experiments.id"), nullable=False, index=True),
    sa.Column("filename", sa.Text, nullable=False),
    sa.Column("md5sum", sa.String(32)),
    sa.Column("content", sa.Text),
)

runs = sa.Table(
    "runs",
    schema,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("experiment_id", sa.ForeignKey("experiments.id"), index=True),
    sa.Column("command", sa.Text),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("hostname", sa.Text),
    sa.Column("host_info", sa.Text),  # JSON
    sa.Column("config", sa.Text),  # JSON
    sa.Column("meta", sa.Text),  # JSON: command-line options, comment, priority
    sa.Column("queue_time", sa.DateTime),
    sa.Column("start_time", sa.DateTime),
    sa.Column("heartbeat", sa.DateTime),
    sa.Column("stop_time", sa.DateTime),
    sa.Column("result", sa.Text),  # JSON: a main function may return anything
    sa.Column("info", sa.Text),  # JSON
    sa.Column("captured_out", sa.Text),
    sa.Column("fail_trace", sa.Text),
)

metrics = sa.Table(
    "metrics",
    schema,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("run_id", sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("step", sa.Integer),
    sa.Column("value", sa.Float),  # NULL for NaN: SQLite cannot store NaN
    sa.Column("timestamp", sa.DateTime),
    sa.Index("ix_metrics_run_name", "run_id", "name"),
)

artifacts = sa.Table(
    "artifacts",
    schema,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("run_id", sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("content", sa.LargeBinary, nullable=False),
    sa.Column("content_type", sa.Text),
    sa.Column("meta", sa.Text),  # JSON
    sa.UniqueConstraint("run_id", "name"),
)

resources = sa.Table(
    "resources",
    schema,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("run_id", sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("filename", sa.Text, nullable=False),
    sa.Column("md5sum", sa.String(32)),
    sa.Column("content", sa.LargeBinary),  # NULL beyond MAX_STORED_RESOURCE_BYTES
)


# --------------------------------------------------------------------- URLs


def parse_db_url(url=None):
    """Validate a run-database URL and make it explicit.

    Args:
        url: ``sqlite:///path`` (relative to the current directory),
            ``sqlite:////absolute/path`` or ``postgresql://...``; None for
            ``DEFAULT_DB_URL``. A ``sqlalchemy.URL`` is accepted too.

    Returns:
        A ``sqlalchemy.URL``. SQLite paths are made absolute, so a later change
        of directory cannot split the records; a bare ``postgresql://`` gets the
        psycopg2 driver (SQLAlchemy 2.1 would pick psycopg 3, not installed).

    Raises:
        ValueError: the URL cannot be parsed, names another database, or is an
            SQLite URL without a file path.
    """
    url = DEFAULT_DB_URL if url is None else url
    try:
        db_url = sa.make_url(url)
    except (sa.exc.ArgumentError, TypeError) as error:
        raise ValueError(f"run database URL {url!r} is not a valid URL ({error}); expected {_URL_FORMS}") from None
    shown = db_url.render_as_string(hide_password=True)
    backend = db_url.get_backend_name()
    if backend.startswith("mongo"):
        raise ValueError(
            f"run database URL {shown!r} is MongoDB: record to MongoDB with Sacred's own flag "
            f"(-m HOST:PORT:DB_NAME); this URL must be one of {_URL_FORMS}"
        )
    if backend not in _SUPPORTED_BACKENDS:
        raise ValueError(f"run database URL {shown!r} names the database {backend!r}; expected {_URL_FORMS}")
    if backend == "postgresql" and db_url.drivername == "postgresql":
        db_url = db_url.set(drivername="postgresql+psycopg2")
    if backend == "sqlite":
        if db_url.database in (None, "", ":memory:") or db_url.database.startswith("file:"):
            raise ValueError(
                f"run database URL {shown!r} has no file path; runs must outlive the process, expected {_URL_FORMS}"
            )
        db_url = db_url.set(database=str(Path(db_url.database).expanduser().absolute()))
    return db_url


def describe_db_url(url):
    """The URL as it can be shown to a person: password hidden.

    Args:
        url: a URL string, ``sqlalchemy.URL`` or None (the default database).

    Returns:
        The URL string with any password replaced by ``***``.
    """
    return parse_db_url(url).render_as_string(hide_password=True)


def _create_engine(db_url):
    if db_url.get_backend_name() == "sqlite":
        # Several training processes may share one file: wait for the lock
        # instead of failing at once.
        return sa.create_engine(db_url, connect_args={"timeout": 30})
    # Runs last hours; a database restart must not break pooled connections.
    return sa.create_engine(db_url, pool_pre_ping=True)


def _cannot_open(db_url, error):
    shown = db_url.render_as_string(hide_password=True)
    return ConnectionError(f"cannot open the run database {shown}: {getattr(error, 'orig', None) or error}")


# ----------------------------------------------------------------- observer


def _to_json(value):
    return None if value is None else json.dumps(flatten(value))


def _from_json(text):
    return None if text is None else restore(json.loads(text))


class MetricsSqlObserver(RunObserver):
    """A Sacred observer that records runs, metrics and artifacts in SQL.

    Construction only validates the URL; the database (and an SQLite file's
    folder) is created when the first run starts, so building the observer at
    import time has no side effect. A database that cannot be reached fails the
    run before its main function starts.
    """

    def __init__(self, url=None, priority=DEFAULT_PRIORITY):
        """Args:
        url: see ``parse_db_url``; None for ``DEFAULT_DB_URL``.
        priority: Sacred observer priority; the highest one numbers the run.
        """
        self.db_url = parse_db_url(url)
        self.priority = priority
        self.run_id = None
        self._engine = None

    @classmethod
    def create(cls, url=None, priority=DEFAULT_PRIORITY):
        """Sacred's conventional constructor; same as ``MetricsSqlObserver(url)``."""
        return cls(url, priority)

    def __repr__(self):
        return f"MetricsSqlObserver({self.db_url.render_as_string(hide_password=True)!r})"

    @property
    def engine(self):
        """The SQLAlchemy engine, created with the tables on first use."""
        if self._engine is None:
            if self.db_url.get_backend_name() == "sqlite":
                Path(self.db_url.database).parent.mkdir(parents=True, exist_ok=True)
            engine = _create_engine(self.db_url)
            for attempt in range(3):
                try:
                    schema.create_all(engine)
                    break
                except sa.exc.OperationalError as error:
                    # Two runs started together on a new database: the other created a table
                    # between our check and our CREATE; checking again finds it.
                    if "already exists" in str(error) and attempt < 2:
                        continue
                    engine.dispose()
                    raise _cannot_open(self.db_url, error) from error
            self._engine = engine
        return self._engine

    # Sacred events, in the order a run emits them.

    def queued_event(self, ex_info, command, host_info, queue_time, config, meta_info, _id):
        return self._insert_run(ex_info, command, host_info, config, meta_info, _id, "QUEUED", queue_time=queue_time)

    def started_event(self, ex_info, command, host_info, start_time, config, meta_info, _id):
        return self._insert_run(ex_info, command, host_info, config, meta_info, _id, "RUNNING", start_time=start_time)

    def log_metrics(self, metrics_by_name, info):
        """Store the scalars logged since the last heartbeat.

        Args:
            metrics_by_name: ``{name: {"steps": [...], "values": [...],
                "timestamps": [...]}}`` as Sacred's ``linearize_metrics`` gives.
            info: the run's info dict (stored by ``heartbeat_event``).
        """
        rows = []
        for name, logged in metrics_by_name.items():
            for step, value, timestamp in zip(logged["steps"], logged["values"], logged["timestamps"]):
                rows.append(dict(run_id=self.run_id, name=name, step=int(step),
                                 value=_metric_value(name, value), timestamp=timestamp))
        if rows:
            with self.engine.begin() as conn:
                conn.execute(metrics.insert(), rows)

    def heartbeat_event(self, info, captured_out, beat_time, result):
        self._update_run(info=_to_json(info), captured_out=captured_out, heartbeat=beat_time, result=_to_json(result))

    def completed_event(self, stop_time, result):
        self._update_run(status="COMPLETED", stop_time=stop_time, result=_to_json(result))

    def interrupted_event(self, interrupt_time, status):
        self._update_run(status=status, stop_time=interrupt_time)

    def failed_event(self, fail_time, fail_trace):
        self._update_run(status="FAILED", stop_time=fail_time, fail_trace="".join(fail_trace))

    def resource_event(self, filename):
        path = Path(filename)
        size = path.stat().st_size
        content = path.read_bytes() if size <= MAX_STORED_RESOURCE_BYTES else None
        with self.engine.begin() as conn:
            conn.execute(resources.insert().values(
                run_id=self.run_id, filename=str(path), md5sum=get_digest(str(path)), content=content))

    def artifact_event(self, name, filename, metadata=None, content_type=None):
        """Store a file's content; a second artifact of the same name replaces the first."""
        content = Path(filename).read_bytes()
        with self.engine.begin() as conn:
            conn.execute(artifacts.delete().where(artifacts.c.run_id == self.run_id, artifacts.c.name == name))
            conn.execute(artifacts.insert().values(
                run_id=self.run_id, name=name, content=content, content_type=content_type, meta=_to_json(metadata)))

    # Helpers.

    def _insert_run(self, ex_info, command, host_info, config, meta_info, _id, status, **times):
        # One observer serves every run of its experiment; forget the last one
        # first, so a run that fails to start cannot mark its predecessor FAILED.
        self.run_id = None
        values = dict(
            command=command,
            status=status,
            hostname=host_info.get("hostname"),
            host_info=_to_json(host_info),
            config=_to_json(config),
            meta=_to_json(meta_info),
            **times,
        )
        if _id is not None:
            values["id"] = _parse_run_id(_id)
        try:
            with self.engine.begin() as conn:
                values["experiment_id"] = _experiment_id(conn, ex_info)
                run_id = conn.execute(runs.insert().values(**values)).inserted_primary_key[0]
                if "id" in values and conn.dialect.name == "postgresql":
                    # An explicit id does not advance PostgreSQL's sequence; without
                    # this the next numbered run would collide with it.
                    conn.execute(sa.text(
                        "SELECT setval(pg_get_serial_sequence('runs', 'id'), (SELECT max(id) FROM runs))"))
        except sa.exc.IntegrityError:
            if "id" not in values:
                raise
            shown = self.db_url.render_as_string(hide_password=True)
            raise ValueError(
                f"run id {_id!r} is already taken in {shown}; leave out --id to number runs automatically"
            ) from None
        self.run_id = run_id  # only once committed
        return run_id

    def _update_run(self, **values):
        if self.run_id is None:
            return  # the run failed before it was recorded
        with self.engine.begin() as conn:
            conn.execute(runs.update().where(runs.c.id == self.run_id).values(**values))


def _parse_run_id(run_id):
    try:
        return int(run_id)
    except (TypeError, ValueError):
        raise ValueError(
            f"run id {run_id!r} is not an integer; the SQL run database numbers runs with integers "
            "(leave out --id to number them automatically)"
        ) from None


def _metric_value(name, value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {name!r}: value {value!r} is not a scalar number") from None
    return None if math.isnan(value) else value


def _experiment_id(conn, ex_info):
    """The id of this experiment's code version, inserted with its sources if new.

    Two processes starting the same new code at once may both insert it: a
    harmless duplicate, cheaper than locking.
    """
    md5sum = hashlib.md5(json.dumps(ex_info, sort_keys=True).encode()).hexdigest()
    known = conn.execute(
        sa.select(experiments.c.id).where(experiments.c.name == ex_info["name"], experiments.c.md5sum == md5sum)
    ).scalar()
    if known is not None:
        return known
    experiment_id = conn.execute(experiments.insert().values(
        name=ex_info["name"],
        md5sum=md5sum,
        base_dir=ex_info["base_dir"],
        dependencies=json.dumps(ex_info["dependencies"]),
        repositories=json.dumps(ex_info["repositories"]),
    )).inserted_primary_key[0]
    source_rows = [
        dict(experiment_id=experiment_id, filename=filename, md5sum=digest,
             content=_read_source(Path(ex_info["base_dir"], filename)))
        for filename, digest in ex_info["sources"]
    ]
    if source_rows:
        conn.execute(sources.insert(), source_rows)
    return experiment_id


def _read_source(path):
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None  # moved or deleted since Sacred hashed it; the digest remains


def make_observer(url=None):
    """The observer every run gets: SQLite under ``runs/`` unless told otherwise.

    Args:
        url: ``sqlite:///path``, ``postgresql://...`` or None for
            ``DEFAULT_DB_URL`` (relative to the current directory; its folder is
            created when the first run starts).

    Returns:
        A ``MetricsSqlObserver``.

    Raises:
        ValueError: the URL is malformed or not SQLite/PostgreSQL; the message
            names it.
    """
    return MetricsSqlObserver(url)


@cli_option("-R", "--db")
def db_option(url, run):
    """Record the run in the SQL database at URL (sqlite:///path or postgresql://...) instead of runs/neural_em.db."""
    run.observers = [observer for observer in run.observers if not isinstance(observer, MetricsSqlObserver)]
    run.observers.append(make_observer(url))


# Sacred flags that choose observers: with none of them, a run gets the default database.
OBSERVER_FLAGS = ("-m", "--mongo_db", "-R", "--db", "-u", "--unobserved", "-s", "--sql", "-F", "--file_storage")


def run_commandline(ex, argv=None):
    """``ex.run_commandline`` with the default SQLite observer unless the command line picks one."""
    import sys

    argv = list(sys.argv if argv is None else argv)
    if not any(arg.split("=")[0] in OBSERVER_FLAGS for arg in argv[1:]):
        ex.observers.append(make_observer())
    return ex.run_commandline(argv)


# ------------------------------------------------------------------ queries


@contextlib.contextmanager
def _reading(url):
    """A connection to an existing run database; never creates one."""
    db_url = parse_db_url(url)
    if db_url.get_backend_name() == "sqlite" and not Path(db_url.database).is_file():
        raise FileNotFoundError(
            f"run database {db_url.database} does not exist: a run database is created when the "
            "first run starts (training records into runs/neural_em.db under the directory it "
            "starts in, unless --db names another database)"
        )
    engine = _create_engine(db_url)
    try:
        with engine.connect() as conn:
            yield conn
    except sa.exc.OperationalError as error:
        raise _cannot_open(db_url, error) from error
    finally:
        engine.dispose()


def _has_runs(conn):
    return sa.inspect(conn).has_table("runs")


def _run_summary(row):
    return {
        "id": row.id,
        "experiment": row.experiment,
        "status": row.status,
        "start_time": row.start_time,
        "stop_time": row.stop_time,
        "host": row.hostname,
        "config": _from_json(row.config),
        "result": _from_json(row.result),
    }


def _select_runs():
    return (
        sa.select(runs, experiments.c.name.label("experiment"))
        .select_from(runs.outerjoin(experiments, runs.c.experiment_id == experiments.c.id))
        .order_by(runs.c.id)
    )


def list_runs(url=None, status=None):
    """All recorded runs, oldest first.

    Args:
        url: the run database (see ``parse_db_url``); None for the default.
        status: keep only runs with this status (e.g. ``"COMPLETED"``).

    Returns:
        A list of dicts with ``id``, ``experiment`` (name), ``status``,
        ``start_time``, ``stop_time``, ``host`` (hostname), ``config`` (dict) and
        ``result``. Empty for a database without runs.

    Raises:
        FileNotFoundError: an SQLite file that does not exist.
        ConnectionError: a database that cannot be opened.
    """
    with _reading(url) as conn:
        if not _has_runs(conn):
            return []
        query = _select_runs()
        if status is not None:
            query = query.where(runs.c.status == status)
        return [_run_summary(row) for row in conn.execute(query)]


def get_run(url, run_id):
    """One run with everything recorded about it.

    Args:
        url: the run database; None for the default.
        run_id: the run's integer id.

    Returns:
        The ``list_runs`` dict plus ``command``, ``meta``, ``host_info``,
        ``info``, ``queue_time``, ``heartbeat``, ``captured_out`` and
        ``fail_trace``.

    Raises:
        LookupError: no run with this id.
    """
    with _reading(url) as conn:
        row = conn.execute(_select_runs().where(runs.c.id == run_id)).first() if _has_runs(conn) else None
    if row is None:
        raise LookupError(f"no run with id {run_id!r} in {describe_db_url(url)}")
    return {
        **_run_summary(row),
        "command": row.command,
        "meta": _from_json(row.meta),
        "host_info": _from_json(row.host_info),
        "info": _from_json(row.info),
        "queue_time": row.queue_time,
        "heartbeat": row.heartbeat,
        "captured_out": row.captured_out,
        "fail_trace": row.fail_trace,
    }


def _require_run(conn, url, run_id):
    if not _has_runs(conn) or conn.execute(sa.select(runs.c.id).where(runs.c.id == run_id)).first() is None:
        raise LookupError(f"no run with id {run_id!r} in {describe_db_url(url)}")


def run_metrics(url, run_id):
    """Every scalar a run logged, by name.

    Args:
        url: the run database; None for the default.
        run_id: the run's integer id.

    Returns:
        ``{name: [(step, value), ...]}`` in step order (then logging order);
        NaN where NaN was logged.

    Raises:
        LookupError: no run with this id.
    """
    with _reading(url) as conn:
        _require_run(conn, url, run_id)
        rows = conn.execute(
            sa.select(metrics.c.name, metrics.c.step, metrics.c.value)
            .where(metrics.c.run_id == run_id)
            .order_by(metrics.c.name, metrics.c.step, metrics.c.id)
        )
        by_name = {}
        for name, step, value in rows:
            by_name.setdefault(name, []).append((step, math.nan if value is None else value))
    return by_name


def summarize_metrics(url, names):
    """Entry count and maximum of some metrics, for every run at once.

    Args:
        url: the run database; None for the default.
        names: metric names to summarise.

    Returns:
        ``{run_id: {name: {"count": int, "max": float or None}}}`` for the runs
        that logged any of ``names`` (NaN entries count but are not a maximum).
    """
    with _reading(url) as conn:
        if not _has_runs(conn):
            return {}
        rows = conn.execute(
            sa.select(metrics.c.run_id, metrics.c.name, sa.func.count(), sa.func.max(metrics.c.value))
            .where(metrics.c.name.in_(list(names)))
            .group_by(metrics.c.run_id, metrics.c.name)
        )
        summary = {}
        for run_id, name, count, maximum in rows:
            summary.setdefault(run_id, {})[name] = {"count": count, "max": maximum}
    return summary


def run_artifacts(url, run_id):
    """The names of a run's artifacts, in the order they were added.

    Args:
        url: the run database; None for the default.
        run_id: the run's integer id.

    Returns:
        A list of artifact names.

    Raises:
        LookupError: no run with this id.
    """
    with _reading(url) as conn:
        _require_run(conn, url, run_id)
        return list(conn.execute(
            sa.select(artifacts.c.name).where(artifacts.c.run_id == run_id).order_by(artifacts.c.id)
        ).scalars())


def load_artifact(url, run_id, name, dest):
    """Write one artifact's content to a file.

    Args:
        url: the run database; None for the default.
        run_id: the run's integer id.
        name: the artifact's name (see ``run_artifacts``).
        dest: a file path, or an existing directory to write ``dest/name`` in.

    Returns:
        The ``Path`` written.

    Raises:
        LookupError: no such run, or the run has no artifact of that name (the
            message lists those it has).
    """
    with _reading(url) as conn:
        _require_run(conn, url, run_id)
        content = conn.execute(
            sa.select(artifacts.c.content).where(artifacts.c.run_id == run_id, artifacts.c.name == name)
        ).scalar()
    if content is None:
        raise LookupError(
            f"run {run_id} in {describe_db_url(url)} has no artifact {name!r}; it has {run_artifacts(url, run_id)}"
        )
    dest = Path(dest)
    path = dest / Path(name).name if dest.is_dir() else dest
    path.write_bytes(content)
    return path
