"""Mistakes in mappings fail at install time with a MappingError."""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy import Computed, ForeignKey, Integer, Text
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    mapped_column,
    relationship,
)

import sa_dualwrite as dw
from sa_dualwrite.mapping import compile_all, normalize
from tests import models


def _compile(*declarations: Any) -> dict[str, Any]:
    return compile_all(normalize(list(declarations)))


def _alert(**fields: Any) -> dw.Mapping:
    return models.alert_mapping(fields=fields)


class Base(DeclarativeBase):
    pass


class Parent(Base):
    __tablename__ = "validation_parent"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    children: Mapped[list[Child]] = relationship(back_populates="parent")


class Child(Base):
    __tablename__ = "validation_child"

    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("validation_parent.id"))
    parent: Mapped[Parent] = relationship(back_populates="children")


class Derived(Base):
    __tablename__ = "validation_derived"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None] = mapped_column(Text)
    doubled: Mapped[int | None] = mapped_column(Integer, Computed("id * 2"))


class Joined(Derived):
    __tablename__ = "validation_joined"

    id: Mapped[int] = mapped_column(
        ForeignKey("validation_derived.id"), primary_key=True
    )
    detail: Mapped[str | None] = mapped_column(Text)


def test_valid_mappings_compile() -> None:
    """The test mappings compile, named after the source tables."""
    compiled = _compile(*models.mappings())

    assert sorted(compiled) == ["acoes", "alertas"]
    assert compiled["alertas"].source_attrs[0] == "contrato_id"


def test_name_defaults_to_source_table() -> None:
    """A mapping without name is named after its source table."""
    mapping = dw.Mapping(
        source=models.Alerta, target=models.Alert, fields={"title": "titulo"}
    )

    assert mapping.name == "alertas"


def test_unknown_source_attribute() -> None:
    """A source attribute the V1 class lacks names mapping and field."""
    with pytest.raises(dw.MappingError) as caught:
        _compile(_alert(title="titolo"))

    message = str(caught.value)
    assert message.startswith("mapping 'alertas', field 'title': ")
    assert "has no attribute 'titolo'" in message
    assert "titulo" in message
    assert caught.value.mapping == "alertas"
    assert caught.value.field == "title"


def test_unknown_target_attribute() -> None:
    """A target attribute the V2 class lacks fails install."""
    with pytest.raises(dw.MappingError, match="target class Alert has no "):
        _compile(_alert(headline="titulo"))


def test_required_target_column_unfilled() -> None:
    """A NOT NULL target column without default must be filled."""
    fields = dict(models.alert_mapping().fields)
    del fields["owner_login"]
    mapping = dw.Mapping(
        name="alertas",
        source=models.Alerta,
        target=models.Alert,
        fields=fields,
    )

    with pytest.raises(dw.MappingError) as caught:
        _compile(mapping)

    assert "required target column alerts.owner_login" in str(caught.value)
    assert caught.value.field == "owner_login"


def test_columns_with_defaults_may_stay_unfilled() -> None:
    """Columns with a default, identity or NULL allowed need no field."""
    fields = dict(models.alert_mapping().fields)
    del fields["origin"]
    del fields["description"]
    mapping = dw.Mapping(
        name="alertas",
        source=models.Alerta,
        target=models.Alert,
        fields=fields,
    )

    assert "alertas" in _compile(mapping)


def test_ref_to_unknown_mapping() -> None:
    """A ref naming an unknown mapping lists the known ones."""
    mapping = models.event_mapping()
    with pytest.raises(dw.MappingError) as caught:
        _compile(mapping)

    assert "unknown mapping 'alertas'" in str(caught.value)
    assert caught.value.field == "alert_id"


def test_copy_type_mismatch() -> None:
    """Copying an int into a date column is rejected with the fix."""
    with pytest.raises(dw.MappingError, match=r"compute\(\) or values\(\)"):
        _compile(_alert(due_date="prazo"))


def test_value_map_type_mismatch() -> None:
    """A value map writing numbers into a text column fails."""
    with pytest.raises(dw.MappingError, match="does not fit target column"):
        _compile(_alert(state=dw.values("status", {"ativo": 1})))


def test_value_map_keys_coerced_for_numbers() -> None:
    """Text keys of a value map on an integer source become integers."""
    compiled = _compile(
        _alert(description=dw.values("prazo", {"1": "one day"}))
    )

    (field,) = [
        item
        for item in compiled["alertas"].fields
        if item.target_attr == "description"
    ]
    assert field.table == {1: "one day"}


def test_compute_wrong_arity() -> None:
    """A compute function that cannot take the sources fails."""
    spec = dw.compute(["criado_em", "prazo"], lambda only: only)

    with pytest.raises(dw.MappingError, match="cannot be called with 2"):
        _compile(_alert(due_date=spec))


def test_compute_import_string() -> None:
    """A compute import string resolves at install."""
    spec = {"from": ["criado_em", "prazo"], "compute": "tests.models:due_date"}

    compiled = _compile(_alert(due_date=spec))

    (field,) = [
        item
        for item in compiled["alertas"].fields
        if item.target_attr == "due_date"
    ]
    assert field.function is models.due_date


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("tests.models.due_date", "invalid import string"),
        ("tests.no_such_module:due_date", "cannot import module"),
        ("tests.models:no_such_function", "has no attribute"),
    ],
    ids=["no-colon", "bad-module", "bad-attribute"],
)
def test_compute_bad_import_string(path: str, message: str) -> None:
    """A compute import string that does not resolve fails install."""
    spec = {"from": ["criado_em", "prazo"], "compute": path}

    with pytest.raises(dw.MappingError, match=re.escape(message)):
        _compile(_alert(due_date=spec))


def test_source_class_import_string() -> None:
    """Classes may be given as import strings."""
    mapping = dw.Mapping(
        name="alertas",
        source="tests.models:Alerta",
        target="tests.models:Alert",
        fields=dict(models.alert_mapping().fields),
    )

    assert _compile(mapping)["alertas"].source_class is models.Alerta


@pytest.mark.parametrize(
    "spec",
    [{"frm": "titulo"}, {"from": "titulo", "map": {}}, 42],
    ids=["typo", "unknown-key", "number"],
)
def test_invalid_spec_form(spec: Any) -> None:
    """A field spec of no known form lists the valid forms."""
    with pytest.raises(dw.MappingError) as caught:
        _alert(title=spec)

    assert "use one of" in str(caught.value)
    assert caught.value.field == "title"


def test_unknown_mapping_key() -> None:
    """A misspelled Mapping key is rejected, not ignored."""
    with pytest.raises(dw.MappingError, match="unknown key 'on_delte'"):
        dw.Mapping.model_validate(
            {
                "source": models.Alerta,
                "target": models.Alert,
                "fields": {"title": "titulo"},
                "on_delte": "ignore",
            }
        )


def test_invalid_on_delete() -> None:
    """on_delete accepts delete, ignore or a dict of assignments."""
    with pytest.raises(dw.MappingError, match="invalid on_delete 'soft'"):
        models.alert_mapping(on_delete="soft")


def test_on_delete_unknown_target_attribute() -> None:
    """A soft delete assigning an unknown attribute fails install."""
    mapping = models.alert_mapping(on_delete={"status": "deleted"})

    with pytest.raises(dw.MappingError, match="on_delete assigns 'status'"):
        _compile(mapping)


def test_source_not_mapped() -> None:
    """A source that is not a mapped class fails install."""
    mapping = dw.Mapping(
        name="plain", source=dict, target=models.Alert, fields={"title": "x"}
    )

    with pytest.raises(dw.MappingError, match="is not a mapped class"):
        _compile(mapping)


def test_duplicate_names() -> None:
    """Two mappings with one name fail install."""
    with pytest.raises(dw.MappingError, match="two mappings have this name"):
        _compile(models.alert_mapping(), models.alert_mapping())


def test_relationship_as_source() -> None:
    """A relationship cannot be copied; its foreign key column can."""
    mapping = dw.Mapping(
        name="children",
        source=Child,
        target=models.Alert,
        fields={"title": "parent"},
    )

    with pytest.raises(
        dw.MappingError, match="is a relationship, not a column"
    ):
        _compile(mapping)


def test_computed_target_column() -> None:
    """A column computed by the database cannot be a target."""
    mapping = dw.Mapping(
        name="derived",
        source=Parent,
        target=Derived,
        fields={"name": "name", "doubled": "id"},
    )

    with pytest.raises(dw.MappingError, match="computed by the database"):
        _compile(mapping)


def test_joined_inheritance_target() -> None:
    """A joined-table inheritance target is rejected with the fix."""
    mapping = dw.Mapping(
        name="joined", source=Parent, target=Joined, fields={"name": "name"}
    )

    with pytest.raises(dw.MappingError, match="joined-table inheritance"):
        _compile(mapping)


def test_install_raises_mapping_error(pg_engine: Any) -> None:
    """install_dual_write raises the MappingError, before any write."""
    with pytest.raises(dw.MappingError, match="field 'title'"):
        dw.install_dual_write(
            pg_engine, [_alert(title="titolo")], log_file=None
        )


def test_on_delete_error_names_field_once() -> None:
    """The on_delete error carries one mapping and field prefix."""
    mapping = models.alert_mapping(on_delete={"stat": "deleted"})

    with pytest.raises(dw.MappingError) as caught:
        _compile(mapping)

    assert str(caught.value).count("mapping 'alertas'") == 1


def test_boolean_value_map_coerced() -> None:
    """A boolean source's text keys become True and False."""

    class BoolBase(DeclarativeBase):
        pass

    class Toggle(BoolBase):
        __tablename__ = "toggle"

        id: Mapped[int] = mapped_column(primary_key=True)
        active: Mapped[bool]

    class ToggleTarget(BoolBase):
        __tablename__ = "toggle_target"

        id: Mapped[int] = mapped_column(primary_key=True)
        state: Mapped[str] = mapped_column(Text)

    mapping = dw.Mapping(
        name="toggle",
        source=Toggle,
        target=ToggleTarget,
        fields={
            "id": "id",
            "state": dw.values("active", {"true": "on", "False": "off"}),
        },
    )

    (field,) = [
        item
        for item in _compile(mapping)["toggle"].fields
        if item.target_attr == "state"
    ]

    assert field.table == {True: "on", False: "off"}


def test_long_mapping_name() -> None:
    """A mapping name longer than the audit column is rejected."""
    mapping = dw.Mapping(
        name="x" * 201,
        source=models.Alerta,
        target=models.Alert,
        fields=dict(models.alert_mapping().fields),
    )

    with pytest.raises(dw.MappingError, match="shorter"):
        _compile(mapping)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: dw.copy(""), "copy(): source"),
        (lambda: dw.values("status", {}), "values(): table"),
        (lambda: dw.values("status", ["ativo"]), "is not a dict"),
        (lambda: dw.compute([], str), "compute(): sources"),
        (lambda: dw.ref("alerta_id", ""), "ref(): mapping"),
    ],
    ids=["copy", "values-empty", "values-list", "compute", "ref"],
)
def test_spec_helper_arguments(build: Any, message: str) -> None:
    """The spec helpers raise MappingError for invalid arguments."""
    with pytest.raises(dw.MappingError, match=re.escape(message)):
        build()
