"""The three V1 writes of the contract-alert application.

Each entry point validates its input, writes V1 through the ORM and
returns the V1 id. The entry points never touch V2: the dual write
installed on the V1 engine syncs the committed rows, and
``dual_write.v2_id("alertas", v1_id)`` finds the V2 row afterwards.

Configure the V1 engine once, at application start::

    dual_write = sa_dualwrite.install_dual_write(v1_engine, MAPPINGS,
                                                 target=v2_engine)
    dual_write_service.configure(v1_engine)
    alerta_id = dual_write_service.criar_alerta_dual({...})

Without ``session=`` each call runs in its own session and commits. With
``session=`` the call only adds and flushes in the caller's session, and
the caller commits. Several calls then become one V1 transaction, synced
to V2 together, and the caller chooses the session key and the actor that
their audit rows carry.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from examples.contract_alerts.models_v1 import AcaoAdministrativa, Alerta

__all__ = [
    "AlertNotFound",
    "InvalidAlertData",
    "ServiceError",
    "ServiceNotConfigured",
    "atualizar_alerta_dual",
    "configure",
    "criar_alerta_dual",
    "sincronizar_acao_dual",
]

ACTOR_KEY = "dualwrite.actor"

_session_factory: sessionmaker[Session] | None = None


class ServiceError(Exception):
    """Root of the errors raised by this service."""


class InvalidAlertData(ServiceError, ValueError):
    """Raised when the data given to an entry point is invalid.

    Nothing was written. The message names each invalid key and the keys
    that are allowed.
    """


class AlertNotFound(ServiceError, LookupError):
    """Raised when a V1 alert id does not exist; nothing was written."""

    def __init__(self, alerta_id: int) -> None:
        super().__init__(
            f"alerta {alerta_id} not found in V1; check the id (it is the "
            "V1 id that criar_alerta_dual returned, not the V2 id)"
        )
        self.alerta_id = alerta_id


class ServiceNotConfigured(ServiceError, RuntimeError):
    """Raised when an entry point runs before :func:`configure`."""


class _AlertData(BaseModel):
    """A V1 alert as the application describes it."""

    model_config = ConfigDict(
        extra="forbid", strict=True, validate_assignment=True
    )

    contrato_id: str = Field(min_length=1)
    titulo: str = Field(min_length=1)
    descricao: str | None = None
    prazo: int | None = Field(default=None, ge=0)
    responsavel: str = Field(min_length=1)
    status: Literal["ativo", "resolvido", "cancelado"] = "ativo"
    # Historical alerts loaded from another system keep their own creation
    # time; without it the V1 database sets now().
    criado_em: AwareDatetime | None = None


class _ActionData(BaseModel):
    """An admin action on a V1 alert."""

    model_config = ConfigDict(extra="forbid", strict=True)

    alerta_id: int
    tipo: Literal["escalar", "reatribuir", "encerrar", "comentar"]
    usuario: str = Field(min_length=1)
    observacao: str | None = None
    registrado_em: AwareDatetime | None = None


UPDATABLE = tuple(
    name for name in _AlertData.model_fields if name != "criado_em"
)
"""Keys that ``atualizar_alerta_dual`` accepts in ``changes``."""

_Model = TypeVar("_Model", bound=BaseModel)


def configure(bind: Engine | sessionmaker[Session] | None) -> None:
    """Set the V1 engine, or session factory, that the entry points use.

    Call it once at application start, after installing the dual write on
    the same engine. None removes the configuration.
    """
    global _session_factory
    if bind is None or isinstance(bind, sessionmaker):
        _session_factory = bind
    else:
        _session_factory = sessionmaker(bind)


@contextmanager
def _session_scope(
    session: Session | None, actor: str | None = None
) -> Iterator[Session]:
    """Yield the caller's session, or a new one committed at the end."""
    if session is not None:
        yield session
        session.flush()
        return
    if _session_factory is None:
        raise ServiceNotConfigured(
            "the dual write service has no V1 engine; call "
            "dual_write_service.configure(v1_engine) at application start"
        )
    with _session_factory() as own, own.begin():
        if actor is not None:
            own.info.setdefault(ACTOR_KEY, actor)
        yield own


def _validate(model: type[_Model], data: Any, label: str) -> _Model:
    if not isinstance(data, Mapping):
        raise InvalidAlertData(
            f"{label} must be a dict, got {type(data).__name__}"
        )
    try:
        return model.model_validate(dict(data))
    except PydanticValidationError as exc:
        raise _invalid(exc, label, model.model_fields) from exc


def _invalid(
    exc: PydanticValidationError, label: str, allowed: Iterable[str]
) -> InvalidAlertData:
    problems = []
    for error in exc.errors(include_url=False):
        key = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown key {key!r}")
        elif error["type"] == "missing":
            problems.append(f"missing required key {key!r}")
        else:
            problems.append(
                f"key {key!r}: {error['msg']} (got {error['input']!r})"
            )
    return InvalidAlertData(
        f"invalid {label}: {'; '.join(problems)}. Allowed keys: "
        f"{', '.join(allowed)}"
    )


def _check_id(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidAlertData(
            f"{name} must be an integer V1 id, got {value!r}"
        )
    return value


def criar_alerta_dual(
    v1_alert_data: Mapping[str, Any], *, session: Session | None = None
) -> int:
    """Create a V1 alert and return its id.

    ``v1_alert_data`` needs ``contrato_id``, ``titulo`` and
    ``responsavel``, and may give ``descricao``, ``prazo`` (days, at least
    0), ``status`` (``ativo`` by default) and ``criado_em`` (an aware
    datetime, for historical alerts). Raises :class:`InvalidAlertData`
    for unknown keys, missing keys and invalid values.
    """
    data = _validate(_AlertData, v1_alert_data, "alert data")
    values = data.model_dump(exclude_unset=True)
    if values.get("criado_em") is None:
        values.pop("criado_em", None)
    with _session_scope(session) as scope:
        alerta = Alerta(**values)
        scope.add(alerta)
        scope.flush()
        return alerta.id


def atualizar_alerta_dual(
    v1_alert_id: int,
    changes: Mapping[str, Any],
    *,
    session: Session | None = None,
) -> tuple[str, ...]:
    """Update V1 alert ``v1_alert_id`` and return the keys that changed.

    ``changes`` gives new values for some of :data:`UPDATABLE`. Keys whose
    value is already current are not written, so an empty tuple means that
    nothing was written and nothing is synced. Raises
    :class:`InvalidAlertData` for unknown keys or invalid values and
    :class:`AlertNotFound` when the id does not exist.
    """
    alerta_id = _check_id(v1_alert_id, "v1_alert_id")
    if not isinstance(changes, Mapping) or not changes:
        raise InvalidAlertData(
            f"changes must be a non-empty dict with some of "
            f"{', '.join(UPDATABLE)}; got {changes!r}"
        )
    unknown = sorted(set(changes) - set(UPDATABLE))
    if unknown:
        raise InvalidAlertData(
            f"invalid changes: unknown or read-only keys {unknown}. "
            f"Allowed keys: {', '.join(UPDATABLE)}"
        )
    with _session_scope(session) as scope:
        alerta = scope.get(Alerta, alerta_id, with_for_update=True)
        if alerta is None:
            raise AlertNotFound(alerta_id)
        data = _validate_changes(alerta, changes)
        changed = []
        for name in changes:
            value = getattr(data, name)
            if getattr(alerta, name) != value:
                setattr(alerta, name, value)
                changed.append(name)
        return tuple(changed)


def _validate_changes(
    alerta: Alerta, changes: Mapping[str, Any]
) -> _AlertData:
    """Validate the changed keys only, so that a current value that is
    invalid in the database does not block an unrelated change.
    """
    data = _AlertData.model_construct(
        **{name: getattr(alerta, name) for name in UPDATABLE}
    )
    try:
        for name, value in changes.items():
            setattr(data, name, value)
    except PydanticValidationError as exc:
        raise _invalid(exc, "changes", UPDATABLE) from exc
    return data


def sincronizar_acao_dual(
    v1_action_data: Mapping[str, Any], *, session: Session | None = None
) -> int:
    """Record an admin action on a V1 alert and return the action's id.

    ``v1_action_data`` needs ``alerta_id``, ``tipo`` (``escalar``,
    ``reatribuir``, ``encerrar`` or ``comentar``) and ``usuario``, and may
    give ``observacao`` and ``registrado_em`` (an aware datetime). In its
    own session the action's ``usuario`` is recorded as the actor of the
    change, unless ``sa_dualwrite.acting_as`` names another. Raises
    :class:`InvalidAlertData` or :class:`AlertNotFound`.
    """
    data = _validate(_ActionData, v1_action_data, "action data")
    values = data.model_dump(exclude_unset=True)
    if values.get("registrado_em") is None:
        values.pop("registrado_em", None)
    with _session_scope(session, actor=data.usuario) as scope:
        if scope.get(Alerta, data.alerta_id) is None:
            raise AlertNotFound(data.alerta_id)
        acao = AcaoAdministrativa(**values)
        scope.add(acao)
        scope.flush()
        return acao.id
