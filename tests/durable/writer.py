"""A writing process for the crash tests: commit alertas, then hang.

Run as ``python -m tests.durable.writer V1_URL V2_URL COUNT MODE``. It
installs durable mode and commits COUNT alertas in one transaction. With
MODE ``before-mark`` it stops just before marking the outbox rows done,
after the V2 commit, and prints ``marking``; with ``plain`` its V2 write
runs normally (the test blocks it with a V2 lock). Either way the test
kills it with SIGKILL.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.orm import Session

import sa_dualwrite as dw
from sa_dualwrite import _pipeline
from tests import models

APPLICATION_NAME = "sadw-durable-writer"


def hang_before_mark(
    conn: Any,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: Any,
    executemany: bool,
) -> None:
    """Stop for ever before the UPDATE that marks outbox rows done."""
    if statement.startswith("UPDATE dualwrite_outbox SET status"):
        _hang()


def _hang(*args: Any, **kwargs: Any) -> None:
    print("marking", flush=True)
    while True:
        time.sleep(60)


def main(v1_url: str, v2_url: str, count: int, mode: str) -> None:
    """Commit ``count`` alertas through a durable install."""
    options = {"connect_args": {"application_name": APPLICATION_NAME}}
    source = create_engine(v1_url, **options)
    target = create_engine(v2_url, **options)
    if mode == "before-mark":
        # The general sync marks through SQLAlchemy, the PostgreSQL
        # pipeline through run_statements(); stop before either.
        event.listen(source, "before_cursor_execute", hang_before_mark)
        _pipeline.run_statements = _hang
    dw.install_dual_write(
        source,
        models.mappings(),
        target=target,
        log_file=None,
        durable=True,
        v2_timeout=120,
    )
    with Session(source) as session:
        session.add_all(
            [
                models.new_alerta(titulo=f"crash {index}")
                for index in range(count)
            ]
        )
        print("committing", flush=True)
        session.commit()
    print("committed", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
