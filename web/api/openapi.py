"""The OpenAPI document, generated from the marshmallow schemas the routes declare with ``doc``.

``build_spec(app)`` walks the app's url map: every ``api.*`` endpoint becomes an operation,
documented by its view's ``doc(...)`` metadata when it has some, else by the first line of its
docstring, so a route nobody documented still shows up (and the coverage test catches it).
Flask rules become OpenAPI paths (``<int:campaign_id>`` -> ``{campaign_id}``, an integer path
parameter). 4xx answers use the contract's error shape; everything but ``PUBLIC_ENDPOINTS``
needs ``bearerAuth`` (or the UI's session cookie).

``doc(request=..., response=...)`` takes marshmallow schema classes or instances (JSON bodies),
or a media-type string for anything else, e.g. ``request="text/csv"`` or
``response="text/event-stream"``.
"""

from __future__ import annotations

import re
import threading
from http import HTTPStatus

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from apispec.ext.marshmallow.common import make_schema_key, resolve_schema_cls, resolve_schema_instance
from flask import current_app, jsonify
from marshmallow import Schema, fields

from . import PUBLIC_ENDPOINTS, bp


def doc(summary: str, request=None, response=None, status: int = 200, query=None, tags=None, errors=(),
        responses=None):
    """Attach OpenAPI metadata to a view: request/response are marshmallow schema classes
    (or instances, e.g. ``Schema(many=True)``), query is a schema for the query string.

    ``errors``: statuses of :data:`ERROR_RESPONSES` the view answers beyond the ones every
    operation of its kind gets (e.g. ``(409,)`` for a state that refuses the action, ``404`` for
    an id named in the query string or the body). ``responses``: further success answers,
    ``{status: schema, media-type string or None}`` (e.g. ``{200: ContactOut}`` beside a 201)."""

    def wrap(view):
        view.__openapi__ = {
            "summary": summary, "request": request, "response": response,
            "status": status, "query": query, "tags": tags or [],
            "errors": tuple(errors), "responses": dict(responses or {}),
        }
        return view

    return wrap


# --------------------------------------------------------------------------- the error shape


class ErrorBody(Schema):
    code = fields.String(required=True, metadata={"example": "validation_failed"})
    message = fields.String(required=True)
    details = fields.Dict(
        required=True,
        metadata={"description": "per-field problems, e.g. {\"steps[1].html\": [\"line 3: ...\"]}"},
    )


class Error(Schema):
    error = fields.Nested(ErrorBody, required=True)


ERROR_RESPONSES = {
    "400": ("BadRequest", "The request is malformed (not JSON, not an object, a bad query parameter), or an "
            "unsafe method came with the UI session but without its CSRF token"),
    "401": ("Unauthorized", "No valid API key or session"),
    "404": ("NotFound", "No such resource in this workspace"),
    "409": ("Conflict", "The resource's state does not allow this"),
    "413": ("PayloadTooLarge", "The request body is larger than the server accepts (MAX_CONTENT_LENGTH, 64 MiB)"),
    "415": ("UnsupportedMediaType", "The request body's media type (or charset) is not one this operation reads"),
    "422": ("Invalid", "The body is well-formed but not acceptable; details name each field"),
    "429": ("TooManyRequests", "Too many at once (live-progress streams open for the workspace or the server); "
            "try again after Retry-After seconds"),
    "503": ("Unavailable", "A service Herald needs (the database or the task queue) did not answer; try again "
            "after Retry-After seconds"),
}

# --------------------------------------------------------------------------- Flask rules -> OpenAPI paths

_RULE_ARG = re.compile(r"<(?:(?P<converter>[a-zA-Z_]\w*)(?:\((?P<args>.*?)\))?:)?(?P<name>[a-zA-Z_]\w*)>")
_CONVERTER_SCHEMAS = {
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "uuid": {"type": "string", "format": "uuid"},
}


def openapi_path(rule: str) -> tuple[str, list[dict]]:
    """``/campaigns/<int:campaign_id>`` -> (``/campaigns/{campaign_id}``, its path parameters)."""
    params = []

    def replace(match):
        converter, name = match.group("converter") or "default", match.group("name")
        schema = dict(_CONVERTER_SCHEMAS.get(converter, {"type": "string"}))
        if converter == "int":
            schema["minimum"] = 0
        params.append({"in": "path", "name": name, "required": True, "schema": schema})
        return "{" + name + "}"

    return _RULE_ARG.sub(replace, rule), params


# --------------------------------------------------------------------------- schema names


def _name_resolver():
    """Component names from class names (``CampaignSchema`` -> ``Campaign``), made unique per
    build: two modules' ``PageSchema`` or a schema used with ``only=``/``partial=`` get distinct
    names instead of apispec's collision warning."""
    names: dict[tuple, str] = {}
    used: set[str] = set()

    def resolve(schema) -> str:
        key = make_schema_key(resolve_schema_instance(schema))
        if key in names:
            return names[key]
        cls = resolve_schema_cls(schema)
        base = cls.__name__.removesuffix("Schema") or cls.__name__
        if base in used and any(key[1:]):  # the same class with only / exclude / partial...
            base += "Partial" if getattr(resolve_schema_instance(schema), "partial", None) else "Variant"
        name, n = base, 2
        while name in used:
            name, n = f"{base}{n}", n + 1
        names[key] = name
        used.add(name)
        return name

    return resolve


# --------------------------------------------------------------------------- building


def _content(obj) -> dict:
    if isinstance(obj, str):
        return {obj: {"schema": {"type": "string"}}}
    return {"application/json": {"schema": obj}}


def _view_doc(view) -> tuple[str, str]:
    text = (view.__doc__ or "").strip()
    first, _, rest = text.partition("\n")
    return first.strip(), " ".join(rest.split())


def _operation(endpoint: str, method: str, view, path_params: list, public: bool, several: bool, path: str) -> dict:
    meta = getattr(view, "__openapi__", None) or {}
    first_line, description = _view_doc(view)
    summary = meta.get("summary") or first_line or endpoint.removeprefix("api.").replace("_", " ")
    name = endpoint.removeprefix("api.")
    segment = path.removeprefix(bp.url_prefix or "").strip("/").split("/")[0] or "api"
    op: dict = {
        "operationId": f"{name}_{method}" if several else name,
        "summary": summary,
        "tags": list(meta.get("tags") or [segment.removesuffix(".json")]),
    }
    if description:
        op["description"] = description
    if meta.get("query") is not None:
        op["parameters"] = [{"in": "query", "schema": meta["query"]}]
    if meta.get("request") is not None:
        op["requestBody"] = {"required": True, "content": _content(meta["request"])}

    status = int(meta.get("status") or 200)
    ok: dict = {"description": HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "OK"}
    if meta.get("response") is not None and status != 204:
        ok["content"] = _content(meta["response"])
    responses: dict = {str(status): ok}
    # every unsafe method: a session without its CSRF token is a 400 (a DELETE too)
    if meta.get("request") is not None or meta.get("query") is not None or method in ("post", "put", "patch", "delete"):
        responses["400"] = ERROR_RESPONSES["400"][0]
    if not public:
        responses["401"] = ERROR_RESPONSES["401"][0]
    if path_params:
        responses["404"] = ERROR_RESPONSES["404"][0]
    if method in ("patch", "delete"):
        responses["409"] = ERROR_RESPONSES["409"][0]
    if meta.get("request") is not None:
        responses["413"] = ERROR_RESPONSES["413"][0]  # a body past MAX_CONTENT_LENGTH
        responses["422"] = ERROR_RESPONSES["422"][0]
    responses["503"] = ERROR_RESPONSES["503"][0]  # any operation, while the database or the queue store is away
    for extra in meta.get("errors") or ():
        responses[str(extra)] = ERROR_RESPONSES[str(extra)][0]
    for extra, body in (meta.get("responses") or {}).items():
        answer: dict = {"description": HTTPStatus(int(extra)).phrase}
        if body is not None:
            answer["content"] = _content(body)
        responses[str(extra)] = answer
    op["responses"] = dict(sorted(responses.items()))
    if public:
        op["security"] = []
    return op


def build_spec(app) -> dict:
    """The OpenAPI 3.0 document for every ``api.*`` rule of ``app``."""
    spec = APISpec(
        title="Herald API",
        version="1",
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin(schema_name_resolver=_name_resolver())],
        info={
            "description": "Herald's JSON API. Authenticate with `Authorization: Bearer <api key>` "
            "(one workspace per key) or the signed-in UI session. Errors are "
            '`{"error": {"code", "message", "details"}}` with a 4xx status.'
        },
        security=[{"bearerAuth": []}, {"session": []}],
    )
    spec.components.security_scheme("bearerAuth", {"type": "http", "scheme": "bearer"})
    spec.components.security_scheme(
        "session",
        {"type": "apiKey", "in": "cookie", "name": app.config.get("SESSION_COOKIE_NAME") or "session",
         "description": "the UI's session; unsafe methods also need the X-CSRFToken header"},
    )
    spec.components.schema("Error", schema=Error)
    for _status, (name, description) in ERROR_RESPONSES.items():
        spec.components.response(
            name, {"description": description, "content": {"application/json": {"schema": "Error"}}}
        )

    paths: dict[str, dict] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: (r.rule, r.endpoint)):
        if not rule.endpoint.startswith("api."):
            continue
        view = app.view_functions[rule.endpoint]
        path, params = openapi_path(rule.rule)
        methods = sorted(m.lower() for m in (rule.methods or ()) if m not in ("HEAD", "OPTIONS"))
        entry = paths.setdefault(path, {"parameters": params, "operations": {}})
        public = rule.endpoint in PUBLIC_ENDPOINTS
        for method in methods:
            if method not in entry["operations"]:
                entry["operations"][method] = _operation(
                    rule.endpoint, method, view, params, public, len(methods) > 1, rule.rule
                )
    for path, entry in paths.items():
        spec.path(path=path, parameters=entry["parameters"] or None, operations=entry["operations"])
    return spec.to_dict()


_lock = threading.Lock()


def get_spec(app) -> dict:
    """The app's document, built on first use and kept (routes do not change at run time)."""
    cached = app.extensions.get("herald_openapi")
    if cached is None:
        with _lock:
            cached = app.extensions.get("herald_openapi")
            if cached is None:
                cached = app.extensions["herald_openapi"] = build_spec(app)
    return cached


@bp.get("/openapi.json", endpoint="openapi")
@doc("This OpenAPI 3.0 document (public)", tags=["meta"])
def openapi_document():
    """The OpenAPI document of the JSON API."""
    return jsonify(get_spec(current_app))
