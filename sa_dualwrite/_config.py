"""Settings of the ``sa-dualwrite`` command line, and what they build.

Settings come from a TOML file (``--config``) whose top-level keys are the
fields of :class:`CliConfig`; options and environment variables given to
the command override the file. ``mappings`` is either an import string
``"package.module:NAME"`` naming a list of mappings (or a function that
returns one), a path to a TOML mapping file (relative to the config file),
or the config file's own ``[[mappings]]`` tables.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import ArgumentError

from sa_dualwrite._errors import DualWriteError
from sa_dualwrite._install import DEFAULT_LOG_FILE, DEFAULT_V2_TIMEOUT
from sa_dualwrite._outbox import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_RETRY_DELAY,
    DEFAULT_RETRY_DELAY_MAX,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

__all__ = [
    "CliConfig",
    "ConfigError",
    "load_config",
    "make_engine",
    "resolve_mappings",
]


class ConfigError(DualWriteError):
    """Raised for a missing or invalid setting of the command line."""


class CliConfig(BaseModel):
    """Settings of the command line: databases, mappings, install options."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v1_url: str | None = None
    v2_url: str | None = None
    mappings: str | list[dict[str, Any]] | None = None
    log_file: str | None = DEFAULT_LOG_FILE
    v2_timeout: float = Field(default=DEFAULT_V2_TIMEOUT, gt=0)
    max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1)
    retry_delay: float = Field(default=DEFAULT_RETRY_DELAY, ge=0)
    retry_delay_max: float = Field(default=DEFAULT_RETRY_DELAY_MAX, ge=0)
    base_dir: Path = Field(default=Path("."), exclude=True)


def load_config(path: str | os.PathLike[str] | None) -> CliConfig:
    """Read a TOML config file; without a path, return the defaults."""
    if path is None:
        return CliConfig()
    file = Path(path)
    try:
        with file.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {str(file)!r} not found; check the --config path"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"config file {str(file)!r} is not valid TOML: {exc}"
        ) from exc
    try:
        return CliConfig.model_validate({**document, "base_dir": file.parent})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()
        )
        raise ConfigError(
            f"config file {str(file)!r} is invalid: {problems}"
        ) from None


def resolve_mappings(config: CliConfig) -> Any:
    """Return the mappings that ``config`` names, ready for install."""
    spec = config.mappings
    if spec is None:
        raise ConfigError(
            "no mappings given; pass --mappings package.module:NAME or a "
            "TOML mapping file, or set mappings in the config file"
        )
    if isinstance(spec, list):
        return spec
    path = config.base_dir / spec
    if path.is_file():
        return path
    if spec.endswith(".toml"):
        raise ConfigError(
            f"mapping file {str(path)!r} not found; check the mappings "
            "path (relative to the config file, or to the working "
            "directory on the command line)"
        )
    return _import_mappings(spec)


def _import_mappings(spec: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(
            f"mappings {spec!r} is neither a TOML file nor an import "
            "string; give package.module:NAME or a path ending in .toml"
        )
    # Like other command-line runners, import from the working directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import module {module_name!r} named by mappings "
            f"{spec!r}: {exc}; run from the folder that contains it or "
            "install it"
        ) from exc
    except Exception as exc:
        raise ConfigError(
            f"importing module {module_name!r} named by mappings {spec!r} "
            f"failed: {type(exc).__name__}: {exc}; fix the module"
        ) from exc
    try:
        value = getattr(module, attribute)
    except AttributeError:
        raise ConfigError(
            f"module {module_name!r} has no attribute {attribute!r} named "
            f"by mappings {spec!r}"
        ) from None
    if callable(value):
        try:
            value = value()
        except Exception as exc:
            raise ConfigError(
                f"calling {spec!r} failed: {type(exc).__name__}: {exc}; "
                "mappings must name a list of mappings or a function that "
                "takes no arguments and returns one"
            ) from exc
    if value is None:
        raise ConfigError(
            f"mappings {spec!r} is None; name a list of mappings or a "
            "function that returns one"
        )
    if isinstance(value, (list, tuple)) and not value:
        raise ConfigError(
            f"mappings {spec!r} is an empty list; name the list that "
            "contains the application's mappings"
        )
    return value


def make_engine(url: str, role: str) -> Engine:
    """Create the engine of ``url``; ``role`` names it in errors.

    SQLite engines get the SAVEPOINT recipe from the SQLAlchemy pysqlite
    documentation, which the drain needs.
    """
    try:
        engine = create_engine(url)
    except (ArgumentError, ImportError, ValueError) as exc:
        shown = re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)
        raise ConfigError(
            f"invalid {role} URL {shown!r}: {exc}; give a SQLAlchemy URL "
            "such as postgresql+psycopg://user@host/dbname or "
            "sqlite:///path/to/file.db"
        ) from exc
    if engine.dialect.name == "sqlite" and engine.dialect.driver == "pysqlite":

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN")

    return engine
