"""The OpenAPI document, built from the marshmallow schemas routes declare with ``doc(...)``.

Every ``api.*`` rule is an operation (a view without ``doc`` still shows up, by its docstring),
with the error answers it can give; the ``*Out`` response schemas are also what handlers dump.
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

from .blueprint import MAX_URL_BYTES, PUBLIC_ENDPOINTS, bp


def doc(summary: str, request=None, response=None, status: int = 200, query=None, tags=None, errors=(),
        responses=None):
    """Attach OpenAPI metadata to a view: request/response are marshmallow schema classes
    (or instances, e.g. ``Schema(many=True)``), a plain JSON schema (a dict) or a media-type
    string; query is a schema for the query string.

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
    "414": ("URITooLong", f"The URL (path and query string) is longer than {MAX_URL_BYTES:,} bytes"),
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


class EventStream:
    """A ``text/event-stream`` answer; ``events``: each event type's data (JSON) as a schema class.
    Documented as OpenAPI 3.0 tools read a stream: the schema of one event (``event``, ``id``,
    ``data``), its data's JSON schema under ``contentSchema``."""

    def __init__(self, events: dict[str, type[Schema]]):
        self.events = events

    def schema(self) -> dict:
        data = [{"$ref": f"#/components/schemas/{cls.__name__}"} for cls in self.events.values()]
        return {
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"type": "string", "enum": list(self.events)},
                "id": {"type": "string", "description": "send it back as Last-Event-ID to go on from there"},
                "retry": {"type": "integer", "description": "milliseconds to wait before reconnecting"},
                "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {"oneOf": data}},
            },
        }


def _content(obj) -> dict:
    if isinstance(obj, str):
        return {obj: {"schema": {"type": "string"}}}
    if isinstance(obj, EventStream):
        return {"text/event-stream": {"schema": obj.schema()}}
    return {"application/json": {"schema": obj}}  # a marshmallow schema, or a plain JSON schema dict


def _only_null(node):
    """apispec documents a nullable nested object as ``anyOf: [{type: object, nullable: true},
    {$ref}]``, whose first branch takes any object: that branch is made to take only null."""
    if isinstance(node, dict):
        for branch in node.get("anyOf", ()):
            if branch == {"type": "object", "nullable": True}:
                branch["enum"] = [None]
        for value in node.values():
            _only_null(value)
    elif isinstance(node, list):
        for value in node:
            _only_null(value)


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
        responses["415"] = ERROR_RESPONSES["415"][0]  # a body sent as another media type
        responses["422"] = ERROR_RESPONSES["422"][0]
    responses["414"] = ERROR_RESPONSES["414"][0]  # any operation: a URL past MAX_URL_BYTES
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
        stream = (getattr(view, "__openapi__", None) or {}).get("response")
        if isinstance(stream, EventStream):  # its data schemas are named by their class (EventStream.schema)
            for cls in stream.events.values():
                if cls.__name__ not in spec.components.schemas:
                    spec.components.schema(cls.__name__, schema=cls)
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
    document = spec.to_dict()
    _only_null(document)
    return document


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
@doc("This OpenAPI 3.0 document (public)", response={"type": "object"}, tags=["meta"])
def openapi_document():
    """The OpenAPI document of the JSON API."""
    return jsonify(get_spec(current_app))
