"""Loading mappings from TOML files, dicts and ``__dual_write__``."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from collections.abc import Mapping as MappingABC
from pathlib import Path
from typing import Any

from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import registry as Registry

from sa_dualwrite._errors import MappingError
from sa_dualwrite.mapping._spec import Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

__all__ = ["declared_mappings", "load_mappings", "normalize"]


def load_mappings(path: str | os.PathLike[str]) -> list[Mapping]:
    """Read mappings from a TOML file.

    The file contains an array of tables ``[[mappings]]``, each with
    ``source``, ``target``, optional ``name`` and ``on_delete``, and a
    ``[mappings.fields]`` table. Classes and compute functions are given as
    import strings ``"package.module:name"``. Raises :class:`MappingError`
    naming the file and the problem.
    """
    file = Path(path)
    try:
        with file.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError as exc:
        raise MappingError(
            f"mapping file {str(file)!r} not found; check the path"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise MappingError(
            f"mapping file {str(file)!r} is not valid TOML: {exc}"
        ) from exc
    unknown = set(document) - {"mappings"}
    if unknown:
        raise MappingError(
            f"mapping file {str(file)!r} has unknown top-level keys "
            f"{sorted(unknown)}; declare each mapping as [[mappings]]"
        )
    entries = document.get("mappings")
    if not isinstance(entries, list) or not entries:
        raise MappingError(
            f"mapping file {str(file)!r} declares no mappings; add at least "
            "one [[mappings]] table with source, target and "
            "[mappings.fields]"
        )
    return [
        _from_dict(entry, f"{file}[{index}]")
        for index, entry in enumerate(entries)
    ]


def _from_dict(entry: Any, where: str) -> Mapping:
    if isinstance(entry, Mapping):
        return entry
    if not isinstance(entry, MappingABC):
        raise MappingError(
            f"mapping {where} is {type(entry).__name__}, not a dict or a "
            "Mapping; give a dict with source, target and fields"
        )
    return Mapping.model_validate(dict(entry))


def normalize(
    mappings: Any,
    *,
    base: type[DeclarativeBase] | Registry | None = None,
) -> list[Mapping]:
    """Turn every accepted form of ``mappings`` into a list of models."""
    if mappings is None:
        return declared_mappings(base)
    if isinstance(mappings, (str, os.PathLike)):
        return load_mappings(mappings)
    if isinstance(mappings, (Mapping, MappingABC)):
        return [_from_dict(mappings, "0")]
    if isinstance(mappings, Iterable):
        return [
            _from_dict(entry, str(index))
            for index, entry in enumerate(mappings)
        ]
    raise MappingError(
        f"mappings must be a list of Mapping or dicts, a path to a TOML "
        f"file, or None; got {type(mappings).__name__}"
    )


def declared_mappings(
    base: type[DeclarativeBase] | Registry | None = None,
) -> list[Mapping]:
    """Collect the mappings declared as ``__dual_write__`` on mapped classes.

    ``base`` limits the search to one declarative base or registry; without
    it every registry in the process is searched.
    """
    found: list[Mapping] = []
    for cls in _mapped_classes(base):
        declared = cls.__dict__.get("__dual_write__")
        if declared is None:
            continue
        if isinstance(declared, Mapping):
            found.append(declared.model_copy(update={"source": cls}))
            continue
        if not isinstance(declared, MappingABC):
            raise MappingError(
                f"{cls.__qualname__}.__dual_write__ is "
                f"{type(declared).__name__}; declare a dict with target "
                "and fields"
            )
        if "source" in declared:
            raise MappingError(
                f"{cls.__qualname__}.__dual_write__ sets 'source'; the "
                "class that declares it is the source, remove the key"
            )
        found.append(Mapping.model_validate({**declared, "source": cls}))
    if not found:
        where = "any mapped class" if base is None else repr(base)
        raise MappingError(
            f"no mappings given and no __dual_write__ declared on {where}; "
            "pass mappings= or declare __dual_write__ on the V1 classes"
        )
    return found


def _mapped_classes(
    base: type[DeclarativeBase] | Registry | None,
) -> list[type]:
    registries: Iterable[Registry]
    if base is None:
        from sqlalchemy.orm import mapperlib

        registries = mapperlib._all_registries()
    elif isinstance(base, Registry):
        registries = [base]
    else:
        registry = getattr(base, "registry", None)
        if not isinstance(registry, Registry):
            raise MappingError(
                f"base {base!r} has no SQLAlchemy registry; pass a "
                "DeclarativeBase subclass or a registry"
            )
        registries = [registry]
    classes = [
        mapper.class_ for registry in registries for mapper in registry.mappers
    ]
    return sorted(classes, key=lambda cls: (cls.__module__, cls.__qualname__))
