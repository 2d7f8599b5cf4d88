"""Adapter management routes: upload, list, show, delete, and vLLM's load/unload.

Owns: the HTTP side of adapter management. `POST /v1/adapters` takes multipart form data
(`name`, `config` = adapter_config.json, `weights` = adapter_model.safetensors, optional
`chat_template`, `overwrite`, `shared`; each at most once; the body's size is bounded by the
gate before it is read), and hands the files to the catalog, which validates, stores and serves them. `POST
/v1/adapters/merge` (JSON) merges adapters the caller owns into a new one it owns. The vLLM-compatible
`/v1/load_lora_adapter` and `/v1/unload_lora_adapter` are admin-only; as in vLLM, loading a name
already served is a 400. Tenancy rules live in the catalog, not here.
"""

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from loraplex.api.auth import caller
from loraplex.api.json_body import StrictJsonRoute
from loraplex.api.response_models import AdapterDeleted, AdapterList, AdapterRecord, errors
from loraplex.api.schemas import LoadLoraRequest, MergeRequest, UnloadLoraRequest
from loraplex.api.services import Services, services
from loraplex.errors import AdapterExists, RequestInvalid
from loraplex.tenancy import Principal

router = APIRouter(route_class=StrictJsonRoute)

_STORED = {
    201: {"model": AdapterRecord, "description": "Stored and served under a new name."},
    200: {"model": AdapterRecord, "description": "Replaced the adapter of that name (overwrite true)."},
}
_NOT_FOUND = "No adapter of that name, or another tenant's."
_TEXT = {"content": {"text/plain": {"schema": {"type": "string", "pattern": "^Success: "}}}}

FORM_FIELDS = {"name", "config", "weights", "chat_template", "overwrite", "shared"}


def describe(svc: Services, record) -> dict:
    """A catalog record as the API shows it, with where that version is now (device, host, loading, failed, disk)."""
    return record.describe(svc.engine.adapter_tier(record.adapter))


def _flag(form, name: str) -> bool:
    value = form.get(name)
    if value is None:
        return False
    if isinstance(value, UploadFile) or value.lower() not in ("true", "false", "1", "0"):
        raise RequestInvalid(f"{name} must be true or false", param=name)
    return value.lower() in ("true", "1")


async def _file(form, name: str, required: bool) -> bytes | None:
    value = form.get(name)
    if value is None:
        if required:
            raise RequestInvalid(f"the form field {name!r} is missing", param=name)
        return None
    if isinstance(value, UploadFile):
        return await value.read()
    try:
        return value.encode()
    except UnicodeEncodeError:
        raise RequestInvalid(f"the form field {name!r} is not valid UTF-8 text", param=name) from None


@router.post(
    "/v1/adapters",
    status_code=201,
    response_model=None,
    responses={
        **_STORED,
        **errors(
            {
                400: "The form is not multipart/form-data, a field is missing, repeated or unknown, the name is invalid "
                "or the base model's, or the files cannot be read (not JSON, not safetensors).",
                403: "A shared adapter asked for, or replaced, by a non-admin.",
                409: "The name is taken and overwrite is not true (or the adapter was loaded from a path).",
                413: "The weights are over --max-adapter-bytes.",
                422: "The adapter does not fit the base model (targets, shapes, rank over --max-lora-rank), or its "
                "chat template cannot render.",
            }
        ),
    },
)
async def upload_adapter(request: Request, svc: Services = Depends(services), principal: Principal = Depends(caller)):
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestInvalid("upload adapters as multipart/form-data with fields name, config and weights")
    async with request.form(max_files=3, max_fields=8) as form:  # the gate bounds the body's size
        keys = [key for key, _ in form.multi_items()]
        unknown = set(keys) - FORM_FIELDS
        if unknown:
            raise RequestInvalid(f"unknown form fields: {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise RequestInvalid(f"form fields sent more than once: {', '.join(repeated)}", param=repeated[0])
        name = form.get("name")
        if not isinstance(name, str):
            raise RequestInvalid("the form field 'name' is missing", param="name")
        config = await _file(form, "config", required=True)
        weights = await _file(form, "weights", required=True)
        template_bytes = await _file(form, "chat_template", required=False)
        overwrite, shared = _flag(form, "overwrite"), _flag(form, "shared")
    try:
        template = None if template_bytes is None else template_bytes.decode()
    except UnicodeDecodeError:
        raise RequestInvalid("chat_template must be UTF-8 text", param="chat_template") from None
    record, replaced = await run_in_threadpool(
        svc.catalog.upload, name, config, weights, principal, template, overwrite, shared
    )
    return JSONResponse(describe(svc, record), status_code=200 if replaced else 201)


@router.post(
    "/v1/adapters/merge",
    status_code=201,
    response_model=None,
    responses={
        **_STORED,
        **errors(
            {
                400: "The body is invalid, the name is invalid or the base model's, or the adapters cannot be merged "
                "this way (weights, density or rank for the method; targets, layers or ranks that differ).",
                403: "A tenant named a shared adapter, or a shared adapter of the new name exists.",
                404: "A source adapter does not exist, or is another tenant's.",
                409: "The name is taken and overwrite is not true.",
                413: "The merged weights are over --max-adapter-bytes.",
                422: "The merged adapter does not fit the base model (e.g. a rank over --max-lora-rank).",
            }
        ),
    },
)
async def merge_adapters(body: MergeRequest, svc: Services = Depends(services), principal: Principal = Depends(caller)):
    record, replaced = await run_in_threadpool(
        svc.catalog.merge, body.name, body.adapters, body.weights, body.method, principal,
        body.density, body.rank, body.seed, body.overwrite,
    )  # fmt: skip
    return JSONResponse(describe(svc, record), status_code=200 if replaced else 201)


@router.get(
    "/v1/adapters",
    response_model=None,
    responses={200: {"model": AdapterList, "description": "The adapters the caller may use."}},
)
def list_adapters(svc: Services = Depends(services), principal: Principal = Depends(caller)) -> dict:
    return {"object": "list", "data": [describe(svc, record) for record in svc.catalog.visible_to(principal)]}


@router.get(
    "/v1/adapters/{name}",
    response_model=None,
    responses={200: {"model": AdapterRecord, "description": "The adapter."}, **errors({404: _NOT_FOUND})},
)
def get_adapter(name: str, svc: Services = Depends(services), principal: Principal = Depends(caller)) -> dict:
    return describe(svc, svc.catalog.get(name, principal))


@router.delete(
    "/v1/adapters/{name}",
    response_model=None,
    responses={
        200: {"model": AdapterDeleted, "description": "No longer offered; running requests finish on it."},
        **errors({403: "The adapter is shared; only admins may delete it.", 404: _NOT_FOUND}),
    },
)
async def delete_adapter(name: str, svc: Services = Depends(services), principal: Principal = Depends(caller)) -> dict:
    await run_in_threadpool(svc.catalog.delete, name, principal)
    return {"id": name, "object": "adapter", "deleted": True}


@router.post(
    "/v1/load_lora_adapter",
    response_class=PlainTextResponse,
    responses={
        200: {"description": "Loaded, shared, for this run.", **_TEXT},
        **errors(
            {
                400: "The body is invalid, the name is invalid or the base model's, an adapter of that name is "
                "served already (a 400, as vLLM answers it), or the files cannot be read.",
                403: "Not an admin, or the directory (or a file it links to) is outside --lora-roots.",
                404: "No such directory, or it has no adapter_config.json.",
                413: "The weights are over --max-adapter-bytes.",
                422: "The adapter does not fit the base model, or its chat template cannot render.",
            }
        ),
    },
)
async def load_lora_adapter(
    body: LoadLoraRequest, svc: Services = Depends(services), principal: Principal = Depends(caller)
) -> PlainTextResponse:
    try:
        await run_in_threadpool(svc.catalog.load_path, body.lora_name, body.lora_path, principal)
    except AdapterExists as exc:  # vLLM's clients read a name already served as a bad request
        raise RequestInvalid(str(exc), param="lora_name") from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post(
    "/v1/unload_lora_adapter",
    response_class=PlainTextResponse,
    responses={
        200: {"description": "No longer offered; running requests finish on it.", **_TEXT},
        **errors(
            {
                400: "The body is invalid, or the adapter lives in the store (DELETE /v1/adapters/{name} removes it).",
                403: "Not an admin.",
                404: _NOT_FOUND,
            }
        ),
    },
)
async def unload_lora_adapter(
    body: UnloadLoraRequest, svc: Services = Depends(services), principal: Principal = Depends(caller)
) -> PlainTextResponse:
    await run_in_threadpool(svc.catalog.unload, body.lora_name, principal)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
