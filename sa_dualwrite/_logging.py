"""The library's structured logger.

Each install gets its own structlog logger, built with
``structlog.wrap_logger`` so that neither structlog's global configuration
nor the ``logging`` configuration of the application is touched. Events go
to the standard ``logging`` logger ``sa_dualwrite`` and, when ``log_file``
is set, as JSON lines to that file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import structlog
from structlog.typing import EventDict, WrappedLogger

__all__ = ["LOGGER_NAME", "JsonLinesFile", "make_logger"]

LOGGER_NAME = "sa_dualwrite"

# A library only adds a NullHandler to its own logger, so that an
# application without logging configured gets no "no handler" output.
logging.getLogger(LOGGER_NAME).addHandler(logging.NullHandler())

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class JsonLinesFile:
    """structlog processor that appends each event as a JSON line.

    Events below ``min_level`` are not written. The file is opened in append
    mode and written under a lock, one flushed line per event. A failed
    write (a full disk, a removed mount) never reaches the code that logged
    the event: it is reported on the standard logger ``sa_dualwrite``, once
    and then every ``REPORT_EVERY`` failures, and the event still goes on to
    that logger.
    """

    REPORT_EVERY = 1000

    def __init__(self, path: str | os.PathLike[str], min_level: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._min_level = min_level
        self._lock = threading.Lock()
        self._batching = threading.local()
        self._failures = 0
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")

    def __call__(
        self, logger: WrappedLogger, method_name: str, event_dict: EventDict
    ) -> EventDict:
        level = _LEVELS.get(str(event_dict.get("level", "info")), 0)
        if level < self._min_level:
            return event_dict
        record = event_dict
        if record.get("exc_info"):
            record = structlog.processors.format_exc_info(
                logger, method_name, dict(record)
            )
        line = json.dumps(record, default=str, ensure_ascii=False)
        with self._lock:
            if self._file is not None:
                try:
                    self._file.write(line + "\n")
                    if not getattr(self._batching, "active", False):
                        self._file.flush()
                except OSError as exc:
                    self._report_failure(exc)
        return event_dict

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Flush once at the end of the block instead of after each line.

        The events of one commit are written with one system call.
        """
        self._batching.active = True
        try:
            yield
        finally:
            self._batching.active = False
            with self._lock:
                if self._file is not None:
                    try:
                        self._file.flush()
                    except OSError as exc:
                        self._report_failure(exc)

    def _report_failure(self, exc: OSError) -> None:
        self._failures += 1
        if self._failures % self.REPORT_EVERY != 1:
            return
        logging.getLogger(LOGGER_NAME).error(
            "log_file_write_failed path=%s failures=%d error=%s",
            self.path,
            self._failures,
            exc,
        )

    def close(self) -> None:
        """Close the file; later events are no longer written to it."""
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError as exc:
                    self._report_failure(exc)
                self._file = None


def make_logger(
    log_file: str | os.PathLike[str] | None,
) -> tuple[Any, JsonLinesFile | None]:
    """Return a bound structlog logger and its file sink, if any."""
    sink = None
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if log_file is not None:
        sink = JsonLinesFile(log_file, logging.INFO)
        processors.append(sink)
    processors.append(structlog.stdlib.render_to_log_kwargs)
    logger = structlog.wrap_logger(
        logging.getLogger(LOGGER_NAME),
        processors=processors,
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=True,
    )
    return logger, sink
