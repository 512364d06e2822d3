"""The OpenAPI document: public, valid, cached, and covering every /api/v1 route."""

import json
import re

from flask import Blueprint, Flask
from marshmallow import Schema, fields

from web.api.openapi import build_spec, doc, get_spec, openapi_path

HTTP_METHODS = {"get", "post", "put", "patch", "delete"}


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _resolve(spec, ref):
    assert ref.startswith("#/"), ref
    node = spec
    for part in ref[2:].split("/"):
        assert part in node, f"unresolved $ref {ref}"
        node = node[part]
    return node


def _schema_of(spec, content):
    schema = content["application/json"]["schema"]
    return _resolve(spec, schema["$ref"]) if "$ref" in schema else schema


def test_served_publicly_as_valid_json(client):
    resp = client.get("/api/v1/openapi.json")  # no Authorization header
    assert resp.status_code == 200
    assert resp.mimetype == "application/json"
    spec = json.loads(resp.get_data(as_text=True))
    assert spec["openapi"].startswith("3.0")
    assert spec["info"]["title"] and spec["info"]["version"]
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    assert {"bearerAuth": []} in spec["security"]
    assert spec["paths"]["/api/v1/openapi.json"]["get"]["security"] == []
    for ref in set(_refs(spec)):
        _resolve(spec, ref)


def test_every_api_rule_is_documented(app, client):
    spec = client.get("/api/v1/openapi.json").json
    rules = [r for r in app.url_map.iter_rules() if r.rule.startswith("/api/v1")]
    assert rules
    operation_ids = []
    for rule in rules:
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        assert path in spec["paths"], f"{rule.rule} ({rule.endpoint}) is missing from the OpenAPI document"
        item = spec["paths"][path]
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            op = item.get(method.lower())
            assert op, f"{method} {rule.rule} is missing"
            assert op["summary"] and op["responses"]
            operation_ids.append(op["operationId"])
        declared = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"{(\w+)}", path)), path
    assert len(operation_ids) == len(set(operation_ids)), "operationIds must be unique"
    # nothing outside the API leaks in
    assert all(p.startswith("/api/v1/") for p in spec["paths"])


def test_campaign_paths_and_schemas(client):
    spec = client.get("/api/v1/openapi.json").json
    paths = spec["paths"]
    create = paths["/api/v1/campaigns"]["post"]
    body = _schema_of(spec, create["requestBody"]["content"])
    assert {"name", "list_id", "from_email", "steps"} <= set(body["required"])
    assert body["additionalProperties"] is False
    assert {"send_window", "limits", "stop_on", "tracking", "max_attempts"} <= set(body["properties"])
    out = _schema_of(spec, create["responses"]["201"]["content"])
    assert {"id", "status", "stats", "steps", "send_window"} <= set(out["properties"])
    assert _resolve(spec, create["responses"]["422"]["$ref"])["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }
    assert set(_resolve(spec, "#/components/schemas/Error")["properties"]) == {"error"}

    listing = paths["/api/v1/campaigns"]["get"]
    assert {p["name"] for p in listing["parameters"] if p["in"] == "query"} >= {"status", "cursor"}
    assert set(_schema_of(spec, listing["responses"]["200"]["content"])["properties"]) == {"items", "next_cursor"}

    item = paths["/api/v1/campaigns/{campaign_id}"]
    assert item["parameters"] == [
        {"in": "path", "name": "campaign_id", "required": True, "schema": {"type": "integer", "minimum": 0}}
    ]
    assert {"get", "patch", "delete"} <= set(item)
    assert "required" not in _schema_of(spec, item["patch"]["requestBody"]["content"])  # every field optional
    assert "204" in item["delete"]["responses"] and "409" in item["delete"]["responses"]
    assert item["get"]["responses"]["401"] == {"$ref": "#/components/responses/Unauthorized"}
    preview = paths["/api/v1/campaigns/{campaign_id}/preview"]["post"]
    assert "errors" in _schema_of(spec, preview["responses"]["200"]["content"])["properties"]


def test_documented_schemas_appear_for_every_route(app, client):
    """Whatever a route declares with doc() (contacts, lists, engine...) shows up in the document."""
    spec = client.get("/api/v1/openapi.json").json
    for rule in app.url_map.iter_rules():
        meta = getattr(app.view_functions[rule.endpoint], "__openapi__", None)
        if not rule.endpoint.startswith("api.") or not meta:
            continue
        path, _ = openapi_path(rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            op = spec["paths"][path][method.lower()]
            assert op["summary"] == meta["summary"]
            if meta["request"] is not None:
                assert op["requestBody"]["content"], rule.rule
            if meta["response"] is not None and meta["status"] != 204:
                assert op["responses"][str(meta["status"])]["content"], rule.rule
    if any(r.rule.startswith("/api/v1/contacts") for r in app.url_map.iter_rules()):
        assert "/api/v1/contacts" in spec["paths"]


def test_cached_per_app(app):
    assert get_spec(app) is get_spec(app)


class WidgetSchema(Schema):
    name = fields.String(required=True)


def test_undocumented_views_still_appear():
    app = Flask(__name__)
    api = Blueprint("api", __name__, url_prefix="/api/v1")

    @api.route("/widgets/<uuid:widget_id>/parts/<path:part>", methods=["GET", "PUT"])
    def widget_part(widget_id, part):
        """Fetch or replace one part of a widget.

        A longer description."""

    @api.post("/widgets")
    @doc("Create a widget", request=WidgetSchema, response=WidgetSchema(many=True), status=201)
    def create_widget():
        pass

    @api.post("/widgets/import")
    @doc("Import widgets", request="text/csv", response="text/event-stream")
    def import_widgets():
        pass

    app.register_blueprint(api)
    app.add_url_rule("/elsewhere", "elsewhere", lambda: "")
    spec = build_spec(app)

    item = spec["paths"]["/api/v1/widgets/{widget_id}/parts/{part}"]
    assert item["get"]["summary"] == "Fetch or replace one part of a widget."
    assert item["get"]["description"] == "A longer description."
    assert item["get"]["operationId"] != item["put"]["operationId"]
    assert {p["name"]: p["schema"] for p in item["parameters"]} == {
        "widget_id": {"type": "string", "format": "uuid"}, "part": {"type": "string"}
    }
    created = spec["paths"]["/api/v1/widgets"]["post"]
    assert created["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Widget"}
    assert created["responses"]["201"]["content"]["application/json"]["schema"]["type"] == "array"
    imported = spec["paths"]["/api/v1/widgets/import"]["post"]
    assert "text/csv" in imported["requestBody"]["content"]
    assert "text/event-stream" in imported["responses"]["200"]["content"]
    assert "/elsewhere" not in spec["paths"]


def test_schema_name_clashes_do_not_warn():
    """Two modules' schemas with one class name get distinct component names (warnings are errors here)."""

    def make(field):
        return type("PageSchema", (Schema,), {field: fields.String()})

    first, second = make("a"), make("b")
    app = Flask(__name__)
    api = Blueprint("api", __name__, url_prefix="/api/v1")
    api.add_url_rule("/one", "one", doc("one", response=first)(lambda: ""))
    api.add_url_rule("/two", "two", doc("two", response=second)(lambda: ""))
    api.add_url_rule("/three", "three", doc("three", response=first(only=("a",)))(lambda: ""))
    app.register_blueprint(api)
    schemas = build_spec(app)["components"]["schemas"]
    assert {"Page", "Page2"} <= set(schemas)
    assert len([n for n in schemas if n.startswith("Page")]) == 3
