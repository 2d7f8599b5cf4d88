"""`GET /v1/models` and `GET /v1/models/{id}`, and what a request's `model` field selects.

Owns: the OpenAI model list (the base model plus every adapter the caller may use, each with
`parent` = the base model's id), one model of it (one the list would not show is a 404), and
`resolve_model`, which turns a `model` field into an adapter version or None for the base model.
Unknown and other tenants' adapters are the same 404.
"""

from fastapi import APIRouter, Depends

from loraplex.api.auth import caller
from loraplex.api.json_body import StrictJsonRoute
from loraplex.api.response_models import ModelCard, ModelList, errors
from loraplex.api.services import Services, services
from loraplex.service.catalog import AdapterRecord
from loraplex.tenancy import Principal

router = APIRouter(route_class=StrictJsonRoute)

MODEL_NOT_FOUND = "The model is neither the base model nor an adapter the caller may use (another tenant's is missing too)."


def resolve_model(svc: Services, principal: Principal, model: str) -> AdapterRecord | None:
    """The adapter `model` names (None for the served base model); raises AdapterNotFound."""
    if model == svc.model_name:
        return None
    return svc.catalog.get(model, principal)


def _card(svc: Services, principal: Principal, record: AdapterRecord | None) -> dict:
    """OpenAI's model object for the base model (None) or an adapter, with `parent` and `max_model_len`."""
    base = svc.model_name
    if record is None:
        return {
            "id": base,
            "object": "model",
            "created": int(svc.started),
            "owned_by": "loraplex",
            "root": base,
            "parent": None,
            "max_model_len": svc.engine.max_model_len,
        }
    return {
        "id": record.name,
        "object": "model",
        "created": int(record.created),
        "owned_by": record.owner or "loraplex",
        "root": str(record.path) if principal.is_admin else record.name,
        "parent": base,
        "max_model_len": svc.engine.max_model_len,
    }


@router.get("/v1/models", response_model=None, responses={200: {"model": ModelList, "description": "The models."}})
def list_models(svc: Services = Depends(services), principal: Principal = Depends(caller)) -> dict:
    records = [None, *svc.catalog.visible_to(principal)]
    return {"object": "list", "data": [_card(svc, principal, record) for record in records]}


@router.get(
    "/v1/models/{model_id:path}",
    response_model=None,
    responses={200: {"model": ModelCard, "description": "The model."}, **errors({404: MODEL_NOT_FOUND})},
)
def retrieve_model(model_id: str, svc: Services = Depends(services), principal: Principal = Depends(caller)) -> dict:
    return _card(svc, principal, resolve_model(svc, principal, model_id))
