"""``install_dual_write`` and the ``DualWrite`` handle it returns."""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import registry as Registry

from sa_dualwrite import _admin, _drain, _outbox, _revert, _store, _verify
from sa_dualwrite._admin import MappingStatus, RevertStep
from sa_dualwrite._apply import Applier
from sa_dualwrite._codec import decode_key, encode_key
from sa_dualwrite._drain import DrainResult
from sa_dualwrite._durable import DurableApplier
from sa_dualwrite._errors import DualWriteError
from sa_dualwrite._logging import JsonLinesFile, make_logger
from sa_dualwrite.listeners._bulk import UNSYNCED_WRITES
from sa_dualwrite.listeners._capture import CaptureListeners
from sa_dualwrite.listeners._outbox import OutboxWriter
from sa_dualwrite.mapping._compile import CompiledMapping, compile_all
from sa_dualwrite.mapping._load import normalize

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine as AsyncEngineLike
else:
    AsyncEngineLike = Any

__all__ = ["DEFAULT_LOG_FILE", "DualWrite", "install_dual_write"]

DEFAULT_LOG_FILE = "logs/dual_write.log"
DEFAULT_V2_TIMEOUT = 3.0

try:
    from sqlalchemy.util.concurrency import in_greenlet
except ImportError:  # pragma: no cover - older SQLAlchemy 2.0 releases

    def in_greenlet() -> bool:
        return True


Method = TypeVar("Method", bound=Callable[..., Any])


def _blocking(method: Method) -> Method:
    """Mark a handle method that connects to the databases.

    With an AsyncEngine those connections need SQLAlchemy's greenlet
    context. Called outside it, the method raises a DualWriteError that
    explains how to call it, instead of SQLAlchemy's MissingGreenlet.
    """

    @functools.wraps(method)
    def run(self: DualWrite, *args: Any, **kwargs: Any) -> Any:
        if self.is_async and not in_greenlet():
            raise DualWriteError(
                f"DualWrite.{method.__name__}() connects to the databases, "
                "and this handle was installed on an AsyncEngine; call it "
                "inside run_sync(), for example await connection.run_sync("
                f"lambda _: dual_write.{method.__name__}(...)), or install "
                "a handle on a sync Engine of the same databases"
            )
        return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


_installed: weakref.WeakKeyDictionary[Engine, DualWrite] = (
    weakref.WeakKeyDictionary()
)
# Reentrant: a failed install calls uninstall() while holding it.
_installed_lock = threading.RLock()


def _sync_engine(engine: Any, role: str) -> Engine:
    # An AsyncEngine wraps a sync Engine; checking the attribute avoids
    # importing sqlalchemy.ext.asyncio, which requires greenlet.
    sync_engine = getattr(engine, "sync_engine", engine)
    if isinstance(sync_engine, Engine):
        return sync_engine
    raise DualWriteError(
        f"{role} must be a SQLAlchemy Engine or AsyncEngine, got "
        f"{type(engine).__name__}; pass the result of create_engine()"
    )


class DualWrite:
    """Handle on one installed dual write; returned by ``install_dual_write``.

    Use it to create the plugin's tables, to revert and replay changes, to
    read the cross-reference and to uninstall.
    """

    def __init__(
        self,
        *,
        engine: Engine,
        target: Engine,
        mappings: dict[str, CompiledMapping],
        log_file: str | os.PathLike[str] | None,
        v2_timeout: float,
        durable: bool = False,
        policy: _outbox.RetryPolicy | None = None,
        unsynced_writes: str = "log",
    ) -> None:
        self.engine = engine
        self.target = target
        self.v2_timeout = v2_timeout
        self.durable = durable
        self.policy = policy or _outbox.RetryPolicy()
        self._mappings = mappings
        self.logger, self._log_sink = make_logger(log_file)
        self.log_file = None if self._log_sink is None else self._log_sink.path
        self.in_transaction = target is engine
        self._applier = (
            DurableApplier(
                source=engine,
                target=target,
                mappings=mappings,
                timeout=v2_timeout,
                logger=self.logger,
                policy=self.policy,
            )
            if durable
            else Applier(
                source=engine,
                target=target,
                mappings=mappings,
                timeout=v2_timeout,
                logger=self.logger,
            )
        )
        self._applier.sink = self._log_sink
        self._listeners = CaptureListeners(
            engine=engine,
            mappings=mappings,
            applier=self._applier,
            in_transaction=self.in_transaction,
            # With the target in the source database the sync itself
            # writes the outbox rows, in the source transaction.
            outbox=OutboxWriter()
            if durable and not self.in_transaction
            else None,
            unsynced_writes=unsynced_writes,
        )
        self.installed = False

    @property
    def mappings(self) -> dict[str, CompiledMapping]:
        """The installed mappings, compiled, by name."""
        return dict(self._mappings)

    def _install(self) -> None:
        self._listeners.register()
        self.installed = True
        self.logger.info(
            "dual_write_installed",
            mappings=sorted(self._mappings),
            mode="in_transaction" if self.in_transaction else "after_commit",
            durable=self.durable,
            source=self.engine.url.render_as_string(hide_password=True),
            target=self.target.url.render_as_string(hide_password=True),
        )

    def uninstall(self) -> None:
        """Remove every listener; changes not yet committed are not synced."""
        with _installed_lock:
            if _installed.get(self.engine) is self:
                del _installed[self.engine]
        if not self.installed:
            return
        self._listeners.unregister()
        self._applier.close()
        self.installed = False
        self.logger.info("dual_write_uninstalled")
        if self._log_sink is not None:
            self._log_sink.close()

    @_blocking
    def create_tables(self) -> None:
        """Create the audit and cross-reference tables in the target
        database and the outbox table in the source database, if missing.
        """
        _store.metadata.create_all(self.target)
        _store.outbox_metadata.create_all(self.engine)

    def _mapping(self, name: str) -> CompiledMapping:
        try:
            return self._mappings[name]
        except KeyError:
            known = ", ".join(sorted(self._mappings))
            raise DualWriteError(
                f"unknown mapping {name!r}; installed mappings: {known}"
            ) from None

    @_blocking
    def v2_id(self, mapping_name: str, v1_pk: Any) -> Any:
        """Return the target key cross-referenced to source key ``v1_pk``.

        ``v1_pk`` is a value, or a tuple for a composite key. Returns the
        target key in its column's type (a tuple for a composite key), or
        None when the row has no cross-reference.
        """
        mapping = self._mapping(mapping_name)
        key = encode_key(_as_tuple(v1_pk))
        with self.target.connect() as connection:
            found = _store.load_xref(connection, mapping.name, [key])
        if key not in found:
            return None
        return _unwrap(decode_key(found[key], mapping.target_pk_types))

    @_blocking
    def v1_id(self, mapping_name: str, v2_pk: Any) -> Any:
        """Return the source key cross-referenced to target key ``v2_pk``."""
        mapping = self._mapping(mapping_name)
        key = encode_key(_as_tuple(v2_pk))
        with self.target.connect() as connection:
            found = _store.v1_key_for(connection, mapping.name, key)
        if found is None:
            return None
        return _unwrap(decode_key(found, mapping.source_pk_types))

    @_blocking
    def revert(
        self,
        audit_id: int | None = None,
        *,
        session_key: str | None = None,
        force: bool = False,
    ) -> list[int]:
        """Undo applied changes in the target, newest first, all or nothing.

        Give one ``audit_id`` or a ``session_key`` (every applied change of
        that session). An insert is deleted with its cross-reference, an
        update restores its ``before`` image, a delete re-inserts it. Raises
        :class:`~sa_dualwrite.RevertConflict` when a target row changed
        since, unless ``force`` is true, and
        :class:`~sa_dualwrite.DualWriteError` for a change that is not
        ``applied``. Returns the ids of the new ``revert`` audit rows.
        """
        if (audit_id is None) == (session_key is None):
            raise DualWriteError(
                "revert() needs exactly one of audit_id or session_key="
            )
        return _revert.revert(
            self, audit_id=audit_id, session_key=session_key, force=force
        )

    @_blocking
    def replay(self, ids: Iterable[int] | None = None) -> list[int]:
        """Retry failed changes from the current source rows.

        Without ``ids`` every change with status ``failed`` is retried, as
        well as changes that failed while the target was unreachable and
        could not be audited. Each retried audit row becomes ``replayed``
        and each retry writes a new row, ``applied`` or ``failed``. Returns
        the ids of the new audit rows.
        """
        requested = None if ids is None else list(ids)
        if self.durable:
            return _admin.replay_durable(self, requested)
        return _revert.replay(self, requested)

    @_blocking
    def resync(
        self,
        mapping_name: str,
        v1_pks: Iterable[Any],
        *,
        session_key: str | None = None,
    ) -> list[int]:
        """Sync source rows to the target from their current state.

        Use it for rows that ``verify()`` reports as missing or different,
        or after writes the library cannot see (raw SQL, triggers). Each
        key is a value, or a tuple for a composite key. A row that exists
        is inserted or updated in the target. A row that no longer exists
        is handled as its mapping's ``on_delete`` setting requires. Each row
        gets an audit row, with ``session_key`` (default: a new
        ``resync-...`` key) so that the whole resync can be reverted.
        Returns the new audit ids.
        """
        return _revert.resync(self, mapping_name, list(v1_pks), session_key)

    @_blocking
    def drain(
        self,
        *,
        batch_size: int = _drain.DEFAULT_BATCH_SIZE,
        timeout: float = _drain.DEFAULT_BATCH_TIMEOUT,
    ) -> DrainResult:
        """Apply every due pending outbox change, oldest first per row.

        Walks the outbox once, in batches of ``batch_size`` rows, each with
        a time budget of ``timeout`` seconds on the target. Changes waiting
        for a retry whose time has not come are left for a later drain.
        Several drains may run at once, in threads, processes or machines
        sharing the source database, without applying a change twice.
        Stops early, leaving the rows pending, when a batch fails as a
        whole (the target is unreachable, for example); errors of the
        source database are raised. Returns the counts of rows applied,
        failed (to be retried) and parked.
        """
        if batch_size < 1 or not timeout > 0:
            raise DualWriteError(
                f"drain() needs batch_size >= 1 and timeout > 0 seconds, got "
                f"{batch_size!r} and {timeout!r}"
            )
        return _drain.drain(self, batch_size=batch_size, timeout=timeout)

    @_blocking
    def requeue(self, ids: Iterable[int] | None = None) -> int:
        """Put failed outbox changes back in the queue, due now.

        Without ``ids`` every parked change is requeued, and every pending
        change waiting for a retry after a failed attempt; with audit ids,
        the changes whose last attempt wrote those audit rows. The changes
        are applied by the next drain. Returns how many outbox rows were
        requeued.
        """
        with self.engine.begin() as connection:
            requeued = _outbox.requeue(
                connection, None if ids is None else list(ids)
            )
        self.logger.info("outbox_requeued", rows=len(requeued))
        return len(requeued)

    @_blocking
    def prune(self, older_than: float) -> int:
        """Delete outbox rows done more than ``older_than`` seconds ago.

        Also deletes the target's records of applied outbox changes that no
        longer need them. Returns the number of outbox rows deleted.
        """
        return _drain.prune(self, older_than=older_than)

    @_blocking
    def status(self) -> list[MappingStatus]:
        """Return the sync state of each mapping: pending, parked,
        applied and failed counts and the lag, the age in seconds of the
        oldest pending outbox change. Raises :class:`DualWriteError` when
        a database cannot be read; ``sa-dualwrite status`` shows what it
        could read instead.
        """
        return _admin.status(self)

    @_blocking
    def audit_rows(self, **filters: Any) -> list[dict[str, Any]]:
        """Return audit rows, newest first, as dicts.

        Filters: ``mapping``, ``status``, ``operation``, ``session_key``,
        ``v1_pk`` (the key as stored, text), ``since`` and ``until``
        (aware datetimes; ``until`` is exclusive), ``ids`` (audit ids) and
        ``limit`` (default 100, None for all).
        """
        return _admin.audit_rows(self, **filters)

    @_blocking
    def preview_revert(
        self, audit_id: int | None = None, *, session_key: str | None = None
    ) -> list[RevertStep]:
        """Return what ``revert`` would change, without changing anything.

        Takes the same arguments as :meth:`revert` and raises the same
        :class:`~sa_dualwrite.DualWriteError` for rows that cannot be
        reverted; a row that changed since is returned with ``conflict``
        set instead of raising.
        """
        if (audit_id is None) == (session_key is None):
            raise DualWriteError(
                "preview_revert() needs exactly one of audit_id or "
                "session_key="
            )
        return _admin.preview_revert(
            self, audit_id=audit_id, session_key=session_key
        )

    @_blocking
    def verify(
        self,
        *,
        batch_size: int = _verify.DEFAULT_BATCH_SIZE,
        max_mismatches: int = _verify.DEFAULT_MAX_MISMATCHES,
    ) -> _verify.VerifyReport:
        """Compare the source and target rows of every mapping.

        Each source row must have a cross-referenced target row whose mapped
        columns equal what the mapping computes from the source row now. A
        cross-reference whose source row is gone must have been handled as
        ``on_delete`` requires, and every row of a target table must be
        cross-referenced. Rows are read in batches of ``batch_size``, each
        batch in its own short transaction; nothing is written. Changes
        still being synced show as mismatches, so check a mismatch again
        before acting on it.

        Returns a :class:`~sa_dualwrite.VerifyReport` with one
        report per mapping: row counts, the number of mismatches of each
        kind (``missing``, ``different``, ``extra``, ``stale``,
        ``unmappable``) and the first ``max_mismatches`` of them.
        """
        return _verify.verify(
            self, batch_size=batch_size, max_mismatches=max_mismatches
        )

    @property
    def is_async(self) -> bool:
        """Whether the source or the target engine is an AsyncEngine's."""
        return bool(
            self.engine.dialect.is_async or self.target.dialect.is_async
        )

    @property
    def applier(self) -> Applier:
        """The object that applies changes and reports their outcomes."""
        return self._applier

    @property
    def listeners(self) -> CaptureListeners:
        """The capture receivers of this install."""
        return self._listeners

    @property
    def log_sink(self) -> JsonLinesFile | None:
        """The JSON lines file sink, when ``log_file`` was given."""
        return self._log_sink

    def __repr__(self) -> str:
        state = "installed" if self.installed else "uninstalled"
        return (
            f"<DualWrite {state} {sorted(self._mappings)} "
            f"source={self.engine.url.render_as_string(hide_password=True)}>"
        )


def _as_tuple(value: Any) -> tuple[Any, ...]:
    if isinstance(value, tuple):
        return value
    if isinstance(value, list):
        return tuple(value)
    return (value,)


def _unwrap(key: Sequence[Any]) -> Any:
    return key[0] if len(key) == 1 else tuple(key)


def install_dual_write(
    engine: Engine | AsyncEngineLike,
    mappings: Any = None,
    target: Engine | AsyncEngineLike | None = None,
    log_file: str | os.PathLike[str] | None = DEFAULT_LOG_FILE,
    *,
    base: type[DeclarativeBase] | Registry | None = None,
    v2_timeout: float = DEFAULT_V2_TIMEOUT,
    durable: bool = False,
    max_attempts: int = _outbox.DEFAULT_MAX_ATTEMPTS,
    retry_delay: float = _outbox.DEFAULT_RETRY_DELAY,
    retry_delay_max: float = _outbox.DEFAULT_RETRY_DELAY_MAX,
    unsynced_writes: Literal["log", "raise"] = "log",
) -> DualWrite:
    """Watch the ORM sessions of ``engine`` and sync their writes to V2.

    Args:
        engine: the source (V1) engine; writes of ORM sessions bound to it
            are captured. An ``AsyncEngine`` is accepted.
        mappings: a list of :class:`~sa_dualwrite.Mapping` or dicts, a
            path to a TOML file, or None for every mapped class that
            declares ``__dual_write__`` (under ``base`` when given).
        target: the V2 engine; None writes to ``engine`` itself, inside
            the source transaction.
        log_file: file that receives JSON lines; None writes no file.
        base: a declarative base or registry that limits the search for
            ``__dual_write__`` declarations.
        v2_timeout: seconds that connecting to the target, waiting for its
            locks and running its statements may take per commit.
        durable: write each change to the ``dualwrite_outbox`` table in
            the source transaction, so that nothing is lost when the sync
            after the commit does not happen; ``drain()`` applies what is
            left pending.
        max_attempts: durable mode: failed attempts after which a change
            is parked as ``failed`` until a replay.
        retry_delay: durable mode: seconds before the first retry of a
            failed change; each further retry waits twice as long.
        retry_delay_max: durable mode: the maximum wait between two
            attempts, in seconds.
        unsynced_writes: what to do with a write on a source table that
            cannot be synced, such as a Core ``connection.execute()``
            outside any ORM session: ``"log"`` logs the
            ``unsynced_write`` warning event, ``"raise"`` raises
            ``UnsyncedWriteError`` (meant for test suites).

    Raises:
        MappingError: a mapping is invalid; nothing is installed.
        DualWriteError: dual write is already installed on ``engine``.
    """
    source = _sync_engine(engine, "engine")
    target_engine = (
        source if target is None else _sync_engine(target, "target")
    )
    if unsynced_writes not in UNSYNCED_WRITES:
        raise DualWriteError(
            f"unsynced_writes must be one of {', '.join(UNSYNCED_WRITES)}, "
            f"got {unsynced_writes!r}"
        )
    if not v2_timeout > 0:
        raise DualWriteError(
            f"v2_timeout must be a positive number of seconds, got "
            f"{v2_timeout!r}"
        )
    policy = _outbox.RetryPolicy(max_attempts, retry_delay, retry_delay_max)
    compiled = compile_all(normalize(mappings, base=base))
    with _installed_lock:
        existing = _installed.get(source)
        if existing is not None:
            raise DualWriteError(
                f"dual write is already installed on engine {source.url!r}; "
                "call uninstall() on the existing handle first"
            )
        handle = DualWrite(
            engine=source,
            target=target_engine,
            mappings=compiled,
            log_file=log_file,
            v2_timeout=v2_timeout,
            durable=durable,
            policy=policy,
            unsynced_writes=unsynced_writes,
        )
        try:
            handle._install()
        except Exception:
            handle.uninstall()
            raise
        _installed[source] = handle
    return handle
