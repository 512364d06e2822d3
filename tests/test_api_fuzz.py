"""Schemathesis against the API, in-process (WSGI), with a Bearer key and seeded ids (issue 18.7).

Every operation of the OpenAPI document gets a bounded number of generated requests, fitting
the document and not (``EXAMPLES``, the same ones each run: derandomized); each answer must not
be a server error, must have a documented status and media type, and its body must fit the
documented schema.
Path ids are real ones (a draft campaign, a contact, a list...), so handlers run past their 404.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from campaigns.config import get_settings
from tests.helpers import campaign_body

# examples per operation: requests that fit the document, and requests that do not (a 4xx expected)
EXAMPLES = {GenerationMode.POSITIVE: 20, GenerationMode.NEGATIVE: 5}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture
def ids(api):
    """Real ids for the path parameters; the stream's campaign has ended, so a stream closes at once."""
    list_id = api.post("/api/v1/lists", json={"name": "Fuzzed"}).json["id"]
    contact_id = api.post("/api/v1/contacts", json={"email": "fuzz@example.com"}).json["id"]
    api.post(f"/api/v1/lists/{list_id}/members", json={"contact_ids": [contact_id]})
    campaign_id = api.post("/api/v1/campaigns", json=campaign_body(list_id)).json["id"]
    message_id = api.post(f"/api/v1/campaigns/{campaign_id}/test-send", json={"email": "me@example.com"}).json["id"]
    ended = api.post("/api/v1/campaigns", json=campaign_body(list_id)).json["id"]
    assert api.post(f"/api/v1/campaigns/{ended}/launch").status_code == 202
    assert api.post(f"/api/v1/campaigns/{ended}/cancel").status_code == 200
    import_id = api.post("/api/v1/contacts/import?async=1", data=b"email\nimp@example.com\n",
                         content_type="text/csv").json["import_id"]
    return {"list_id": list_id, "contact_id": contact_id, "campaign_id": campaign_id, "message_id": message_id,
            "import_id": import_id, "ended": ended}


@pytest.fixture
def no_upload_left():
    """Asynchronous imports (seeded and fuzzed) are queued, never run: their uploads go with the test."""
    folder = Path(get_settings().instance_dir) / "imports"
    before = set(folder.glob("*")) if folder.exists() else set()
    yield
    for path in (set(folder.glob("*")) if folder.exists() else set()) - before:
        path.unlink(missing_ok=True)


@pytest.mark.timeout(240)  # ~30 s on an idle machine, a minute with 2 cores shared 6 ways
def test_the_api_survives_schemathesis(app, no_upload_left, api, ids):
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    headers = {"Authorization": f"Bearer {api.key}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    document = api.get("/api/v1/openapi.json").json
    documented = {f"{m.upper()} {p}" for p, item in document["paths"].items() for m in item if m != "parameters"}
    # every operation but the document itself, which schemathesis leaves out when it loads from it
    assert {op.label for op in operations} == documented - {"GET /api/v1/openapi.json"}

    for operation in operations:
        for mode, examples in EXAMPLES.items():
            _fuzz(operation, mode, examples, headers, ids)


def _fuzz(operation, mode: GenerationMode, examples: int, headers: dict, ids: dict) -> None:
    stream = operation.path.endswith("/stream")

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(mode))
    def run(case):
        for name in case.path_parameters or {}:
            if name in ids:
                case.path_parameters[name] = ids["ended"] if stream else ids[name]
        case.call_and_validate(headers=headers, checks=CHECKS)

    run()
