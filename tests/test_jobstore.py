"""The durable job queue: lifecycle, idempotency, FIFO, concurrent claims, history, recovery, kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from sdstudio.errors import StoreError
from sdstudio.storage.jobs import JobStore


@pytest.fixture
def store(tmp_path):
    with JobStore(tmp_path / "jobs.db") as s:
        yield s


def test_lifecycle_submit_claim_finish_fail(store):
    a = store.submit("txt2img", {"prompt": "a red circle", "seed": 1})
    assert (a.status, a.attempts, a.position, a.result, a.started) == ("queued", 0, 1, None, None)
    assert len(a.id) == 32 and a.payload == {"prompt": "a red circle", "seed": 1}
    b = store.submit("img2img", {"prompt": "a square"})
    assert store.queue_position(b.id) == 2

    running = store.claim_next()
    assert (running.id, running.status, running.attempts, running.position) == (a.id, "running", 1, None)
    assert running.started is not None and store.queue_position(b.id) == 1
    done = store.finish(a.id, {"images": ["00001-1.png"], "seeds": [1]})
    assert (done.status, done.result["seeds"], done.error) == ("done", [1], None)
    assert done.finished >= done.started >= done.created

    assert store.claim_next().id == b.id
    failed = store.fail(b.id, "out of memory: try a smaller size")
    assert (failed.status, failed.error) == ("failed", "out of memory: try a smaller size")
    assert store.claim_next() is None
    # finished jobs do not move again
    assert store.finish(b.id, {"images": []}).status == "failed"
    assert store.get("nope") is None and store.finish("nope", {}) is None


def test_cancel_queued_running_finished_unknown(store):
    queued = store.submit("txt2img", {"prompt": "x"})
    running = store.submit("txt2img", {"prompt": "y"})
    store.submit("txt2img", {"prompt": "z"})
    assert store.cancel(queued.id).status == "cancelled"
    assert store.claim_next().id == running.id  # the cancelled one is skipped

    assert not store.is_cancel_requested(running.id)
    record = store.cancel(running.id)
    assert (record.status, record.cancel_requested) == ("running", True)
    assert store.is_cancel_requested(running.id)
    assert store.mark_cancelled(running.id).status == "cancelled"

    done = store.claim_next()
    store.finish(done.id, {"images": []})
    assert store.cancel(done.id).status == "done"
    assert store.cancel("unknown") is None and not store.is_cancel_requested("unknown")


def test_idempotency_key_survives_reopen(tmp_path):
    path = tmp_path / "jobs.db"
    with JobStore(path) as s:
        first = s.submit("txt2img", {"prompt": "a"}, idempotency_key="client-42")
        assert s.submit("txt2img", {"prompt": "a"}, idempotency_key="client-42").id == first.id
        other = s.submit("txt2img", {"prompt": "a"}, idempotency_key="client-43")
        assert other.id != first.id
    with JobStore(path) as s:
        again = s.submit("txt2img", {"prompt": "a"}, idempotency_key="client-42")
        assert again.id == first.id and again.idempotency_key == "client-42"
        assert s.history()[1] == 2


def test_fifo_order(store):
    ids = [store.submit("txt2img", {"prompt": f"p{i}"}).id for i in range(10)]
    claimed = []
    while (job := store.claim_next()) is not None:
        claimed.append(job.id)
    assert claimed == ids


def test_move_to_front_runs_a_job_next_and_positions_follow(store):
    a, b, c, d = (store.submit("txt2img", {"prompt": p}).id for p in "abcd")
    assert store.move_to_front(c).position == 1
    assert store.move_to_front(d).position == 1  # the latest moved goes first, as Ctrl+Shift+Enter twice
    assert [store.get(i).position for i in (a, b, c, d)] == [3, 4, 2, 1]
    assert store.claim_next().id == d
    assert store.move_to_front(d).status == "running"  # only a queued job moves
    assert [store.claim_next().id for _ in range(3)] == [c, a, b]


def test_a_version_1_database_gains_the_queue_order_and_keeps_its_jobs(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the table as the first release wrote it
        db.executescript("""
            CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (1);
            CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,
                status TEXT NOT NULL, payload TEXT NOT NULL, result TEXT, error TEXT, created REAL NOT NULL,
                started REAL, finished REAL, idempotency_key TEXT UNIQUE, attempts INTEGER NOT NULL DEFAULT 0,
                cancel_requested INTEGER NOT NULL DEFAULT 0, progress TEXT, search TEXT NOT NULL DEFAULT '');
            INSERT INTO jobs (id, kind, status, payload, created) VALUES ('old', 'txt2img', 'queued', '{}', 0);""")
    db.close()
    with JobStore(path) as store:
        new = store.submit("txt2img", {}).id
        assert store.move_to_front(new).position == 1 and store.get("old").position == 2
        assert store.claim_next().id == new


def test_concurrent_claims_never_hand_a_job_twice(store):
    ids = {store.submit("txt2img", {"prompt": f"p{i}"}).id for i in range(200)}
    claimed: list[str] = []
    errors: list[BaseException] = []
    guard = threading.Lock()

    def worker():
        try:
            while (job := store.claim_next()) is not None:
                with guard:
                    claimed.append(job.id)
                store.finish(job.id, {"ok": True})
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(claimed) == len(ids) and set(claimed) == ids
    assert all(store.get(i).attempts == 1 for i in ids)


def test_history_paging_and_text_search(store):
    for i in range(25):
        store.submit("txt2img", {"prompt": f"job {i} a Red circle" if i % 5 == 0 else f"job {i}",
                                 "negative_prompt": "BLURRY" if i == 3 else ""})
    page, total = store.history(limit=10)
    assert total == 25 and [r.payload["prompt"] for r in page][:2] == ["job 24", "job 23"]
    page3, _ = store.history(offset=20, limit=10)
    assert [r.payload["prompt"] for r in page3] == ["job 4", "job 3", "job 2", "job 1", "job 0 a Red circle"]

    red, n = store.history(text="red CIRCLE")
    assert n == 5 and [r.payload["prompt"].split()[1] for r in red] == ["20", "15", "10", "5", "0"]
    assert store.history(text="blurry")[1] == 1
    assert store.history(text="%")[1] == 0  # no LIKE wildcards
    nested = store.submit("txt2img", {"request": {"prompt": "a Nested prompt"}, "note": "red circle"})
    assert [r.id for r in store.history(text="nested")[0]] == [nested.id]
    assert store.history(text="red circle")[1] == 5  # only prompts are searched

    store.claim_next()
    assert store.history(status="running")[1] == 1 and store.history(status="queued")[1] == 25
    with pytest.raises(ValueError, match="status must be one of"):
        store.history(status="finished")


def test_recover_requeues_then_fails_after_max_attempts(store):
    job = store.submit("txt2img", {"prompt": "a"})
    other = store.submit("txt2img", {"prompt": "b"})
    assert store.claim_next().id == job.id
    assert store.recover(max_attempts=2) == [job.id]
    requeued = store.get(job.id)
    assert (requeued.status, requeued.attempts, requeued.position, requeued.started) == ("queued", 1, 1, None)
    assert store.queue_position(other.id) == 2

    assert store.claim_next().id == job.id  # first in line again; attempt 2
    assert store.recover(max_attempts=2) == [job.id]
    failed = store.get(job.id)
    assert failed.status == "failed"
    assert failed.error == "the server stopped while this job was running (attempt 2)"
    assert store.recover() == []


def test_recover_honours_a_cancel_request(store):
    job = store.submit("txt2img", {"prompt": "a"})
    store.claim_next()
    store.cancel(job.id)
    assert store.recover() == [job.id]
    assert store.get(job.id).status == "cancelled"


def test_corrupt_file_raises_store_error_and_is_kept(tmp_path):
    path = tmp_path / "jobs.db"
    garbage = b"this is not a database " * 100
    path.write_bytes(garbage)
    with pytest.raises(StoreError, match="not a readable sdstudio job database"):
        JobStore(path)
    assert path.read_bytes() == garbage


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "jobs.db"
    JobStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_version VALUES (99)")
    with pytest.raises(StoreError, match="newer sdstudio"):
        JobStore(path)


def test_wal_and_full_sync(store):
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


CRASHER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from sdstudio.storage.jobs import JobStore
    store = JobStore(Path(sys.argv[1]))
    for i in range(3):
        print("submitted", store.submit("txt2img", {"prompt": f"before {i}"}).id, flush=True)
    print("claimed", store.claim_next().id, flush=True)
    i = 0
    while True:  # keep writing until killed
        print("submitted", store.submit("txt2img", {"prompt": f"after {i}"}).id, flush=True)
        i += 1
""")


def test_kill_9_loses_no_accepted_job(tmp_path):
    path = tmp_path / "jobs.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    accepted: list[str] = []
    claimed = None
    try:
        while len(accepted) < 30:
            line = proc.stdout.readline()
            assert line, "the child process ended early"
            what, job_id = line.split()
            if what == "claimed":
                claimed = job_id
            else:
                accepted.append(job_id)
        os.kill(proc.pid, signal.SIGKILL)  # mid-way: it is submitting as fast as it can
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    with JobStore(path) as s:
        for job_id in accepted:
            assert s.get(job_id) is not None, f"accepted job {job_id} was lost"
        assert s.get(claimed).status == "running"
        assert s.recover() == [claimed]
        assert s.claim_next().id == claimed  # the oldest job runs first after the restart
        _, total = s.history()
        assert total >= len(accepted)
