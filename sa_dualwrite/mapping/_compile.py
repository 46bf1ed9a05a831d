"""Validation of mappings against both mappers, and their compiled form.

Everything that can be checked without a database is checked here, once, at
install time: attribute names, required target columns, value types, refs
and import strings. The result, :class:`CompiledMapping`, turns a source row
image (a dict of source attribute values) into target column values.
"""

from __future__ import annotations

import datetime as dt
import enum
import importlib
import inspect
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BindParameter,
    Column,
    ColumnElement,
    Select,
    Table,
    bindparam,
    select,
    tuple_,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import NoInspectionAvailable
from sqlalchemy.orm import (
    ColumnProperty,
    Mapper,
    RelationshipProperty,
    SynonymProperty,
)

from sa_dualwrite._codec import encode_key, python_type
from sa_dualwrite._errors import MappingError, SyncError
from sa_dualwrite._store import MAPPING_NAME_LENGTH
from sa_dualwrite.mapping._spec import (
    Compute,
    Const,
    Copy,
    Mapping,
    Ref,
    Values,
)

__all__ = ["CompiledField", "CompiledMapping", "RefResolver", "compile_all"]

RefResolver = Callable[[str, Any], Any]
"""Callable ``(mapping name, source key value) -> target key value``."""

_FAMILIES: dict[type, str] = {
    bool: "number",
    int: "number",
    float: "number",
    Decimal: "number",
    str: "text",
    uuid.UUID: "text",
    bytes: "bytes",
    dt.datetime: "datetime",
    dt.date: "date",
    dt.time: "time",
    dt.timedelta: "interval",
    dict: "json",
    list: "json",
}


@dataclass(frozen=True, slots=True)
class CompiledField:
    """One target column and how its value is obtained from the source."""

    target_attr: str
    column_key: str
    spec: Copy | Values | Compute | Ref
    sources: tuple[str, ...]
    function: Callable[..., Any] | None = None
    table: dict[Any, Any] | None = None
    ref_mapping: str | None = None


@dataclass(eq=False)
class CompiledMapping:
    """A mapping checked against its mappers, ready to convert rows."""

    name: str
    declaration: Mapping
    source_class: type
    source_mapper: Mapper[Any]
    target_class: type
    target_mapper: Mapper[Any]
    target_table: Table
    source_pk_attrs: tuple[str, ...]
    source_pk_types: tuple[type | None, ...]
    source_attrs: tuple[str, ...]
    target_pk_columns: tuple[Column[Any], ...]
    target_pk_types: tuple[type | None, ...]
    fields: tuple[CompiledField, ...]
    fixed_values: dict[str, Any]
    on_delete: str | dict[str, Any]
    target_types: dict[str, type | None] = field(default_factory=dict)
    image_select: Select[Any] = field(init=False)
    null_when_unset: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        self.image_select = _image_select(self)
        self.null_when_unset = _null_when_unset(self)

    @property
    def source_table_name(self) -> str:
        """Name of the source table, for messages."""
        return _table_name(self.source_mapper)

    def source_key(self, obj: Any) -> tuple[Any, ...]:
        """Return the primary key of a source object as a tuple."""
        return tuple(self.source_mapper.primary_key_from_instance(obj))

    def target_key(self, row: dict[str, Any]) -> tuple[Any, ...]:
        """Return the primary key of a target row given by column key."""
        return tuple(row[column.key] for column in self.target_pk_columns)

    def target_values(
        self,
        image: dict[str, Any],
        resolve_ref: RefResolver,
        *,
        operation: str,
        v1_pk: str,
    ) -> dict[str, Any]:
        """Return the target column values for one source row image.

        Raises :class:`SyncError` when a value is not in a value map, a
        compute function raises, or a ref has no cross-reference.
        """
        values = dict(self.fixed_values)
        for item in self.fields:
            try:
                values[item.column_key] = _field_value(
                    item, image, resolve_ref
                )
            except SyncError:
                raise
            except Exception as exc:
                raise SyncError(
                    f"field {item.target_attr!r}: {_describe(item, exc)}",
                    mapping=self.name,
                    operation=operation,
                    v1_pk=v1_pk,
                ) from exc
        return values


def _field_value(
    item: CompiledField, image: dict[str, Any], resolve_ref: RefResolver
) -> Any:
    spec = item.spec
    if isinstance(spec, Copy):
        return image[item.sources[0]]
    if isinstance(spec, Values):
        assert item.table is not None
        value = image[item.sources[0]]
        if value is None and None not in item.table:
            return None
        try:
            return item.table[value]
        except (KeyError, TypeError):
            raise _UnmappedValue(value, item.table) from None
    if isinstance(spec, Compute):
        assert item.function is not None
        return item.function(*(image[name] for name in item.sources))
    assert item.ref_mapping is not None
    value = image[item.sources[0]]
    if value is None:
        return None
    return resolve_ref(item.ref_mapping, value)


class _UnmappedValue(Exception):
    def __init__(self, value: Any, table: dict[Any, Any]) -> None:
        known = ", ".join(repr(key) for key in table)
        super().__init__(
            f"value {value!r} is not in the value map (known: {known}); "
            "add it to the mapping, then replay the failed change"
        )


def _describe(item: CompiledField, exc: Exception) -> str:
    if isinstance(exc, _UnmappedValue):
        return f"source {item.sources[0]!r}: {exc}"
    name = getattr(item.function, "__qualname__", repr(item.function))
    return f"compute function {name} raised {type(exc).__name__}: {exc}"


def _null_when_unset(mapping: CompiledMapping) -> frozenset[str]:
    """Return the source attributes that are NULL when an insert omits them.

    These are plain table columns without any default, so the database
    stores NULL for them; a column with a default, an identity or a
    computed value may hold something the ORM did not see.
    """
    names = []
    for attr in mapping.source_attrs:
        prop = mapping.source_mapper.attrs[attr]
        if not isinstance(prop, ColumnProperty) or len(prop.columns) != 1:
            continue
        column = prop.columns[0]
        if (
            isinstance(column, Column)
            and column.default is None
            and column.server_default is None
            and column.computed is None
            and column.identity is None
            and not column.primary_key
        ):
            names.append(attr)
    return frozenset(names)


def _image_select(mapping: CompiledMapping) -> Select[Any]:
    """Build the SELECT that reads source row images by primary key."""
    mapper = mapping.source_mapper
    pk_columns = list(mapper.primary_key)
    columns: list[ColumnElement[Any]] = []
    for index, column in enumerate(pk_columns):
        columns.append(column.label(f"_pk{index}"))
    for attr in mapping.source_attrs:
        prop = mapper.attrs[attr]
        assert isinstance(prop, ColumnProperty)
        columns.append(_expression(prop).label(attr))
    keys: BindParameter[Any] = bindparam("keys", expanding=True)
    if len(pk_columns) == 1:
        criterion = pk_columns[0].in_(keys)
    else:
        criterion = tuple_(*pk_columns).in_(keys)
    return select(*columns).select_from(mapper.selectable).where(criterion)


def _table_name(mapper: Mapper[Any]) -> str:
    return str(getattr(mapper.local_table, "name", mapper.class_.__name__))


def _expression(prop: ColumnProperty[Any]) -> ColumnElement[Any]:
    """Return the SQL expression of a column property."""
    expression = prop.columns[0]
    assert isinstance(expression, ColumnElement)
    return expression


def compile_all(declarations: Sequence[Mapping]) -> dict[str, CompiledMapping]:
    """Check every mapping and return them compiled, by name.

    Raises :class:`MappingError` naming the mapping, the field and the fix
    for the first problem found.
    """
    compiled: dict[str, CompiledMapping] = {}
    for declaration in declarations:
        mapping = _compile_one(declaration)
        if mapping.name in compiled:
            raise MappingError(
                "two mappings have this name; give one of them another "
                "name= (names default to the source table name)",
                mapping=mapping.name,
            )
        compiled[mapping.name] = mapping
    for mapping in compiled.values():
        _check_refs(mapping, compiled)
    return compiled


def _compile_one(declaration: Mapping) -> CompiledMapping:
    label = declaration.name or _label(declaration.source)
    source = _resolve_class(declaration.source, "source", label)
    target = _resolve_class(declaration.target, "target", label)
    source_mapper = _mapper_of(source, "source", label)
    target_mapper = _mapper_of(target, "target", label)
    name = declaration.name or _table_name(source_mapper)
    if len(name) > MAPPING_NAME_LENGTH:
        raise MappingError(
            f"the name has {len(name)} characters, more than the "
            f"{MAPPING_NAME_LENGTH} the audit table stores; give a shorter "
            "name=",
            mapping=name[:40] + "...",
        )
    if source_mapper is target_mapper:
        raise MappingError(
            "source and target are the same class; the target must be the "
            "V2 class",
            mapping=name,
        )
    target_table = _target_table(target_mapper, name)

    fields: list[CompiledField] = []
    for target_attr, spec in declaration.fields.items():
        column = _target_column(target_mapper, target_table, target_attr, name)
        if isinstance(spec, Const):
            continue
        fields.append(
            _compile_field(
                name, target_attr, column, spec, source_mapper, target_mapper
            )
        )
    fixed_values = _fixed_values(declaration, target_mapper, target_table)
    _check_required_columns(
        name, target_table, {item.column_key for item in fields}, fixed_values
    )

    source_attrs: list[str] = []
    for item in fields:
        for attr in item.sources:
            if attr not in source_attrs:
                source_attrs.append(attr)
    pk_columns = list(source_mapper.primary_key)
    return CompiledMapping(
        name=name,
        declaration=declaration,
        source_class=source,
        source_mapper=source_mapper,
        target_class=target,
        target_mapper=target_mapper,
        target_table=target_table,
        source_pk_attrs=tuple(
            source_mapper.get_property_by_column(column).key
            for column in pk_columns
        ),
        source_pk_types=tuple(
            python_type(column.type) for column in pk_columns
        ),
        source_attrs=tuple(source_attrs),
        target_pk_columns=tuple(target_table.primary_key.columns),
        target_pk_types=tuple(
            python_type(column.type)
            for column in target_table.primary_key.columns
        ),
        fields=tuple(fields),
        fixed_values=fixed_values,
        on_delete=_compile_on_delete(
            declaration, target_mapper, target_table, name
        ),
        target_types={
            column.key: python_type(column.type)
            for column in target_table.columns
        },
    )


def _label(cls_or_path: type | str) -> str:
    if isinstance(cls_or_path, str):
        return cls_or_path
    return cls_or_path.__name__


def _resolve_class(value: type | str, role: str, mapping: str) -> type:
    if isinstance(value, type):
        return value
    resolved = resolve_import(value, role, mapping)
    if not isinstance(resolved, type):
        raise MappingError(
            f"{role} {value!r} is not a class; point it at the mapped class",
            mapping=mapping,
            field=role,
        )
    return resolved


def resolve_import(path: str, field_name: str, mapping: str) -> Any:
    """Import ``"pkg.module:name"`` and return the object it names."""
    module_name, sep, attr_path = path.partition(":")
    if not sep or not module_name or not attr_path:
        raise MappingError(
            f"invalid import string {path!r}; write it as "
            "'package.module:name'",
            mapping=mapping,
            field=field_name,
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise MappingError(
            f"cannot import module {module_name!r} of {path!r}: {exc}; "
            "check the module path and that it is importable",
            mapping=mapping,
            field=field_name,
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise MappingError(
                f"module {module_name!r} has no attribute {attr_path!r} "
                f"(from {path!r}); check the name after the colon",
                mapping=mapping,
                field=field_name,
            ) from exc
    return obj


def _mapper_of(cls: type, role: str, mapping: str) -> Mapper[Any]:
    mapper: Any
    try:
        mapper = sa_inspect(cls)
    except NoInspectionAvailable:
        mapper = None
    if not isinstance(mapper, Mapper):
        raise MappingError(
            f"{role} {cls.__qualname__} is not a mapped class; use a "
            "class mapped with SQLAlchemy's declarative or imperative "
            "mapping",
            mapping=mapping,
            field=role,
        )
    return mapper


def _target_table(mapper: Mapper[Any], mapping: str) -> Table:
    table = mapper.local_table
    if not isinstance(table, Table):
        raise MappingError(
            f"target {mapper.class_.__qualname__} is not mapped to a table; "
            "map the target class to a single table",
            mapping=mapping,
            field="target",
        )
    inherits = mapper.inherits
    if inherits is not None and inherits.local_table is not table:
        # TODO: targets with joined-table inheritance need one INSERT per
        # table in the hierarchy; only single-table targets are written.
        raise MappingError(
            f"target {mapper.class_.__qualname__} uses joined-table "
            "inheritance, which is not supported as a target; map to the "
            "base class or to a single-table class",
            mapping=mapping,
            field="target",
        )
    return table


def _target_column(
    mapper: Mapper[Any], table: Table, attr: str, mapping: str
) -> Column[Any]:
    prop = _column_property(mapper, attr, "target", mapping, attr)
    columns = [column for column in prop.columns if column.table is table]
    if len(columns) != 1 or not isinstance(columns[0], Column):
        raise MappingError(
            f"target attribute {attr!r} is not a column of table "
            f"{table.name!r}; map a plain column attribute",
            mapping=mapping,
            field=attr,
        )
    column = columns[0]
    if column.computed is not None:
        raise MappingError(
            f"target column {table.name}.{column.name} is computed by the "
            "database and cannot be written; remove it from the mapping",
            mapping=mapping,
            field=attr,
        )
    return column


def _column_property(
    mapper: Mapper[Any], attr: str, role: str, mapping: str, field_name: str
) -> ColumnProperty[Any]:
    cls_name = mapper.class_.__qualname__
    prop = mapper.attrs.get(attr)
    if isinstance(prop, SynonymProperty):
        prop = mapper.attrs.get(prop.name)
    if prop is None:
        known = ", ".join(sorted(mapper.column_attrs.keys()))
        raise MappingError(
            f"{role} class {cls_name} has no attribute {attr!r}; known "
            f"column attributes: {known}",
            mapping=mapping,
            field=field_name,
        )
    if not isinstance(prop, ColumnProperty):
        kind = (
            "relationship"
            if isinstance(prop, RelationshipProperty)
            else type(prop).__name__
        )
        raise MappingError(
            f"{role} attribute {cls_name}.{attr} is a {kind}, not a column; "
            "map a column attribute (for a relationship, its foreign key "
            "column)",
            mapping=mapping,
            field=field_name,
        )
    return prop


def _compile_field(
    mapping: str,
    target_attr: str,
    column: Column[Any],
    spec: Copy | Values | Compute | Ref,
    source_mapper: Mapper[Any],
    target_mapper: Mapper[Any],
) -> CompiledField:
    target_type = python_type(column.type)
    if isinstance(spec, Copy):
        prop = _column_property(
            source_mapper, spec.source, "source", mapping, target_attr
        )
        _check_copy_types(mapping, target_attr, prop, column, target_type)
        return CompiledField(target_attr, column.key, spec, (prop.key,))
    if isinstance(spec, Values):
        prop = _column_property(
            source_mapper, spec.source, "source", mapping, target_attr
        )
        table = _coerce_value_keys(mapping, target_attr, prop, spec.table)
        for value in table.values():
            _check_value_type(mapping, target_attr, value, column, target_type)
        return CompiledField(
            target_attr, column.key, spec, (prop.key,), table=table
        )
    if isinstance(spec, Compute):
        sources = tuple(
            _column_property(
                source_mapper, attr, "source", mapping, target_attr
            ).key
            for attr in spec.sources
        )
        function = _resolve_function(mapping, target_attr, spec, len(sources))
        return CompiledField(
            target_attr, column.key, spec, sources, function=function
        )
    prop = _column_property(
        source_mapper, spec.source, "source", mapping, target_attr
    )
    return CompiledField(
        target_attr, column.key, spec, (prop.key,), ref_mapping=spec.mapping
    )


def _family(type_: type | None) -> str | None:
    if type_ is None:
        return None
    if issubclass(type_, enum.Enum):
        return "text" if issubclass(type_, str) else None
    for base in type_.__mro__:
        if base in _FAMILIES:
            return _FAMILIES[base]
    return None


def _check_copy_types(
    mapping: str,
    target_attr: str,
    prop: ColumnProperty[Any],
    column: Column[Any],
    target_type: type | None,
) -> None:
    source_type = python_type(_expression(prop).type)
    source_family = _family(source_type)
    target_family = _family(target_type)
    if source_family is None or target_family is None:
        return
    if source_family != target_family:
        assert source_type is not None
        assert target_type is not None
        raise MappingError(
            f"cannot copy source {prop.key!r} ({source_type.__name__}) into "
            f"target column {column.table.name}.{column.name} "
            f"({target_type.__name__}); convert it with compute() or "
            "values()",
            mapping=mapping,
            field=target_attr,
        )


def _check_value_type(
    mapping: str,
    target_attr: str,
    value: Any,
    column: Column[Any],
    target_type: type | None,
) -> None:
    if value is None:
        if not column.nullable:
            raise MappingError(
                f"the value map writes None into NOT NULL column "
                f"{column.table.name}.{column.name}; map it to a value",
                mapping=mapping,
                field=target_attr,
            )
        return
    value_family = _family(type(value))
    target_family = _family(target_type)
    if value_family is None or target_family is None:
        return
    if value_family != target_family:
        assert target_type is not None
        raise MappingError(
            f"value {value!r} ({type(value).__name__}) does not fit target "
            f"column {column.table.name}.{column.name} "
            f"({target_type.__name__}); write a value of that type",
            mapping=mapping,
            field=target_attr,
        )


def _coerce_value_keys(
    mapping: str,
    target_attr: str,
    prop: ColumnProperty[Any],
    table: dict[Any, Any],
) -> dict[Any, Any]:
    """Convert text keys (as TOML and JSON give them) to the source type."""
    source_type = python_type(_expression(prop).type)
    if source_type is bool:
        return {
            _bool_key(mapping, target_attr, prop, key): value
            for key, value in table.items()
        }
    if source_type not in (int, float, Decimal):
        return dict(table)
    assert source_type is not None
    coerced: dict[Any, Any] = {}
    for key, value in table.items():
        if isinstance(key, str):
            try:
                key = source_type(key)
            except (ValueError, ArithmeticError) as exc:
                raise MappingError(
                    f"value map key {key!r} is not a valid "
                    f"{source_type.__name__} like source {prop.key!r}; "
                    "fix the key",
                    mapping=mapping,
                    field=target_attr,
                ) from exc
        coerced[key] = value
    return coerced


def _bool_key(
    mapping: str, target_attr: str, prop: ColumnProperty[Any], key: Any
) -> Any:
    """Return a value map key for a boolean source: text becomes a bool."""
    if not isinstance(key, str):
        return key
    lowered = key.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise MappingError(
        f"value map key {key!r} is not a boolean like source {prop.key!r}; "
        "use true or false",
        mapping=mapping,
        field=target_attr,
    )


def _resolve_function(
    mapping: str, target_attr: str, spec: Compute, arity: int
) -> Callable[..., Any]:
    function = spec.function
    if isinstance(function, str):
        function = resolve_import(function, target_attr, mapping)
    if not callable(function):
        raise MappingError(
            f"compute {function!r} is not callable; give a function or an "
            "import string 'package.module:function'",
            mapping=mapping,
            field=target_attr,
        )
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return function
    try:
        signature.bind(*range(arity))
    except TypeError as exc:
        raise MappingError(
            f"compute function {getattr(function, '__qualname__', function)}"
            f" cannot be called with {arity} argument(s) (one per source in "
            f"'from'): {exc}; change its parameters or the 'from' list",
            mapping=mapping,
            field=target_attr,
        ) from exc
    return function


def _fixed_values(
    declaration: Mapping, target_mapper: Mapper[Any], target_table: Table
) -> dict[str, Any]:
    """Collect constants and the polymorphic identity of the target."""
    fixed: dict[str, Any] = {}
    label = declaration.name or _label(declaration.source)
    for target_attr, spec in declaration.fields.items():
        if isinstance(spec, Const):
            column = _target_column(
                target_mapper, target_table, target_attr, label
            )
            _check_value_type(
                label,
                target_attr,
                spec.value,
                column,
                python_type(column.type),
            )
            fixed[column.key] = spec.value
    discriminator = target_mapper.polymorphic_on
    identity = target_mapper.polymorphic_identity
    if (
        isinstance(discriminator, Column)
        and identity is not None
        and discriminator.table is target_table
    ):
        fixed.setdefault(discriminator.key, identity)
    return fixed


def _check_required_columns(
    mapping: str, table: Table, written: set[str], fixed: dict[str, Any]
) -> None:
    for column in table.columns:
        if column.key in written or column.key in fixed:
            continue
        if column.nullable or column.computed is not None:
            continue
        if column.default is not None or column.server_default is not None:
            continue
        if column.identity is not None:
            continue
        if column is table.autoincrement_column:
            continue
        raise MappingError(
            f"required target column {table.name}.{column.name} (NOT NULL, "
            "no default) is not filled; add a field for it, or give the "
            "column a default",
            mapping=mapping,
            field=column.key,
        )


def _compile_on_delete(
    declaration: Mapping,
    target_mapper: Mapper[Any],
    target_table: Table,
    mapping: str,
) -> str | dict[str, Any]:
    on_delete = declaration.on_delete
    if isinstance(on_delete, str):
        return on_delete
    assignments: dict[str, Any] = {}
    for target_attr, value in on_delete.items():
        try:
            column = _target_column(
                target_mapper, target_table, target_attr, mapping
            )
        except MappingError as exc:
            raise MappingError(
                f"on_delete assigns {target_attr!r}: {exc.detail}",
                mapping=mapping,
                field="on_delete",
            ) from exc
        _check_value_type(
            mapping, "on_delete", value, column, python_type(column.type)
        )
        assignments[column.key] = value
    return assignments


def _check_refs(
    mapping: CompiledMapping, compiled: dict[str, CompiledMapping]
) -> None:
    for item in mapping.fields:
        if item.ref_mapping is None:
            continue
        referenced = compiled.get(item.ref_mapping)
        if referenced is None:
            known = ", ".join(sorted(compiled))
            raise MappingError(
                f"ref names unknown mapping {item.ref_mapping!r}; known "
                f"mappings: {known}",
                mapping=mapping.name,
                field=item.target_attr,
            )
        if len(referenced.target_pk_columns) != 1:
            raise MappingError(
                f"ref to mapping {referenced.name!r}, whose target has a "
                "composite primary key; refs need a single-column key",
                mapping=mapping.name,
                field=item.target_attr,
            )
        if len(referenced.source_pk_attrs) != 1:
            raise MappingError(
                f"ref to mapping {referenced.name!r}, whose source has a "
                "composite primary key; refs need a single-column key",
                mapping=mapping.name,
                field=item.target_attr,
            )


def encode_ref_key(mapping: CompiledMapping, value: Any) -> str:
    """Return the cross-reference text of a source key value of ``mapping``."""
    return encode_key((value,))


def iter_source_refs(
    mapping: CompiledMapping, image: dict[str, Any]
) -> Iterable[tuple[str, Any]]:
    """Yield ``(mapping name, source key)`` for each ref in a row image."""
    for item in mapping.fields:
        if item.ref_mapping is not None:
            value = image.get(item.sources[0])
            if value is not None:
                yield item.ref_mapping, value
