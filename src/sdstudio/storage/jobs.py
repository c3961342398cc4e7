"""The durable job queue and history: one SQLite table, written so that a job accepted is never lost.

Durability. The database runs in WAL mode with `synchronous=FULL`. In WAL mode `NORMAL` already survives
a crash of the process (kill -9): committed pages sit in the WAL file, which the OS keeps. It does not
survive power loss or an OS crash, because the WAL is only fsynced at checkpoints, so the last commits
can roll back after the server has answered "accepted, job id X". `FULL` fsyncs the WAL at every commit:
once `submit()` returns, the job is on disk. The cost is one fsync per state change (about a
millisecond), nothing next to a generation that takes seconds. (Live progress is better kept in memory
by the server and only stored now and then; see `set_progress`.)

Lifecycle::

    submit -> queued --claim_next--> running --finish--> done     (move_to_front: next in line)
                 |                      |-----fail----> failed
                 |--cancel--> cancelled |--cancel--> cancel_requested, then mark_cancelled -> cancelled

A crash leaves jobs "running"; `recover()` at startup re-queues them (they keep their place: first in
line) or fails them with a reason once they have used their attempts.

Threads share one connection behind a lock; every write is one `BEGIN IMMEDIATE` transaction, so a
claim is atomic across threads and across processes. Data is never deleted on an error: a file that is
not a readable database raises `StoreError` and is left as it is.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sdstudio.errors import StoreError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]
STATUSES: tuple[str, ...] = ("queued", "running", "done", "failed", "cancelled")
SEARCH_KEYS = frozenset({"prompt", "negative_prompt"})

_SCHEMA = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,      -- FIFO order, never reused
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    payload TEXT NOT NULL,                      -- JSON
    result TEXT,                                -- JSON
    error TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    idempotency_key TEXT UNIQUE,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress TEXT,                              -- JSON
    search TEXT NOT NULL DEFAULT '',            -- casefolded prompt and negative prompt
    turn REAL                                   -- queue order when moved (NULL: seq)
);
CREATE INDEX jobs_status_seq ON jobs (status, seq);
"""

_TURN = "COALESCE(turn, seq)"  # the queue runs in this order (seq breaks ties); `move_to_front` lowers it
_COLUMNS = """id, kind, status, payload, result, error, created, started, finished, idempotency_key,
    attempts, cancel_requested, progress,
    CASE WHEN status = 'queued'
         THEN (SELECT COUNT(*) FROM jobs q WHERE q.status = 'queued'
               AND (COALESCE(q.turn, q.seq), q.seq) <= (COALESCE(jobs.turn, jobs.seq), jobs.seq)) END"""


@dataclass(frozen=True)
class JobRecord:
    """One job as stored. `position` is 1 for the next job to run, None unless queued."""

    id: str
    kind: str
    status: JobStatus
    payload: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    created: float
    started: float | None
    finished: float | None
    idempotency_key: str | None
    attempts: int
    cancel_requested: bool
    progress: dict[str, Any] | None = None
    position: int | None = None


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def search_text(payload: Any) -> str:
    """The casefolded prompts found anywhere in a payload (keys in SEARCH_KEYS), one per line."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in SEARCH_KEYS and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(payload)
    return "\n".join(found).casefold()


def _record(row: tuple) -> JobRecord:
    try:
        return JobRecord(id=row[0], kind=row[1], status=row[2], payload=json.loads(row[3]), result=_loads(row[4]),
                         error=row[5], created=row[6], started=row[7], finished=row[8], idempotency_key=row[9],
                         attempts=row[10], cancel_requested=bool(row[11]), progress=_loads(row[12]),
                         position=row[13])
    except ValueError as e:
        raise StoreError(f"job {row[0]} has unreadable JSON in the job database: {e}") from e


class JobStore:
    """The job queue and history in one SQLite file. Safe to share between threads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open the job database {self.path}: {e}") from e
        try:
            self._open()
        except sqlite3.Error as e:
            self._db.close()
            raise StoreError(f"{self.path} is not a readable sdstudio job database ({e}). It was left as it "
                             "is; move it aside to start with an empty queue and history.") from e
        except StoreError:
            self._db.close()
            raise

    def _open(self) -> None:
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"cannot use WAL mode for {self.path} (got {mode}); use a local disk")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._write() as tx:
            tx.run("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            version = tx.one("SELECT MAX(version) FROM schema_version")[0]
            if version is None:  # a new file: executescript would commit early, so one statement at a time
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    tx.run(statement)
                tx.run("INSERT INTO schema_version (version) VALUES (?)", SCHEMA_VERSION)
            elif version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer sdstudio (schema version {version}, this "
                                 f"one reads up to {SCHEMA_VERSION}); upgrade sdstudio or use another --data-dir")
            elif "turn" not in {row[1] for row in tx.all("PRAGMA table_info(jobs)")}:
                # added after version 1 without a new version: older sdstudio reads it and ignores it
                tx.run("ALTER TABLE jobs ADD COLUMN turn REAL")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions --------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[_Tx]:
        """One IMMEDIATE transaction (takes the write lock at once, so read-then-update is atomic)."""
        with self._lock, self._errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield _Tx(self._db)
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[_Tx]:
        """One read transaction: a consistent snapshot for several statements."""
        with self._lock, self._errors():
            self._db.execute("BEGIN")
            try:
                yield _Tx(self._db)
            finally:
                if self._db.in_transaction:
                    self._db.execute("COMMIT")

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise StoreError(f"the job database {self.path} failed: {e}") from e

    # -- queue ---------------------------------------------------------------------------------------

    def submit(self, kind: str, payload: dict[str, Any], idempotency_key: str | None = None) -> JobRecord:
        """Queue a job; with a known `idempotency_key`, return that job instead (also after a restart)."""
        if not kind or not isinstance(kind, str):
            raise ValueError(f"kind must be a non-empty string, got {kind!r}")
        if not isinstance(payload, dict):
            raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
        if idempotency_key is not None and not isinstance(idempotency_key, str):
            raise TypeError(f"idempotency_key must be a string, got {type(idempotency_key).__name__}")
        text = _dumps(payload)
        with self._write() as tx:
            if idempotency_key is not None:
                row = tx.one("SELECT id FROM jobs WHERE idempotency_key = ?", idempotency_key)
                if row is not None:
                    return tx.get(row[0])
            job_id = uuid.uuid4().hex
            tx.run("INSERT INTO jobs (id, kind, status, payload, created, idempotency_key, search) "
                   "VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                   job_id, kind, text, time.time(), idempotency_key, search_text(payload))
            return tx.get(job_id)

    def record_done(self, kind: str, payload: dict[str, Any], result: dict[str, Any]) -> JobRecord:
        """A job another door already ran (the CLI), straight into history as done with its result."""
        now = time.time()
        with self._write() as tx:
            job_id = uuid.uuid4().hex
            tx.run("INSERT INTO jobs (id, kind, status, payload, created, started, finished, result, search) "
                   "VALUES (?, ?, 'done', ?, ?, ?, ?, ?, ?)",
                   job_id, kind, _dumps(payload), now, now, now, _dumps(result), search_text(payload))
            return tx.get(job_id)

    def claim_next(self) -> JobRecord | None:
        """Move the first queued job (the oldest, unless one was moved to the front) to running (attempts += 1)
        and return it; None when the queue is empty."""
        with self._write() as tx:
            row = tx.one(f"SELECT id FROM jobs WHERE status = 'queued' ORDER BY {_TURN}, seq LIMIT 1")
            if row is None:
                return None
            tx.run("UPDATE jobs SET status = 'running', started = ?, attempts = attempts + 1, progress = NULL "
                   "WHERE id = ?", time.time(), row[0])
            return tx.get(row[0])

    def move_to_front(self, job_id: str) -> JobRecord | None:
        """A queued job runs next (ahead of the others queued); any other job is returned unchanged."""
        with self._write() as tx:
            tx.run(f"UPDATE jobs SET turn = (SELECT MIN({_TURN}) FROM jobs WHERE status = 'queued') - 1 "
                   "WHERE id = ? AND status = 'queued'", job_id)
            return tx.get(job_id)

    def finish(self, job_id: str, result: dict[str, Any]) -> JobRecord | None:
        """running -> done with its result. A job in any other state is returned unchanged."""
        return self._transition(job_id, "done", ("running",), result=_dumps(result))

    def fail(self, job_id: str, reason: str) -> JobRecord | None:
        """queued or running -> failed with a reason the user can read."""
        return self._transition(job_id, "failed", ("queued", "running"), error=str(reason))

    def mark_cancelled(self, job_id: str) -> JobRecord | None:
        """queued or running -> cancelled (the worker calls this once it has stopped the job)."""
        return self._transition(job_id, "cancelled", ("queued", "running"))

    def _transition(self, job_id: str, status: str, sources: tuple[str, ...], result: str | None = None,
                    error: str | None = None) -> JobRecord | None:
        marks = ", ".join("?" * len(sources))
        with self._write() as tx:
            changed = tx.run(f"UPDATE jobs SET status = ?, finished = ?, result = COALESCE(?, result), "
                             f"error = COALESCE(?, error) WHERE id = ? AND status IN ({marks})",
                             status, time.time(), result, error, job_id, *sources)
            record = tx.get(job_id)
        if not changed and record is not None:
            log.warning("job %s is %s; not marking it %s", job_id, record.status, status)
        return record

    def cancel(self, job_id: str) -> JobRecord | None:
        """queued -> cancelled at once; running -> cancel_requested; finished jobs unchanged; unknown -> None."""
        with self._write() as tx:
            tx.run("UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ? AND status = 'queued'",
                   time.time(), job_id)
            tx.run("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'running'", job_id)
            return tx.get(job_id)

    def is_cancel_requested(self, job_id: str) -> bool:
        """Cheap enough to ask at every denoising step."""
        with self._read() as tx:
            row = tx.one("SELECT cancel_requested, status FROM jobs WHERE id = ?", job_id)
        return row is not None and (bool(row[0]) or row[1] == "cancelled")

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        """Store progress of a running job. Each call is an fsync: call it now and then, not every step."""
        with self._write() as tx:
            tx.run("UPDATE jobs SET progress = ? WHERE id = ? AND status = 'running'", _dumps(progress), job_id)

    def recover(self, max_attempts: int = 2) -> list[str]:
        """At startup, before the worker starts: `requeue` every job a crash left running."""
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        with self._read() as tx:
            ids = [row[0] for row in tx.all("SELECT id FROM jobs WHERE status = 'running' ORDER BY seq")]
        for job_id in ids:
            self.requeue(job_id, "the server stopped while this job was running", max_attempts)
        if ids:
            log.info("recovered %d job(s) left running: %s", len(ids), ", ".join(ids))
        return ids

    def requeue(self, job_id: str, why: str, max_attempts: int = 2) -> JobRecord | None:
        """A running job whose run was lost (a crash, a dead cluster worker): queued again at its turn, or
        failed with `why` once it used `max_attempts`, or cancelled when its cancel was requested."""
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        with self._write() as tx:
            row = tx.one("SELECT attempts, cancel_requested FROM jobs WHERE id = ? AND status = 'running'", job_id)
            if row is not None:
                attempts, cancel_requested = row
                if cancel_requested:
                    tx.run("UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ?", time.time(), job_id)
                elif attempts < max_attempts:
                    tx.run("UPDATE jobs SET status = 'queued', started = NULL, progress = NULL WHERE id = ?", job_id)
                else:
                    tx.run("UPDATE jobs SET status = 'failed', finished = ?, error = ? WHERE id = ?",
                           time.time(), f"{why} (attempt {attempts})", job_id)
            return tx.get(job_id)

    def counts(self) -> dict[str, int]:
        """How many jobs are in each status (queued, running, done, failed, cancelled)."""
        with self._read() as tx:
            found = dict(tx.all("SELECT status, COUNT(*) FROM jobs GROUP BY status"))
        return {status: int(found.get(status, 0)) for status in ("queued", "running", "done", "failed", "cancelled")}

    # -- reading -------------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        with self._read() as tx:
            return tx.get(job_id)

    def queue_position(self, job_id: str) -> int | None:
        """1 for the next job to run; None when the job is not queued (or unknown)."""
        record = self.get(job_id)
        return None if record is None else record.position

    def history(self, offset: int = 0, limit: int = 20, text: str | None = None,
                status: str | None = None) -> tuple[list[JobRecord], int]:
        """A page of jobs, newest first, and the total count matching the filters.

        `text` matches the prompt or negative prompt anywhere in the payload, ignoring case.
        """
        if offset < 0 or limit < 0:
            raise ValueError(f"offset and limit must be >= 0, got offset={offset}, limit={limit}")
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        where, params = ["1"], []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if text:
            where.append("instr(search, ?) > 0")
            params.append(text.casefold())
        condition = " AND ".join(where)
        with self._read() as tx:
            total = tx.one(f"SELECT COUNT(*) FROM jobs WHERE {condition}", *params)[0]
            rows = tx.all(f"SELECT {_COLUMNS} FROM jobs WHERE {condition} ORDER BY seq DESC LIMIT ? OFFSET ?",
                          *params, limit, offset)
        return [_record(row) for row in rows], total


class _Tx:
    """Statements inside one transaction of a JobStore (its lock is held)."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def run(self, sql: str, *params: Any) -> int:
        return self._db.execute(sql, params).rowcount

    def one(self, sql: str, *params: Any) -> tuple | None:
        return self._db.execute(sql, params).fetchone()

    def all(self, sql: str, *params: Any) -> list[tuple]:
        return self._db.execute(sql, params).fetchall()

    def get(self, job_id: str) -> JobRecord | None:
        row = self.one(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", job_id)
        return None if row is None else _record(row)
