"""Declarations: the ``Mapping`` model and its field specs.

A mapping is declared once and checked against the SQLAlchemy mappers at
install time by :mod:`sa_dualwrite.mapping._compile`; nothing here touches a
database or a session.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping as MappingABC
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import NoInspectionAvailable

from sa_dualwrite._errors import MappingError

__all__ = [
    "Compute",
    "Const",
    "Copy",
    "FieldSpec",
    "Mapping",
    "Ref",
    "Values",
    "compute",
    "const",
    "copy",
    "ref",
    "values",
]

_SPEC_FORMS = (
    '"v1_attr" (copy), {"from": "v1_attr", "values": {...}}, '
    '{"from": ["a", "b"], "compute": f}, '
    '{"ref": "v1_fk_attr", "mapping": "name"} or {"const": value}'
)


class _Spec(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        populate_by_name=True,
        arbitrary_types_allowed=True,
    )


class Copy(_Spec):
    """Field spec that copies one source attribute unchanged."""

    source: str = Field(alias="from", min_length=1)


class Values(_Spec):
    """Field spec that maps the values of one source attribute.

    A source value missing from ``table`` fails that change with a clear
    error rather than writing a guess.
    """

    source: str = Field(alias="from", min_length=1)
    table: dict[Any, Any] = Field(alias="values", min_length=1)


class Compute(_Spec):
    """Field spec that calls ``function(*source values)``.

    ``function`` is a callable or an import string ``"pkg.module:func"``,
    resolved at install time.
    """

    sources: tuple[str, ...] = Field(alias="from", min_length=1)
    function: Callable[..., Any] | str = Field(alias="compute")

    @field_validator("sources", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if isinstance(value, str):
            return (value,)
        return value


class Ref(_Spec):
    """Field spec that translates a source foreign key to a target key.

    The value of ``source`` is looked up in the cross-reference of the
    mapping named ``mapping``.
    """

    source: str = Field(alias="ref", min_length=1)
    mapping: str = Field(min_length=1)


class Const(_Spec):
    """Field spec that writes the same value for every row."""

    value: Any = Field(alias="const")


FieldSpec = Copy | Values | Compute | Ref | Const


SpecT = TypeVar("SpecT", bound=_Spec)


def _build(spec: type[SpecT], helper: str, **arguments: Any) -> SpecT:
    """Build a spec model, raising MappingError for invalid arguments."""
    try:
        return spec(**arguments)
    except ValidationError as exc:
        raise MappingError(
            f"invalid arguments to {helper}(): "
            f"{_describe_validation_error(exc)}"
        ) from exc


def copy(attr: str) -> Copy:
    """Return a spec that copies the source attribute ``attr``."""
    return _build(Copy, "copy", source=attr)


def values(attr: str, table: MappingABC[Any, Any]) -> Values:
    """Return a spec that maps the values of ``attr`` through ``table``."""
    if not isinstance(table, MappingABC):
        raise MappingError(
            f"invalid arguments to values(): the table {table!r} is not a "
            "dict; give a dict of source values to target values"
        )
    return _build(Values, "values", source=attr, table=dict(table))


def compute(
    attrs: str | list[str] | tuple[str, ...],
    f: Callable[..., Any] | str,
) -> Compute:
    """Return a spec that calls ``f`` with the values of ``attrs``."""
    sources = (attrs,) if isinstance(attrs, str) else tuple(attrs)
    return _build(Compute, "compute", sources=sources, function=f)


def ref(attr: str, mapping: str) -> Ref:
    """Return a spec that translates ``attr`` through mapping ``mapping``."""
    return _build(Ref, "ref", source=attr, mapping=mapping)


def const(value: Any) -> Const:
    """Return a spec that writes ``value`` on every row."""
    return _build(Const, "const", value=value)


def _parse_spec(value: Any) -> FieldSpec:
    """Turn one dict or string form into its spec model."""
    if isinstance(value, (Copy, Values, Compute, Ref, Const)):
        return value
    if isinstance(value, str):
        return Copy(source=value)
    if not isinstance(value, MappingABC):
        raise ValueError(
            f"invalid field spec {value!r}; use one of {_SPEC_FORMS}"
        )
    keys = set(value)
    if "const" in keys:
        return Const.model_validate(value)
    if "ref" in keys:
        return Ref.model_validate(value)
    if "compute" in keys:
        return Compute.model_validate(value)
    if "values" in keys:
        return Values.model_validate(value)
    if keys == {"from"}:
        return Copy.model_validate(value)
    raise ValueError(
        f"invalid field spec {dict(value)!r}; use one of {_SPEC_FORMS}"
    )


def _class_table_name(cls: Any) -> str | None:
    try:
        mapper = sa_inspect(cls)
    except NoInspectionAvailable:
        return None
    table = getattr(mapper, "local_table", None)
    name = getattr(table, "name", None)
    return name if isinstance(name, str) else None


class Mapping(BaseModel):
    """Declaration of how one source (V1) class is written to the target.

    ``fields`` maps each target (V2) attribute to a spec: a source attribute
    name to copy, a dict form (see the module docs) or a helper such as
    :func:`values`. ``on_delete`` is ``"delete"``, ``"ignore"`` or a dict of
    target assignments for a soft delete. Invalid input raises
    :class:`~sa_dualwrite.MappingError`.
    """

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        arbitrary_types_allowed=True,
    )

    name: str | None = Field(default=None, min_length=1)
    source: type | str
    target: type | str
    fields: dict[str, FieldSpec] = Field(min_length=1)
    on_delete: Literal["delete", "ignore"] | dict[str, Any] = "delete"

    @field_validator("fields", mode="before")
    @classmethod
    def _parse_fields(cls, value: Any) -> Any:
        if not isinstance(value, MappingABC):
            return value
        parsed: dict[str, FieldSpec] = {}
        for target_attr, spec in value.items():
            try:
                parsed[target_attr] = _parse_spec(spec)
            except ValidationError as exc:
                raise MappingError(
                    _describe_validation_error(exc)
                    + f"; use one of {_SPEC_FORMS}",
                    field=str(target_attr),
                ) from exc
            except ValueError as exc:
                raise MappingError(str(exc), field=str(target_attr)) from exc
        return parsed

    @field_validator("on_delete", mode="before")
    @classmethod
    def _check_on_delete(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("delete", "ignore"):
            raise MappingError(
                f"invalid on_delete {value!r}; use 'delete', 'ignore' or a "
                'dict of target assignments such as {"state": "deleted"}',
                field="on_delete",
            )
        if isinstance(value, MappingABC) and not value:
            raise MappingError(
                "on_delete is an empty dict; give at least one target "
                "assignment, or use 'delete' or 'ignore'",
                field="on_delete",
            )
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _raise_mapping_error(cls, data: Any, handler: Any) -> Any:
        label = _label_of(data)
        try:
            model = handler(data)
        except ValidationError as exc:
            field = _first_field(exc)
            raise MappingError(
                _describe_validation_error(exc), mapping=label, field=field
            ) from exc
        except MappingError as exc:
            if exc.mapping is not None or label is None:
                raise
            raise MappingError(
                _strip_prefix(exc), mapping=label, field=exc.field
            ) from exc.__cause__
        return model

    @model_validator(mode="after")
    def _default_name(self) -> Mapping:
        if self.name is None and isinstance(self.source, type):
            object.__setattr__(self, "name", _class_table_name(self.source))
        return self


def _label_of(data: Any) -> str | None:
    """Return a name for error messages before the model exists."""
    if not isinstance(data, MappingABC):
        return None
    name = data.get("name")
    if isinstance(name, str):
        return name
    source = data.get("source")
    if isinstance(source, type):
        return _class_table_name(source) or source.__name__
    if isinstance(source, str):
        return source
    return None


def _first_field(exc: ValidationError) -> str | None:
    for error in exc.errors():
        if error["loc"]:
            return ".".join(str(part) for part in error["loc"])
    return None


def _describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = f"unknown key {loc!r}"
        elif error["type"] == "missing":
            message = f"missing key {loc!r}"
        elif loc:
            message = f"{loc}: {message}"
        parts.append(message)
    return "; ".join(parts)


def _strip_prefix(exc: MappingError) -> str:
    text = str(exc)
    if exc.field is not None:
        prefix = f"field {exc.field!r}: "
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text
