"""List the training runs recorded in a run database, or show one of them.

    python -m neural_em.runs                       # every run in runs/neural_em.db
    python -m neural_em.runs --status COMPLETED    # only finished runs
    python -m neural_em.runs --db postgresql://user@host/db --show 7

The table has one line per run: its data set, network, number of components
k, seed (runs that differ only in it are the repeats a ± over runs comes
from), status, the number of epochs (entries of the metric ``val_loss``) and the
best AMI (the run's result when it is a number, else the maximum of the metric
``val_ami``). A value a run did not record prints as ``-``.
"""

import argparse
import math
import numbers
import sys

from neural_em.observers import (
    DEFAULT_DB_URL,
    describe_db_url,
    get_run,
    list_runs,
    run_artifacts,
    run_metrics,
    summarize_metrics,
)

STATUSES = ("QUEUED", "RUNNING", "COMPLETED", "FAILED", "INTERRUPTED", "TIMEOUT")
EPOCH_METRIC = "val_loss"
AMI_METRIC = "val_ami"
MISSING = "-"


def _lookup(config, *keys):
    """config[k1][k2]...; None where a key is missing or a level is not a dict."""
    value = config
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def best_ami(result, ami_summary):
    """The run's result when numeric, else the maximum logged ``val_ami``.

    Args:
        result: what the run's main function returned (None while running).
        ami_summary: ``{"count", "max"}`` of the metric ``val_ami``, or None.

    Returns:
        A float, or None when neither is known.
    """
    if _is_number(result):
        return float(result)
    if ami_summary and ami_summary["max"] is not None:
        return ami_summary["max"]
    return None


def _format(value, digits=3):
    if value is None:
        return MISSING
    if _is_number(value) and not isinstance(value, numbers.Integral):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _format_time(moment):
    return MISSING if moment is None else moment.isoformat(sep=" ", timespec="seconds")


def run_table_rows(runs, summaries):
    """The table's cells, as strings, one list per run.

    Args:
        runs: dicts from ``list_runs``.
        summaries: ``summarize_metrics`` of ``EPOCH_METRIC`` and ``AMI_METRIC``.

    Returns:
        A header row followed by one row per run.
    """
    header = ["id", "dataset", "network", "k", "seed", "status", "epochs", "best AMI", "started (UTC)"]
    rows = [header]
    for run in runs:
        config = run["config"] or {}
        metrics = summaries.get(run["id"], {})
        epochs = metrics.get(EPOCH_METRIC, {}).get("count")
        rows.append([
            _format(run["id"]),
            _format(_lookup(config, "dataset", "name")),
            _format(_lookup(config, "network", "name")),
            _format(_lookup(config, "k")),
            _format(_lookup(config, "seed")),
            _format(run["status"]),
            _format(epochs),
            _format(best_ami(run["result"], metrics.get(AMI_METRIC))),
            _format_time(run["start_time"]),
        ])
    return rows


def format_table(rows):
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _flatten_config(config, prefix=""):
    """Dotted keys, so nested configs print one value per line."""
    for key, value in config.items():
        if isinstance(value, dict) and value:
            yield from _flatten_config(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def describe_run(url, run_id):
    """One run's status, config, metrics summary and artifacts, as text.

    Args:
        url: the run database; None for the default.
        run_id: the run's id.

    Returns:
        A multi-line string.
    """
    run = get_run(url, run_id)
    lines = [
        f"run {run['id']}  {run['status']}  experiment {run['experiment'] or MISSING}  "
        f"host {run['host'] or MISSING}  command {run['command'] or MISSING}",
        f"started {_format_time(run['start_time'])}  stopped {_format_time(run['stop_time'])}  (UTC)",
        f"result: {_format(run['result'], digits=4)}",
        "",
        "config:",
    ]
    lines += [f"  {key} = {value!r}" for key, value in _flatten_config(run["config"] or {})] or ["  (none)"]

    lines += ["", "metrics:"]
    metrics = run_metrics(url, run_id)
    if metrics:
        rows = [["name", "entries", "last step", "last", "min", "max"]]
        for name, entries in metrics.items():
            values = [value for _, value in entries if not math.isnan(value)]
            rows.append([
                name, str(len(entries)), _format(entries[-1][0]), _format(entries[-1][1], 4),
                _format(min(values) if values else None, 4), _format(max(values) if values else None, 4),
            ])
        lines += ["  " + line for line in format_table(rows).splitlines()]
    else:
        lines.append("  (none)")

    lines += ["", "artifacts:"]
    lines += [f"  {name}" for name in run_artifacts(url, run_id)] or ["  (none)"]

    if run["fail_trace"]:
        # The last line of a traceback names the exception; the rest is in the database.
        lines += ["", "failure: " + run["fail_trace"].strip().splitlines()[-1]]
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m neural_em.runs", description=__doc__.split("\n")[0])
    parser.add_argument("--db", metavar="URL", default=None,
                        help=f"run database: sqlite:///path or postgresql://... (default {DEFAULT_DB_URL})")
    parser.add_argument("--status", type=str.upper, choices=STATUSES, help="list only runs with this status")
    parser.add_argument("--show", type=int, metavar="ID", help="show one run's config, metrics and artifacts")
    return parser, parser.parse_args(argv)


def main(argv=None):
    """Print the run table (or one run); returns the process exit status."""
    parser, args = parse_args(argv)
    try:
        shown_url = describe_db_url(args.db)
    except ValueError as error:
        parser.error(str(error))
    try:
        if args.show is not None:
            print(describe_run(args.db, args.show))
            return 0
        runs = list_runs(args.db, status=args.status)
        if not runs:
            which = f"{args.status} runs" if args.status else "runs"
            print(f"no {which} recorded in {shown_url}")
            return 0
        print(format_table(run_table_rows(runs, summarize_metrics(args.db, [EPOCH_METRIC, AMI_METRIC]))))
        return 0
    except (FileNotFoundError, ConnectionError, LookupError) as error:
        print(error, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
