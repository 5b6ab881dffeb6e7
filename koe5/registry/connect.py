"""Short-lived DuckDB connections that respect DuckDB's one-writer-or-many-readers rule.

DuckDB lets one process open a file read-write, or many processes open it read-only, never both at once.
So every call opens a connection, does its work and closes it again:

- writers first take a cross-process file lock (`<db>.lock`), so writers queue behind each other
  instead of failing, and then open the file; the open can still fail for a moment while a reader has it,
  so it is retried with backoff;
- readers open the file read-only and retry with backoff while a writer has it.

Both sides give up after a bounded time with a RegistryError that says what to do.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import duckdb
import filelock

import koe5

# How long a caller waits for the database before giving up (seconds); override for slow shared disks.
WAIT_S = float(os.environ.get("KOE5_REGISTRY_WAIT", "60"))


class RegistryError(Exception):
    """A registry problem the user can act on; the CLI prints it and exits with status 2."""


def repo_root() -> Path:
    # koe5 is installed editable from its repository, so the package's parent is the checkout.
    return Path(koe5.__file__).resolve().parents[1]


def default_registry_path() -> Path:
    """$KOE5_REGISTRY if set, else <repo root>/registry/koe5.duckdb."""
    env = os.environ.get("KOE5_REGISTRY")
    return Path(env) if env else repo_root() / "registry" / "koe5.duckdb"


def schema_path() -> Path:
    return repo_root() / "registry" / "schema.sql"


def utcnow() -> datetime:
    # Naive UTC everywhere, so comparisons never depend on the machine's time zone.
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _is_lock_conflict(e: Exception) -> bool:
    return isinstance(e, duckdb.IOException) and "lock" in str(e).lower()


def _open_with_retry(path: Path, read_only: bool, deadline: float) -> duckdb.DuckDBPyConnection:
    delay = 0.005
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as e:
            if not _is_lock_conflict(e):
                raise RegistryError(f"Cannot open the registry {path}: {e}. Check that the file is a koe5 "
                                    f"DuckDB registry (or point $KOE5_REGISTRY / --registry elsewhere).") from None
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"The registry {path} stayed locked by another process for {WAIT_S:.0f} s. A process is "
                    f"probably holding a DuckDB connection open (e.g. an interactive `duckdb` shell or a notebook): "
                    f"close it, or raise $KOE5_REGISTRY_WAIT.") from None
            # Jitter so that polling readers and a waiting writer do not fall into lock-step.
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.25)


@contextlib.contextmanager
def write_connection(path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-write connection under the cross-process write lock, with the schema brought up to date."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + WAIT_S
    try:
        lock = filelock.FileLock(str(path) + ".lock", timeout=WAIT_S)
        lock.acquire()
    except filelock.Timeout:
        raise RegistryError(f"Another koe5 process has held the write lock {path}.lock for {WAIT_S:.0f} s. "
                            f"If no koe5 process is running, delete that lock file.") from None
    try:
        con = _open_with_retry(path, read_only=False, deadline=deadline)
        try:
            migrate(con)
            yield con
        finally:
            con.close()
    finally:
        lock.release()


@contextlib.contextmanager
def read_connection(path: Path) -> Iterator[duckdb.DuckDBPyConnection | None]:
    """A read-only connection, or None when the registry file does not exist yet (nothing recorded)."""
    path = Path(path)
    if not path.exists():
        yield None
        return
    con = _open_with_retry(path, read_only=True, deadline=time.monotonic() + WAIT_S)
    if _schema_version(con) < latest_schema_version():
        # A registry written by an older koe5: bring its schema up to date once (additive sections, under the
        # write lock), so that reads of newer tables find them instead of failing with a catalog error.
        con.close()
        with write_connection(path):
            pass
        con = _open_with_retry(path, read_only=True, deadline=time.monotonic() + WAIT_S)
    try:
        yield con
    finally:
        con.close()


def _schema_version(con: duckdb.DuckDBPyConnection) -> int:
    try:
        return con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchall()[0][0]
    except duckdb.CatalogException:
        return 0


def latest_schema_version() -> int:
    return max(v for v, _ in schema_sections(schema_path().read_text()))


def schema_sections(text: str) -> list[tuple[int, str]]:
    """Split schema.sql into (version, sql) sections at `-- @version N` lines."""
    parts = re.split(r"^--\s*@version\s+(\d+)\s*$", text, flags=re.M)
    return [(int(parts[i]), parts[i + 1]) for i in range(1, len(parts), 2)]


def migrate(con: duckdb.DuckDBPyConnection) -> None:
    """Apply every schema section newer than the registry's version (caller holds the write lock)."""
    con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at TIMESTAMP NOT NULL)")
    current = con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchall()[0][0]
    pending = [(v, sql) for v, sql in schema_sections(schema_path().read_text()) if v > current]
    for version, sql in pending:
        con.execute("BEGIN TRANSACTION")
        con.execute(sql)
        con.execute("INSERT INTO schema_version VALUES (?, ?)", [version, utcnow()])
        con.execute("COMMIT")
