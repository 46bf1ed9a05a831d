"""A loop that drains the outbox until stopped.

:class:`Worker` runs :meth:`DualWrite.drain` again and again: at once while
batches make progress, after ``idle`` seconds when the outbox is empty, and
after a doubling pause (up to ``max_backoff`` seconds) while drains fail.
:meth:`Worker.stop` may be called from a signal handler or another thread;
the loop ends after the batch in progress, which its time budget bounds.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from sa_dualwrite._drain import DrainResult
from sa_dualwrite._errors import one_line

if TYPE_CHECKING:
    from sa_dualwrite._install import DualWrite

__all__ = ["Worker"]

PRUNE_INTERVAL = 600.0
"""Seconds between two prunes of done outbox rows."""


class Worker:
    """Drains the outbox of one install in a loop."""

    def __init__(
        self,
        handle: DualWrite,
        *,
        batch_size: int,
        timeout: float,
        idle: float,
        max_backoff: float,
        retention: float | None,
    ) -> None:
        self.handle = handle
        self.batch_size = batch_size
        self.timeout = timeout
        self.idle = idle
        self.max_backoff = max_backoff
        self.retention = retention
        self.total = DrainResult()
        # The error that ended the last drain early, if it did.
        self.last_error: str | None = None
        self._stopping = threading.Event()
        self._next_prune = 0.0

    def stop(self) -> None:
        """Ask the loop to end after the batch in progress."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopping.is_set()

    def run(self, *, once: bool = False) -> DrainResult:
        """Drain until stopped (or once); return the rows counted."""
        logger = self.handle.logger
        logger.info("worker_started", batch_size=self.batch_size, once=once)
        pause = self.idle
        # TODO: wake on PostgreSQL LISTEN/NOTIFY from the outbox insert
        # instead of polling every `idle` seconds.
        while not self._stopping.is_set():
            result = self._drain_once()
            if once:
                break
            self._prune()
            if result is not None and result.error is None:
                progressed = result.applied or result.parked
                pause = 0.0 if progressed else self.idle
            else:
                pause = min(max(pause * 2, self.idle, 0.1), self.max_backoff)
                logger.info("worker_backing_off", seconds=pause)
            if pause:
                self._stopping.wait(pause)
        logger.info(
            "worker_stopped",
            applied=self.total.applied,
            failed=self.total.failed,
            parked=self.total.parked,
        )
        return self.total

    def _drain_once(self) -> DrainResult | None:
        try:
            result = self.handle.drain(
                batch_size=self.batch_size, timeout=self.timeout
            )
        except Exception as exc:
            self.last_error = one_line(exc)
            self.handle.logger.error(
                "drain_failed", error=self.last_error, exc_info=exc
            )
            return None
        self.last_error = result.error
        self.total += DrainResult(
            result.applied, result.failed, result.parked, result.error
        )
        return result

    def _prune(self) -> None:
        if self.retention is None or time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + PRUNE_INTERVAL
        try:
            self.handle.prune(self.retention)
        except Exception as exc:
            self.handle.logger.error(
                "prune_failed", error=one_line(exc), exc_info=exc
            )
