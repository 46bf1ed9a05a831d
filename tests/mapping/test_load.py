"""Mappings from dicts, TOML files and __dual_write__ declarations."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sa_dualwrite as dw
from sa_dualwrite.mapping import compile_all, declared_mappings, normalize
from tests import models

TOML = """
[[mappings]]
name = "alertas"
source = "tests.models:Alerta"
target = "tests.models:Alert"
on_delete = { state = "cancelled" }

[mappings.fields]
contract_ref = "contrato_id"
title = "titulo"
owner_login = "responsavel"
created_at = "criado_em"
state = { from = "status", values = { ativo = "active", resolvido = "resolved", cancelado = "cancelled" } }
due_date = { from = ["criado_em", "prazo"], compute = "tests.models:due_date" }
origin = { const = "v1" }

[[mappings]]
name = "acoes"
source = "tests.models:Acao"
target = "tests.models:AlertEvent"

[mappings.fields]
alert_id = { ref = "alerta_id", mapping = "alertas" }
kind = { from = "tipo", values = { escalar = "escalated", encerrar = "closed" } }
actor_login = "usuario"
occurred_at = "registrado_em"
"""


def test_load_toml(tmp_path: Path) -> None:
    """A TOML file with [[mappings]] loads and compiles."""
    path = tmp_path / "mappings.toml"
    path.write_text(TOML, encoding="utf-8")

    loaded = dw.load_mappings(path)
    compiled = compile_all(loaded)

    assert [mapping.name for mapping in loaded] == ["alertas", "acoes"]
    assert compiled["alertas"].on_delete == {"state": "cancelled"}
    assert compiled["acoes"].fields[0].ref_mapping == "alertas"


def test_load_toml_missing_file(tmp_path: Path) -> None:
    """A missing mapping file names the path."""
    with pytest.raises(dw.MappingError, match="not found"):
        dw.load_mappings(tmp_path / "absent.toml")


def test_load_toml_syntax_error(tmp_path: Path) -> None:
    """Invalid TOML is reported with the parser's message."""
    path = tmp_path / "broken.toml"
    path.write_text("[[mappings]\nname = 1", encoding="utf-8")

    with pytest.raises(dw.MappingError, match="not valid TOML"):
        dw.load_mappings(path)


def test_load_toml_unknown_top_level(tmp_path: Path) -> None:
    """A top-level key other than mappings is rejected."""
    path = tmp_path / "typo.toml"
    path.write_text('[[mapping]]\nsource = "x"\n', encoding="utf-8")

    with pytest.raises(dw.MappingError, match="unknown top-level keys"):
        dw.load_mappings(path)


def test_toml_path_given_to_install(tmp_path: Path, pg_engine: object) -> None:
    """install_dual_write accepts the path of a TOML file."""
    path = tmp_path / "mappings.toml"
    path.write_text(TOML, encoding="utf-8")

    handle = dw.install_dual_write(pg_engine, str(path), log_file=None)  # type: ignore[arg-type]
    handle.uninstall()

    assert sorted(handle.mappings) == ["acoes", "alertas"]


def test_dict_list() -> None:
    """Plain dicts are accepted in place of Mapping models."""
    declared = [
        {
            "name": "alertas",
            "source": models.Alerta,
            "target": models.Alert,
            "fields": dict(models.alert_mapping().fields),
        }
    ]

    (mapping,) = normalize(declared)

    assert isinstance(mapping, dw.Mapping)
    assert mapping.name == "alertas"


class DeclaredBase(DeclarativeBase):
    pass


class DeclaredTarget(DeclaredBase):
    __tablename__ = "declared_target"

    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(Text)


class DeclaredSource(DeclaredBase):
    __tablename__ = "declared_source"
    __dual_write__ = {"target": DeclaredTarget, "fields": {"label": "name"}}

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(Text)


class EmptyBase(DeclarativeBase):
    pass


def test_declared_on_class() -> None:
    """__dual_write__ on a mapped class is found through its base."""
    (mapping,) = declared_mappings(DeclaredBase)

    assert mapping.source is DeclaredSource
    assert mapping.name == "declared_source"


def test_declared_source_key_rejected() -> None:
    """__dual_write__ must not name its own source."""

    class BadBase(DeclarativeBase):
        pass

    class BadSource(BadBase):
        __tablename__ = "bad_source"
        __dual_write__ = {
            "source": "x:y",
            "target": DeclaredTarget,
            "fields": {"label": "name"},
        }

        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(Text)

    with pytest.raises(dw.MappingError, match="sets 'source'"):
        declared_mappings(BadBase)


def test_no_declarations() -> None:
    """Without mappings and declarations install explains both ways."""
    with pytest.raises(dw.MappingError, match="pass mappings="):
        declared_mappings(EmptyBase)
