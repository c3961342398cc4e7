"""What the server needs of a job store: a durable queue with history. `JobStore` (jobs.py) is the SQLite one;
another backend implements this protocol."""

from __future__ import annotations

from typing import Any, Protocol

from sdstudio.storage.jobs import JobRecord


class JobQueue(Protocol):
    def submit(self, kind: str, payload: dict[str, Any], idempotency_key: str | None = None) -> JobRecord:
        """Queue a job (the same idempotency key gives the job already queued)."""

    def claim_next(self) -> JobRecord | None:
        """The first queued job (oldest, unless one was moved to the front), now running; None when there is none."""

    def move_to_front(self, job_id: str) -> JobRecord | None:
        """A queued job runs next."""

    def finish(self, job_id: str, result: dict[str, Any]) -> JobRecord | None: ...

    def fail(self, job_id: str, reason: str) -> JobRecord | None: ...

    def mark_cancelled(self, job_id: str) -> JobRecord | None: ...

    def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a queued job, or ask the running one to stop."""

    def is_cancel_requested(self, job_id: str) -> bool: ...

    def recover(self, max_attempts: int = 2) -> list[str]:
        """After a restart: re-queue the jobs left running (failing those tried too often); their ids."""

    def requeue(self, job_id: str, why: str, max_attempts: int = 2) -> JobRecord | None:
        """A running job whose run was lost: queued again, or failed with `why` after `max_attempts`."""

    def counts(self) -> dict[str, int]:
        """Jobs per status."""

    def get(self, job_id: str) -> JobRecord | None: ...

    def queue_position(self, job_id: str) -> int | None: ...

    def history(self, offset: int = 0, limit: int = 20, text: str | None = None,
                status: str | None = None) -> tuple[list[JobRecord], int]: ...
