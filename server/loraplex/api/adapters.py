"""Adapter management routes: upload, list, show, delete, and vLLM's load/unload.

Owns: the HTTP side of adapter management. `POST /v1/adapters` takes multipart form data
(`name`, `config` = adapter_config.json, `weights` = adapter_model.safetensors, optional
`chat_template`, `overwrite`, `shared`; each at most once; the body's size is bounded by the
gate before it is read), and hands the files to the catalog, which validates, stores and serves them. `POST
/v1/adapters/merge` (JSON) merges adapters the caller owns into a new one it owns. The vLLM-compatible
`/v1/load_lora_adapter` and `/v1/unload_lora_adapter` are admin-only. Tenancy rules live in the
catalog, not here.
"""

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from loraplex.api.auth import caller
from loraplex.api.schemas import LoadLoraRequest, MergeRequest, UnloadLoraRequest
from loraplex.api.services import Services, services
from loraplex.errors import RequestInvalid
from loraplex.tenancy import Principal

router = APIRouter()

_FIELDS = {"name", "config", "weights", "chat_template", "overwrite", "shared"}


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


@router.post("/v1/adapters")
async def upload_adapter(request: Request, svc: Services = Depends(services), principal: Principal = Depends(caller)):
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestInvalid("upload adapters as multipart/form-data with fields name, config and weights")
    async with request.form(max_files=3, max_fields=8) as form:  # the gate bounds the body's size
        keys = [key for key, _ in form.multi_items()]
        unknown = set(keys) - _FIELDS
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
    return JSONResponse(record.describe(), status_code=200 if replaced else 201)


@router.post("/v1/adapters/merge")
async def merge_adapters(body: MergeRequest, svc: Services = Depends(services), principal: Principal = Depends(caller)):
    record, replaced = await run_in_threadpool(
        svc.catalog.merge, body.name, body.adapters, body.weights, body.method, principal,
        body.density, body.rank, body.seed, body.overwrite,
    )  # fmt: skip
    return JSONResponse(record.describe(), status_code=200 if replaced else 201)


@router.get("/v1/adapters")
def list_adapters(svc: Services = Depends(services), principal: Principal = Depends(caller)) -> dict:
    return {"object": "list", "data": [record.describe() for record in svc.catalog.visible_to(principal)]}


@router.get("/v1/adapters/{name}")
def get_adapter(name: str, svc: Services = Depends(services), principal: Principal = Depends(caller)) -> dict:
    return svc.catalog.get(name, principal).describe()


@router.delete("/v1/adapters/{name}")
async def delete_adapter(name: str, svc: Services = Depends(services), principal: Principal = Depends(caller)) -> dict:
    await run_in_threadpool(svc.catalog.delete, name, principal)
    return {"id": name, "object": "adapter", "deleted": True}


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(
    body: LoadLoraRequest, svc: Services = Depends(services), principal: Principal = Depends(caller)
) -> PlainTextResponse:
    await run_in_threadpool(svc.catalog.load_path, body.lora_name, body.lora_path, principal)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(
    body: UnloadLoraRequest, svc: Services = Depends(services), principal: Principal = Depends(caller)
) -> PlainTextResponse:
    await run_in_threadpool(svc.catalog.unload, body.lora_name, principal)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
