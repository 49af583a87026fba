#!/usr/bin/env bash
# Install the PostgreSQL server binaries that the tests need (tests/conftest.py,
# fixture `postgres_url`, starts its own throwaway server from them), unless
# they are already there. Debian/Ubuntu only; runs apt-get through sudo when
# not root. CI must run this before pytest: with CI=true a missing PostgreSQL
# fails the tests instead of skipping them.
set -euo pipefail

find_initdb() {
    # Debian keeps the server binaries off PATH, under one folder per version.
    command -v initdb 2>/dev/null || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1
}

if initdb_path="$(find_initdb)" && [ -n "$initdb_path" ]; then
    echo "PostgreSQL already installed: $initdb_path"
    exit 0
fi

if ! command -v apt-get >/dev/null; then
    echo "install_postgres.sh: apt-get not found; install the PostgreSQL server (initdb, pg_ctl) by hand" >&2
    exit 1
fi

as_root=()
if [ "$(id -u)" -ne 0 ]; then
    as_root=(sudo)
fi

"${as_root[@]}" apt-get update
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql

if ! initdb_path="$(find_initdb)" || [ -z "$initdb_path" ]; then
    echo "install_postgres.sh: the postgresql package was installed but initdb is still not found" >&2
    exit 1
fi
echo "PostgreSQL installed: $initdb_path"
