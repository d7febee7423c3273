"""The OpenAPI 3.1 document, generated from the API's route table and pydantic models.

Written by hand on purpose: pydantic already emits JSON Schema (which OpenAPI 3.1
uses as is), and the route table has a dozen entries. A framework such as
aiohttp-pydantic or aiohttp-apispec would wrap every handler in its own view
classes and add a dependency for what is ~60 lines here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # "path" | "query"
    schema: dict[str, Any]
    required: bool = True
    description: str = ""


@dataclass(frozen=True)
class Op:
    """One API operation: the handler plus what the document says about it."""

    method: str
    path: str
    handler: Callable[..., Awaitable[Any]]
    summary: str
    auth: str = "read"  # "none" (nodes call it) | "read" | "write"
    body: type[BaseModel] | None = None
    body_media: str = "application/json"
    response: type[BaseModel] | None = None
    response_media: str = "application/json"
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = (400,)
    tags: tuple[str, ...] = field(default=())
    route_path: str | None = None  #: aiohttp path when it needs a regex the doc must not show


def document(ops: list[Op], version: str) -> dict[str, Any]:
    models = {m for op in ops for m in (op.body, op.response) if m is not None}
    from .models import Error

    models.add(Error)
    _, defs = models_json_schema([(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
                                 ref_template="#/components/schemas/{model}")
    schemas = defs.get("$defs", {})

    def ref(m: type[BaseModel]) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{m.__name__}"}

    paths: dict[str, Any] = {}
    for op in ops:
        entry: dict[str, Any] = {"summary": op.summary, "operationId": op.handler.__name__,
                                 "tags": list(op.tags)}
        if op.params:
            entry["parameters"] = [
                {"name": p.name, "in": p.where, "required": p.required or p.where == "path",
                 "schema": p.schema, "description": p.description} for p in op.params]
        if op.body is not None:
            # A body whose fields all have defaults may be omitted (``curl -X POST .../gc``).
            needed = any(f.is_required() for f in op.body.model_fields.values())
            entry["requestBody"] = {"required": needed,
                                    "content": {op.body_media: {"schema": ref(op.body)}}}
        elif op.body_media != "application/json":
            entry["requestBody"] = {"required": True, "content": {
                op.body_media: {"schema": {"type": "string", "format": "binary"}}}}
        ok: dict[str, Any] = {"description": "OK"}
        if op.response is not None:
            ok["content"] = {op.response_media: {"schema": ref(op.response)}}
        elif op.response_media != "application/json":
            ok["content"] = {op.response_media: {"schema": {"type": "string"}}}
        responses: dict[str, Any] = {"200": ok}
        errors = set(op.errors)
        if op.auth == "write":
            errors |= {401, 403}
        elif op.auth == "read":
            errors |= {401}
        for code in sorted(errors):
            responses[str(code)] = {"description": _REASONS.get(code, "error"), "content": {
                "application/json": {"schema": ref(Error)}}}
        entry["responses"] = responses
        if op.auth == "write":
            entry["security"] = [{"bearer": []}]
        elif op.auth == "none":
            entry["security"] = []
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "netbootd API", "version": version,
                 "description": "Nodes, images, boot plans and reload of a netbootd daemon. "
                 "Mutating calls need `Authorization: Bearer <token>`."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


_REASONS = {400: "Bad request", 401: "Missing or wrong token", 403: "Forbidden",
            404: "Not found", 409: "Conflict", 413: "Too large", 503: "Unavailable"}
