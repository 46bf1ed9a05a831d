"""Who made a change and which session it belongs to."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from sqlalchemy.orm import Session

__all__ = [
    "ACTOR_KEY",
    "SESSION_KEY",
    "acting_as",
    "current_actor",
    "session_key",
]

SESSION_KEY = "dualwrite.session_key"
"""``session.info`` key of the session key carried by audit rows."""

ACTOR_KEY = "dualwrite.actor"
"""``session.info`` key of the actor recorded on audit rows."""

_actor: ContextVar[str | None] = ContextVar("sa_dualwrite_actor", default=None)


def session_key(session: Any) -> str:
    """Return the key that the audit rows of ``session`` carry.

    The key is ``session.info["dualwrite.session_key"]`` when the
    application set it (a request id, for example); otherwise a UUID is
    generated on first use and kept in that entry, so a session keeps one
    key across its commits. An ``AsyncSession`` shares the key of the
    ``Session`` it wraps.
    """
    sync_session = getattr(session, "sync_session", session)
    if not isinstance(sync_session, Session):
        raise TypeError(
            f"session_key() needs a Session or AsyncSession, got "
            f"{type(session).__name__}"
        )
    info = sync_session.info
    key = info.get(SESSION_KEY)
    if key is None:
        key = str(uuid.uuid4())
        info[SESSION_KEY] = key
    return str(key)


@contextmanager
def acting_as(actor: str) -> Iterator[None]:
    """Record ``actor`` on the changes captured inside the block.

    It takes precedence over ``session.info["dualwrite.actor"]``. The value
    is kept in a context variable, so threads and asyncio tasks each see
    their own.
    """
    token = _actor.set(actor)
    try:
        yield
    finally:
        _actor.reset(token)


def current_actor(session: Session) -> str | None:
    """Return the actor of a change captured now in ``session``."""
    actor = _actor.get()
    if actor is not None:
        return actor
    value = session.info.get(ACTOR_KEY)
    return None if value is None else str(value)
