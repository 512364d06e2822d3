"""Checks an API answer against the OpenAPI document: its status is documented for the operation,
and its JSON body fits the documented schema, in both directions (a key the schema does not name
fails, so does a required key that is missing).

A small validator (no jsonschema here): the document uses a small part of OpenAPI 3.0's schema
language ($ref, allOf/anyOf, nullable, enum, objects, arrays, scalars).
"""

from __future__ import annotations


def resolve(spec: dict, node: dict) -> dict:
    while "$ref" in node:
        target = spec
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def check(spec: dict, schema: dict, value, where: str = "body") -> None:
    """Assert ``value`` fits ``schema``; the message names where it does not."""
    schema = resolve(spec, schema)
    if "anyOf" in schema:  # (apispec's nullable nested object: [only null, the object's $ref])
        problems = []
        for part in schema["anyOf"]:
            try:
                return check(spec, part, value, where)
            except AssertionError as exc:
                problems.append(str(exc))
        raise AssertionError(f"{where} fits none of its schemas: {problems}")
    if value is None:
        assert schema.get("nullable") or not schema, f"{where} is null, which the document does not allow"
        return
    for part in schema.get("allOf", ()):
        check(spec, part, value, where)
    if "enum" in schema:
        assert value in schema["enum"], f"{where} = {value!r} is not one of {schema['enum']}"
    kind = schema.get("type")
    if kind == "object":
        _check_object(spec, schema, value, where)
    elif kind == "array":
        assert isinstance(value, list), f"{where} is not an array"
        for i, item in enumerate(value):
            check(spec, schema.get("items", {}), item, f"{where}[{i}]")
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where} is not an integer"
    elif kind == "number":
        assert isinstance(value, int | float) and not isinstance(value, bool), f"{where} is not a number"
    elif kind == "string":
        assert isinstance(value, str), f"{where} is not a string"
    elif kind == "boolean":
        assert isinstance(value, bool), f"{where} is not a boolean"


def _check_object(spec: dict, schema: dict, value, where: str) -> None:
    assert isinstance(value, dict), f"{where} is not an object"
    props = schema.get("properties", {})
    missing = set(schema.get("required", ())) - set(value)
    assert not missing, f"{where} lacks keys the document requires: {sorted(missing)}"
    extra = schema.get("additionalProperties", True)
    if extra is False:
        assert set(value) <= set(props), f"{where} has keys the document does not name: {set(value) - set(props)}"
    for key, item in value.items():
        if key in props:
            check(spec, props[key], item, f"{where}.{key}")
        elif isinstance(extra, dict):
            check(spec, extra, item, f"{where}.{key}")


def assert_documented(spec: dict, method: str, path: str, resp) -> None:
    """The answer's status is documented for the operation, and its JSON body fits the schema."""
    operation = spec["paths"][path][method]
    status = str(resp.status_code)
    assert status in operation["responses"], (
        f"{method.upper()} {path} answered {status}, the document names {sorted(operation['responses'])}: "
        f"{resp.get_data(as_text=True)[:300]}"
    )
    answer = resolve(spec, operation["responses"][status])
    content = answer.get("content", {})
    where = f"{method.upper()} {path} {status}"
    if resp.mimetype == "application/json":
        assert "application/json" in content, f"{where}: no JSON body documented"
        check(spec, content["application/json"]["schema"], resp.json, where)
    elif resp.get_data():
        assert resp.mimetype in content, f"{where}: a {resp.mimetype} body, the document names {sorted(content)}"
    else:
        assert not content, f"{where}: no body, the document names {sorted(content)}"
