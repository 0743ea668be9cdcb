"""The gateway's own endpoints: health, the model list, key administration, usage and the fleet's events.

These are not on the token path, so they use FastAPI for its validation and readability.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Body, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from . import audit, errors
from .event_log import DEFAULT_LIMIT, FLEET_EVENT_FILE, MAX_LIMIT, EventQuery, find_events, moment
from .fleet_control import ACTIONS, act
from .keystore import (
    AmbiguousKeyName,
    Editable,
    KeyFieldError,
    KeyFileError,
    KeyRecord,
    LastAdminKeyError,
    check_models,
    field_error,
    marked,
)
from .registry import BackendState, Model
from .state import GatewayState
from .usage_report import MAX_BUCKETS, MAX_UNIX_TIME, UsageQuery, usage_page, whole_number

router = APIRouter()
T = TypeVar("T")


def gateway(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


def optional_key(request: Request) -> KeyRecord | None:
    """The caller's key, checked by the connection when the head arrived (access.check_head): a
    request with a wrong key never gets here."""
    key: KeyRecord | None = request.scope.get("state", {}).get("key")
    return key


def api_key(key: Annotated[KeyRecord | None, Depends(optional_key)]) -> KeyRecord:
    if key is None:
        raise errors.invalid_api_key()
    return key


def admin_key(key: Annotated[KeyRecord, Depends(api_key)]) -> KeyRecord:
    if not key.admin:
        raise errors.admin_required()
    return key


# -- health --


@router.get("/health")
def health(
    state: Annotated[GatewayState, Depends(gateway)], key: Annotated[KeyRecord | None, Depends(optional_key)]
) -> dict[str, object]:
    models = list(state.registry.models.values())
    ready = sum(model.state is BackendState.READY for model in models)
    status = "ok" if models and ready == len(models) else ("degraded" if ready else "unavailable")
    if state.keys.problem is not None and status == "ok":
        status = "degraded"  # serving with the last good keys; a change to them would not take
    report: dict[str, object] = {
        "status": status,
        "uptime_s": round(time.time() - state.started_at, 1),
        "models_ready": ready,
        "models_total": len(models),
        "models": [
            health_of(model, detailed=key is not None, waiting=state.admission.waiting_everywhere(model.name))
            for model in models
        ],
    }
    # The key file: "ok", or "invalid" (paths and the reason only for callers with a key).
    report["key_file"] = "ok" if state.keys.problem is None else "invalid"
    if key is not None:
        report["in_flight"] = state.in_flight
        if state.keys.problem is not None:
            report["key_file_problem"] = state.keys.problem
    return report


def health_of(model: Model, detailed: bool, waiting: int = 0) -> dict[str, object]:
    entry: dict[str, object] = {
        "id": model.name,
        "status": model.state.value,
        "backends_ready": sum(backend.state is BackendState.READY for backend in model.backends),
        "backends_total": len(model.backends),
    }
    if detailed:  # paths and addresses only for callers with a key
        entry["path"] = model.path
        entry["aliases"] = list(model.aliases)
        entry["waiting"] = waiting  # requests waiting for a server with room (admission)
        entry["backends"] = [
            {
                "id": backend.spec.id,
                "url": backend.base_url,
                "status": backend.state.value,
                "detail": backend.detail,
                "in_flight": backend.in_flight,
                "capacity": backend.spec.capacity,
                "restarts": backend.restarts,
                "checked_at": backend.checked_at or None,
            }
            for backend in model.backends
        ]
    return entry


# -- models --


def model_object(model: Model) -> dict[str, object]:
    return {
        "id": model.name,
        "object": "model",
        "created": model.created,
        "owned_by": "vllm",
        "root": model.path,
        "path": model.path,
        "aliases": list(model.aliases),
        "status": model.state.value,
    }


@router.get("/v1/models")
def list_models(
    state: Annotated[GatewayState, Depends(gateway)], key: Annotated[KeyRecord, Depends(api_key)]
) -> dict[str, object]:
    models = [model_object(m) for m in state.registry.models.values() if key.may_use(m.name)]
    return {"object": "list", "data": models}


@router.get("/v1/models/{model_id:path}")
def get_model(
    model_id: str, state: Annotated[GatewayState, Depends(gateway)], key: Annotated[KeyRecord, Depends(api_key)]
) -> dict[str, object]:
    model = state.registry.resolve(model_id)
    if model is None or not key.may_use(model.name):
        raise errors.model_not_found(model_id)
    return model_object(model)


# -- key administration --


def key_body(name: str, at_creation: bool) -> type[BaseModel]:
    """The body of `POST` (`at_creation`) or `PATCH /admin/keys`: the key's editable fields, each with
    its type, default and field checks (the record's own validators run when the store saves it); in a
    change every field is optional and None where not given."""
    fields: dict[str, Any] = {}
    for field_name, field, editable in marked(Editable):
        annotation: Any = field.annotation
        if editable.parse is not None:
            annotation = annotation | str  # also as text (an ISO 8601 time): the record reads it
        if not at_creation:
            fields[field_name] = (Annotated[(annotation | None, *field.metadata)], None)
        elif editable.at_creation:
            fields[field_name] = (Annotated[(annotation, *field.metadata)], field.default)
    model: type[BaseModel] = create_model(name, __config__=ConfigDict(extra="forbid"), **fields)
    return model


NewKey = key_body("NewKey", at_creation=True)
KeyChanges = key_body("KeyChanges", at_creation=False)


def checked(body_model: type[BaseModel], body: Any) -> dict[str, Any]:
    """The fields a request's body gives, checked against `body_model` as FastAPI checks a body it
    knows the model of (the app's handler answers a RequestValidationError with a 400)."""
    try:
        return body_model.model_validate(body, from_attributes=True).model_dump(exclude_unset=True)
    except ValidationError as error:
        if error.errors()[0]["loc"]:
            refused = field_error(error)
            raise errors.bad_request(str(refused), param=refused.field) from None
        raise RequestValidationError([{**line, "loc": ("body", *line["loc"])} for line in error.errors()]) from None


def key_file_guard(action: Callable[[], T]) -> T:
    """Run a key-file change, turning its refusals into client errors."""
    try:
        return action()
    except LastAdminKeyError as error:
        raise errors.last_admin_key(str(error)) from None
    except KeyFileError as error:
        raise errors.key_file_invalid(str(error)) from None
    except KeyFieldError as error:
        raise errors.bad_request(str(error), param=error.field) from None
    except ValueError as error:
        raise errors.bad_request(str(error)) from None


@router.get("/admin/keys")
def list_keys(
    state: Annotated[GatewayState, Depends(gateway)], _: Annotated[KeyRecord, Depends(admin_key)]
) -> dict[str, object]:
    return {"object": "list", "data": [record.public() for record in state.keys.records()]}


def audited(
    state: GatewayState, request: Request, admin: KeyRecord, action: str, key: KeyRecord, **details: Any
) -> None:
    """A key change done over the API, in the audit trail (audit.py)."""
    address = request.client.host if request.client else None
    audit.record(state.settings.log_dir, audit.api_actor(admin, address), action, key, **details)


@router.post("/admin/keys", status_code=201)
def create_key(
    request: Request,
    body: Annotated[Any, Body()],
    state: Annotated[GatewayState, Depends(gateway)],
    admin: Annotated[KeyRecord, Depends(admin_key)],
) -> dict[str, object]:
    fields = checked(NewKey, body)
    key_file_guard(lambda: check_models(fields.get("models"), state.registry.names()))
    record, secret = key_file_guard(lambda: state.keys.create(**fields))
    audited(state, request, admin, "create", record, changes=fields)
    return {**record.public(), "key": secret}


def key_id_of(state: GatewayState, reference: str) -> str:
    """The id of the key a path names, by its id or its name, as the CLI takes them."""
    try:
        return state.keys.key_id_of(reference)
    except AmbiguousKeyName as error:
        raise errors.conflict(str(error), "ambiguous_key_name") from None
    except LookupError:
        raise errors.not_found(f"No API key with the id or name `{reference}`.") from None


@router.get("/admin/keys/{key_id}")
def get_key(
    key_id: str, state: Annotated[GatewayState, Depends(gateway)], _: Annotated[KeyRecord, Depends(admin_key)]
) -> dict[str, object]:
    key_id = key_id_of(state, key_id)
    record = next((r for r in state.keys.records() if r.id == key_id), None)
    if record is None:
        raise errors.not_found(f"No API key with id `{key_id}`.")
    return record.public()


@router.patch("/admin/keys/{key_id}")
def update_key(
    request: Request,
    key_id: str,
    body: Annotated[Any, Body()],
    state: Annotated[GatewayState, Depends(gateway)],
    admin: Annotated[KeyRecord, Depends(admin_key)],
) -> dict[str, object]:
    changes = checked(KeyChanges, body)
    key_id = key_id_of(state, key_id)
    key_file_guard(lambda: check_models(changes.get("models"), state.registry.names()))
    record = key_file_guard(lambda: state.keys.update(key_id, changes))
    if record is None:
        raise errors.not_found(f"No API key with id `{key_id}`.")
    audited(state, request, admin, "update", record, changes=changes)
    return record.public()


@router.post("/admin/keys/{key_id}/rotate")
def rotate_key(
    request: Request,
    key_id: str,
    state: Annotated[GatewayState, Depends(gateway)],
    admin: Annotated[KeyRecord, Depends(admin_key)],
    body: Annotated[Any, Body()] = None,
) -> dict[str, object]:
    """A new secret for the key, returned once; `grace_seconds` (default 0) keeps the old one working."""
    options = body if isinstance(body, dict) else {}
    grace = options.get("grace_seconds", 0)
    if set(options) - {"grace_seconds"} or isinstance(grace, bool) or not isinstance(grace, int | float) or grace < 0:
        raise errors.bad_request(
            'The body is optional: {"grace_seconds": N}, seconds the old secret keeps working (N >= 0).',
            param="grace_seconds",
        )
    key_id = key_id_of(state, key_id)
    rotated = key_file_guard(lambda: state.keys.rotate(key_id, float(grace)))
    if rotated is None:
        raise errors.not_found(f"No API key with id `{key_id}`.")
    record, secret = rotated
    audited(state, request, admin, "rotate", record, grace_seconds=grace)
    return {**record.public(), "key": secret}


@router.delete("/admin/keys/{key_id}")
def revoke_key(
    request: Request,
    key_id: str,
    state: Annotated[GatewayState, Depends(gateway)],
    admin: Annotated[KeyRecord, Depends(admin_key)],
) -> JSONResponse:
    key_id = key_id_of(state, key_id)
    revoked = next((record for record in state.keys.records() if record.id == key_id), None)
    if revoked is None or not key_file_guard(lambda: state.keys.revoke(key_id)):
        raise errors.not_found(f"No API key with id `{key_id}`.")
    audited(state, request, admin, "revoke", revoked)
    return JSONResponse({"id": key_id, "object": "api_key.deleted", "deleted": True})


@router.get("/admin/audit")
def audit_trail(
    request: Request, state: Annotated[GatewayState, Depends(gateway)], _: Annotated[KeyRecord, Depends(admin_key)]
) -> dict[str, object]:
    """Who changed which key (audit.py): `key` (ids or names) and `action` (lists), `since` and `until`
    (unix seconds or ISO 8601), `limit` (the newest so many, oldest first)."""
    match = [(("key_id", "key_name"), listed_param(request, "key")), (("action",), listed_param(request, "action"))]
    return find_events(state.settings.log_dir / audit.AUDIT_FILE, event_query(request, match))


# -- usage --


@router.get("/admin/usage")
def usage(
    request: Request, state: Annotated[GatewayState, Depends(gateway)], _: Annotated[KeyRecord, Depends(admin_key)]
) -> dict[str, object]:
    """The ledger in the shape of OpenAI's `/v1/organization/usage/completions`. Lists may come as
    `group_by=a&group_by=b`, `group_by[]=a` or `group_by=a,b`; the figures are up to a second old
    (each worker's last batch)."""
    return usage_of(request, state, listed_param(request, "api_key_ids"))


@router.get("/v1/usage")
async def own_usage(
    request: Request, state: Annotated[GatewayState, Depends(gateway)], key: Annotated[KeyRecord, Depends(api_key)]
) -> dict[str, object]:
    """/admin/usage for the caller's own key alone, with its rate and token windows as they stand."""
    others = [key_id for key_id in listed_param(request, "api_key_ids") if key_id != key.id]
    if others:
        raise errors.forbidden(f"A key reads its own usage only, not that of {', '.join(others)}.")
    page = usage_of(request, state, [key.id])
    limits = state.key_limits.of(key)
    page["limits"] = {
        "requests": await state.limiter.windows(key.id, limits.rate, "requests"),
        "tokens": await state.limiter.windows(key.id, limits.tokens, "tokens") if limits.tokens else [],
    }
    return page


def usage_of(request: Request, state: GatewayState, api_key_ids: list[str]) -> dict[str, object]:
    """A page of the usage ledger (usage_report.py) as the URL asks, of the keys `api_key_ids` (none: all)."""
    if state.ledger is None:
        raise errors.usage_ledger_off()
    params = request.query_params

    def listed(name: str) -> list[str]:
        return listed_param(request, name)

    def number(name: str, maximum: int = MAX_UNIX_TIME) -> int | None:
        value = params.get(name)
        return None if value is None else whole_number(name, value, maximum)

    start_time = number("start_time")
    if start_time is None:
        raise errors.bad_request("start_time (unix seconds) is required.", param="start_time")
    query = UsageQuery(
        start_time=start_time,
        end_time=number("end_time"),
        bucket_width=params.get("bucket_width", "1d"),
        group_by=listed("group_by"),
        models=listed("models"),
        api_key_ids=api_key_ids,
        limit=number("limit", max(MAX_BUCKETS.values())),
        page=params.get("page"),
    )
    return usage_page(state.ledger.store, query)


def listed_param(request: Request, name: str) -> list[str]:
    """A list in the query, as `name=a&name=b`, `name[]=a` or `name=a,b`."""
    params = request.query_params
    values = params.getlist(name) + params.getlist(name + "[]")
    return [part for value in values for part in value.split(",") if part]


# -- the fleet's events --


@router.get("/admin/events")
def fleet_events(
    request: Request, state: Annotated[GatewayState, Depends(gateway)], _: Annotated[KeyRecord, Depends(admin_key)]
) -> dict[str, object]:
    """What the supervisor saw (vllm_gateway/event_log.py): `model` and `event` (lists), `since` and
    `until` (unix seconds or ISO 8601), `limit` (the newest so many, oldest first)."""
    match = [(("model",), listed_param(request, "model")), (("event",), listed_param(request, "event"))]
    return find_events(state.settings.fleet_log_dir / FLEET_EVENT_FILE, event_query(request, match))


def event_query(request: Request, match: Sequence[tuple[tuple[str, ...], Sequence[str]]]) -> EventQuery:
    """The query of an event log's endpoint: `match`, and `since`, `until` and `limit` from the URL."""
    params = request.query_params
    since, until, limit = params.get("since"), params.get("until"), params.get("limit", str(DEFAULT_LIMIT))
    if not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= MAX_LIMIT):
        raise errors.bad_request(f"limit must be a whole number from 1 to {MAX_LIMIT}.", param="limit")
    return EventQuery(
        match=match,
        since=None if since is None else moment("since", since),
        until=None if until is None else moment("until", until),
        limit=int(limit),
    )


# -- the fleet's servers --


@router.post("/admin/models/{model_id}/{action}")
async def model_action(
    model_id: str,
    action: str,
    state: Annotated[GatewayState, Depends(gateway)],
    _: Annotated[KeyRecord, Depends(admin_key)],
) -> dict[str, object]:
    """Start, stop or restart one server of the fleet by its id, through the fleet scripts, or put it
    to sleep or wake it, through its supervisor (fleet_control.py); the answer holds what they printed."""
    if action not in ACTIONS:
        raise errors.not_found(f"No action `{action}` for a model: {', '.join(ACTIONS)}.")
    spec = next((backend.spec for backend in state.registry.backends() if backend.spec.id == model_id), None)
    outcome = await act(action, spec, model_id, state.settings.run_dir)
    state.health.check_soon()  # the new state in /health within a round, not an interval
    return {"object": "model.action", "id": outcome.id, "action": outcome.action, "output": outcome.output}
