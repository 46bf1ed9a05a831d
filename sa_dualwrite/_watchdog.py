"""Client-side limits on the time a sync may wait for the target.

PostgreSQL's statement_timeout and lock_timeout end waits that the server
sees. They cannot end a wait for a server that no longer answers at all (a
network partition, a frozen host), and connecting has no timeout unless the
driver is given one. This module adds both limits:

* :func:`connect_limit` gives new target connections a connect timeout,
  unless the application set one;
* :class:`Watchdog` shuts down the socket of a target connection whose sync
  is still waiting some time after its deadline, which makes the blocked
  call fail at once; the connection is then invalidated, never reused.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import Connection

__all__ = ["GRACE", "Watchdog", "connect_limit", "sqlite_busy_timeout"]

# Seconds past the deadline before the socket is shut down: the server's
# own timeouts, set to the same deadline, normally end the wait first.
GRACE = 1.0

# Connect timeout parameter of each driver, in whole seconds.
_CONNECT_TIMEOUT = {
    "psycopg": "connect_timeout",
    "psycopg_async": "connect_timeout",
    "psycopg2": "connect_timeout",
    "asyncpg": "timeout",
    "pg8000": "timeout",
    "pymysql": "connect_timeout",
    "mysqldb": "connect_timeout",
}


def connect_limit(seconds: float) -> Callable[..., None]:
    """Return a ``do_connect`` receiver that sets a connect timeout.

    libpq accepts whole seconds of at least 2, so the timeout is rounded up
    to that. A timeout given in the URL or in ``connect_args`` wins.
    """
    timeout = max(2, math.ceil(seconds))

    def receiver(
        dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]
    ) -> None:
        name = _CONNECT_TIMEOUT.get(str(dialect.driver))
        if name is not None:
            cparams.setdefault(name, timeout)

    return receiver


def _socket_of(connection: Connection) -> int | None:
    """Return the socket file descriptor of a psycopg connection."""
    raw = connection.connection.dbapi_connection
    pgconn = getattr(raw, "pgconn", None)
    if pgconn is not None:
        return int(pgconn.socket)
    fileno = getattr(raw, "fileno", None)
    if callable(fileno) and connection.dialect.driver == "psycopg2":
        return int(fileno())
    return None


def _shut_down(fd: int) -> None:
    """Shut down a socket that another thread may be blocked on."""
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=os.dup(fd))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()


class Watchdog:
    """Shuts down the sockets of syncs that wait past their deadline.

    One daemon thread per install, started on first use. ``guard`` is
    cheap: it adds an entry to a heap under a lock.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._watched: dict[int, int] = {}
        self._fired: set[int] = set()
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    @contextlib.contextmanager
    def guard(self, connection: Connection, deadline: float) -> Iterator[None]:
        """Watch ``connection`` until the block ends.

        If the block is still running ``GRACE`` seconds past ``deadline``
        (a ``time.monotonic()`` value), the socket is shut down; the
        connection is invalidated when the block ends.
        """
        fd = _socket_of(connection)
        if fd is None:
            yield
            return
        token = next(self._tokens)
        with self._condition:
            self._watched[token] = fd
            heapq.heappush(self._heap, (deadline + GRACE, token))
            self._start()
            self._condition.notify()
        try:
            yield
        finally:
            with self._condition:
                self._watched.pop(token, None)
                fired = token in self._fired
                self._fired.discard(token)
            if fired:
                connection.invalidate()

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._loop, name="sa_dualwrite_watchdog", daemon=True
            )
            self._thread.start()

    def _loop(self) -> None:
        with self._condition:
            while not self._stopped:
                while self._heap and self._heap[0][1] not in self._watched:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._condition.wait()
                    continue
                due, token = self._heap[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._condition.wait(wait)
                    continue
                heapq.heappop(self._heap)
                fd = self._watched.pop(token)
                self._fired.add(token)
                _shut_down(fd)

    def stop(self) -> None:
        """Stop the thread; guards still open stop being watched."""
        with self._condition:
            self._stopped = True
            self._watched.clear()
            self._condition.notify()


@contextlib.contextmanager
def sqlite_busy_timeout(
    connection: Connection, deadline: float
) -> Iterator[None]:
    """Bound SQLite's wait for a locked database file by the deadline.

    pysqlite waits 5 seconds by default. The connection's own busy timeout
    is put back when the block ends, since it belongs to the application.
    """
    if connection.dialect.name != "sqlite":
        yield
        return
    # On the DBAPI connection: through SQLAlchemy the PRAGMA would begin a
    # transaction, and the sync begins its own.
    raw = connection.connection.dbapi_connection
    assert raw is not None
    previous = raw.execute("PRAGMA busy_timeout").fetchone()[0]
    remaining = max(int((deadline - time.monotonic()) * 1000), 1)
    raw.execute(f"PRAGMA busy_timeout = {remaining}")
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            raw.execute(f"PRAGMA busy_timeout = {int(previous)}")
