"""Workspace isolation, checked on EVERY route under /api/v1, including routes added later.

The walk reads ``app.url_map``: for each rule with id arguments it substitutes the ids of
resources that belong to ANOTHER workspace (A) and calls it, with every method, as workspace B;
the answer must be 404 (with the contract's error shape). For rules with several ids it also
mixes them (one foreign, the others B's own), so ``/lists/<B's list>/members/<A's contact>``
is covered too. Afterwards A's resources must be untouched. Collection routes (no id in the
path) are called with A's ids in the query string and must not show anything of A's.

Adding a route with a new kind of id argument: map it in ``FOREIGN_IDS`` (argument name, by
the rule's first path segment after /api/v1, or ``"*"`` for any segment) to a resource kind,
and give that kind a factory in ``FACTORIES``. Until then the walk fails and names the rule,
so a new route can never be skipped silently.
"""

from __future__ import annotations

import re
import uuid

import pytest
from sqlalchemy import func, select

from campaigns import models as m
from campaigns.db import session_scope

API = "/api/v1"

# (first path segment, URL argument) -> resource kind; "*" matches any segment.
FOREIGN_IDS: dict[tuple[str, str], str] = {
    ("*", "contact_id"): "contact",
    ("*", "list_id"): "list",
    ("*", "import_id"): "import",
    ("*", "campaign_id"): "campaign",
    ("*", "message_id"): "message",
    ("*", "step_id"): "step",
    ("*", "enrollment_id"): "enrollment",
    ("*", "suppression_id"): "suppression",
    ("*", "event_id"): "event",
    ("*", "reply_id"): "reply",
    ("contacts", "id"): "contact",
    ("lists", "id"): "list",
    ("imports", "id"): "import",
    ("campaigns", "id"): "campaign",
    ("messages", "id"): "message",
    ("suppressions", "id"): "suppression",
    ("steps", "id"): "step",
    # string arguments
    ("suppressions", "email"): "suppression_email",
}

# Bodies for unsafe calls, by endpoint: valid enough that a handler which (wrongly) validated
# the body before looking the resource up would still reach the lookup. Default: {}.
BODIES = {
    "api.patch_contact": lambda own: {"first_name": "Mallory"},
    "api.patch_list": lambda own: {"name": "taken-over"},
    "api.add_members": lambda own: {"contact_ids": [own["contact"]], "emails": ["mallory@example.com"]},
    "api.update_campaign": lambda own: {"name": "taken-over"},
    "api.test_send": lambda own: {"email": "mallory@example.com"},
    "api.preview_campaign": lambda own: {"subject": "s", "html": "<p>h</p>"},
}

SKIP_COLLECTIONS = {"api.openapi"}  # public, and about no workspace


# --- factories: one of each resource in a workspace, built on demand ---------------------------


def _contact(s, ws, made, tag):
    row = m.Contact(workspace_id=ws, email=f"contact-{tag}@example.com", first_name=f"First-{tag}", fields={})
    s.add(row)
    s.flush()
    return row.id


def _list(s, ws, made, tag):
    row = m.ContactList(workspace_id=ws, name=f"list-{tag}")
    s.add(row)
    s.flush()
    s.add(m.ListMember(list_id=row.id, contact_id=build(s, ws, made, tag, "contact"), workspace_id=ws))
    s.flush()
    return row.id


def _suppression(s, ws, made, tag):
    row = m.Suppression(workspace_id=ws, email=f"suppressed-{tag}@example.com", reason="manual")
    s.add(row)
    s.flush()
    made["suppression_email"] = row.email
    return row.id


def _suppression_email(s, ws, made, tag):
    build(s, ws, made, tag, "suppression")
    return made["suppression_email"]


def _import(s, ws, made, tag):
    row = m.Import(workspace_id=ws, status="done", total_bytes=10, bytes_done=10, rows_done=1,
                   errors=[{"row": 2, "error": f"import-{tag}"}])
    s.add(row)
    s.flush()
    return row.id


def _campaign(s, ws, made, tag):
    row = m.Campaign(workspace_id=ws, name=f"campaign-{tag}", from_email=f"from-{tag}@example.com",
                     list_id=build(s, ws, made, tag, "list"))
    s.add(row)
    s.flush()
    return row.id


def _step(s, ws, made, tag):
    row = m.Step(workspace_id=ws, campaign_id=build(s, ws, made, tag, "campaign"), position=0, type="email",
                 subject=f"subject-{tag}", html="<p>hi</p>", text="hi")
    s.add(row)
    s.flush()
    return row.id


def _enrollment(s, ws, made, tag):
    row = m.Enrollment(workspace_id=ws, campaign_id=build(s, ws, made, tag, "campaign"),
                       contact_id=build(s, ws, made, tag, "contact"))
    s.add(row)
    s.flush()
    return row.id


def _message(s, ws, made, tag):
    row = m.Message(
        workspace_id=ws, campaign_id=build(s, ws, made, tag, "campaign"),
        enrollment_id=build(s, ws, made, tag, "enrollment"), step_id=build(s, ws, made, tag, "step"),
        contact_id=build(s, ws, made, tag, "contact"), email=f"contact-{tag}@example.com",
        message_key=f"key-{tag}", status="failed", last_error="boom",
    )
    s.add(row)
    s.flush()
    return row.id


def _event(s, ws, made, tag):
    row = m.Event(workspace_id=ws, message_id=build(s, ws, made, tag, "message"), message_key=f"key-{tag}",
                  dedupe_key=f"dedupe-{tag}", event="delivered", email=f"contact-{tag}@example.com", payload={})
    s.add(row)
    s.flush()
    return row.id


FACTORIES = {
    "contact": _contact,
    "list": _list,
    "suppression": _suppression,
    "suppression_email": _suppression_email,
    "import": _import,
    "campaign": _campaign,
    "step": _step,
    "enrollment": _enrollment,
    "message": _message,
    "event": _event,
}


def build(s, ws, made, tag, kind):
    if kind not in made:
        made[kind] = FACTORIES[kind](s, ws, made, tag)
    return made[kind]


def make_world(workspace_id: int, tag: str) -> dict:
    made: dict = {}
    with session_scope() as s:
        for kind in FACTORIES:
            build(s, workspace_id, made, tag, kind)
    return made


# --- the walk ----------------------------------------------------------------------------------

_ARG = re.compile(r"<(?:(\w+)(?:\([^)]*\))?:)?(\w+)>")


def api_rules(app):
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith(API + "/"):
            yield rule


def rule_args(rule) -> list[tuple[str, str]]:
    """[(converter, argument)] in path order."""
    return [(conv or "default", arg) for conv, arg in _ARG.findall(rule.rule)]


def segment(rule) -> str:
    return rule.rule[len(API) + 1 :].split("/", 1)[0]


def kind_for(rule, arg: str) -> str | None:
    return FOREIGN_IDS.get((segment(rule), arg)) or FOREIGN_IDS.get(("*", arg))


def methods(rule) -> list[str]:
    order = {"GET": 0, "POST": 1, "PUT": 2, "PATCH": 3, "DELETE": 4}
    return sorted(rule.methods - {"HEAD", "OPTIONS"}, key=lambda x: order.get(x, 9))


def fill(rule, ids_for_arg: dict[str, object]) -> str:
    def sub(match):
        return str(ids_for_arg[match.group(2)])

    return _ARG.sub(sub, rule.rule)


def call(api, method, url, body):
    kwargs = {"json": body} if method in ("POST", "PUT", "PATCH") else {}
    return api._call(method.lower(), url, buffered=False, **kwargs)


@pytest.fixture
def worlds(api, other_api):
    """A (the owner, ``other_api``) and B (the caller, ``api``), each with one of everything."""
    tag_a, tag_b = "a" + uuid.uuid4().hex[:8], "b" + uuid.uuid4().hex[:8]
    return make_world(other_api.workspace_id, tag_a), make_world(api.workspace_id, tag_b), tag_a


def _snapshot(workspace_id: int) -> dict:
    """What A has, to check that nothing B did changed it."""
    with session_scope() as s:
        counts = {}
        for model in (m.Contact, m.ContactList, m.ListMember, m.Suppression, m.Import, m.Campaign, m.Step,
                      m.Enrollment, m.Message):
            counts[model.__name__] = s.scalar(
                select(func.count()).select_from(model).where(model.workspace_id == workspace_id)
            )
        contact = s.scalar(select(m.Contact).where(m.Contact.workspace_id == workspace_id))
        lst = s.scalar(select(m.ContactList).where(m.ContactList.workspace_id == workspace_id))
        camp = s.scalar(select(m.Campaign).where(m.Campaign.workspace_id == workspace_id))
        msg = s.scalar(select(m.Message).where(m.Message.workspace_id == workspace_id))
        return {
            **counts,
            "contact": (contact.email, contact.first_name, contact.status),
            "list": lst.name,
            "campaign": (camp.name, camp.status),
            "message": (msg.status, msg.attempts, msg.resends),
        }


def test_every_id_route_answers_404_for_another_workspaces_ids(app, api, other_api, worlds):
    theirs, ours, _ = worlds
    before = _snapshot(other_api.workspace_id)
    unknown, leaks, walked, owner_broken = [], [], set(), []

    for rule in sorted(api_rules(app), key=lambda r: r.rule):
        args = rule_args(rule)
        if not args:
            continue
        kinds = {}
        for _, arg in args:
            kind = kind_for(rule, arg)
            if kind is None or kind not in FACTORIES:
                unknown.append(f"{rule.rule}: argument {arg!r}")
            kinds[arg] = kind
        if any(k is None or k not in FACTORIES for k in kinds.values()):
            continue
        walked.add(segment(rule))

        # the ids are real: the owner can read them (else a 404 below would prove nothing)
        if "GET" in rule.methods:
            resp = call(other_api, "GET", fill(rule, {a: theirs[k] for a, k in kinds.items()}), None)
            if resp.status_code == 404:
                owner_broken.append(rule.rule)
            resp.close()

        # all ids foreign, then (several ids) one foreign at a time, the others B's own
        combos = [{a: theirs[k] for a, k in kinds.items()}]
        if len(kinds) > 1:
            for foreign_arg in kinds:
                combos.append({a: (theirs if a == foreign_arg else ours)[k] for a, k in kinds.items()})
        for method in methods(rule):
            body = BODIES.get(rule.endpoint, lambda own: {})(ours) if method != "GET" else None
            for combo in combos:
                url = fill(rule, combo)
                resp = call(api, method, url, body)
                status = resp.status_code
                if status != 404:
                    leaks.append(f"{method} {url} ({rule.rule}) -> {status}")
                else:
                    err = (resp.get_json(silent=True) or {}).get("error", {})
                    if err.get("code") is None or "message" not in err:
                        leaks.append(f"{method} {url}: 404 without the contract's error shape")
                resp.close()

    assert not unknown, "no factory for these route arguments; add them to FOREIGN_IDS/FACTORIES:\n" + "\n".join(
        unknown)
    assert not leaks, "another workspace's resource answered something else than 404:\n" + "\n".join(leaks)
    assert not owner_broken, "the owner got 404 on its own resource (bad factory?):\n" + "\n".join(owner_broken)
    assert {"contacts", "lists", "imports", "suppressions"} <= walked, walked
    assert _snapshot(other_api.workspace_id) == before


def test_every_id_route_answers_404_for_ids_no_row_can_have(app, api, other_api, worlds):
    """0 and numbers past BIGINT: Flask's int converter lets them through; the driver would refuse
    them (a 500) if a lookup reached the database with one."""
    _, ours, _ = worlds
    problems, walked = [], 0
    for rule in sorted(api_rules(app), key=lambda r: r.rule):
        args = [arg for conv, arg in rule_args(rule) if conv == "int"]
        if not args:
            continue
        walked += 1
        for bad in (0, 2**63, 10**23):
            for arg in args:  # one argument out of range at a time, the others real
                ids = {a: (bad if a == arg else ours[kind_for(rule, a)]) for _, a in rule_args(rule)}
                for method in methods(rule):
                    body = BODIES.get(rule.endpoint, lambda own: {})(ours) if method != "GET" else None
                    resp = call(api, method, fill(rule, ids), body)
                    err = (resp.get_json(silent=True) or {}).get("error", {})
                    if resp.status_code != 404 or "message" not in err:
                        problems.append(f"{method} {fill(rule, ids)} -> {resp.status_code}")
                    resp.close()
    assert walked >= 10, walked
    assert not problems, "\n".join(problems)


def test_collections_never_show_another_workspaces_rows(app, api, other_api, worlds):
    theirs, _, tag_a = worlds
    markers = [tag_a, theirs["suppression_email"]]
    params = [{}] + [{name: theirs[kind]} for name, kind in (
        ("list_id", "list"), ("campaign_id", "campaign"), ("contact_id", "contact"),
        ("message_id", "message"), ("import_id", "import"))] + [{"email": f"contact-{tag_a}@example.com"}]
    problems = []
    for rule in sorted(api_rules(app), key=lambda r: r.rule):
        if rule_args(rule) or "GET" not in rule.methods or rule.endpoint in SKIP_COLLECTIONS:
            continue
        for query in params:
            resp = api.get(rule.rule, query_string=query)
            text = resp.get_data(as_text=True)
            if resp.status_code >= 500:
                problems.append(f"GET {rule.rule} {query} -> {resp.status_code}")
            for marker in markers:
                if marker in text:
                    problems.append(f"GET {rule.rule} {query} shows {marker!r}")
    assert not problems, "\n".join(problems)


def test_foreign_ids_in_bodies_and_query_strings(api, other_api, worlds):
    theirs, ours, _ = worlds
    # a foreign list in the query string
    assert api.get(f"/api/v1/contacts?list_id={theirs['list']}").status_code == 404
    resp = api.post(f"/api/v1/contacts/import?list_id={theirs['list']}", data=b"email\nx@example.com\n",
                    content_type="text/csv")
    assert resp.status_code == 404
    # foreign contact ids in a body are reported, never added
    resp = api.post(f"/api/v1/lists/{ours['list']}/members", json={"contact_ids": [theirs["contact"]]})
    assert resp.status_code == 200 and resp.json["added"] == 0
    assert resp.json["invalid"] == [{"contact_id": theirs["contact"], "reason": "no such contact"}]
    # a suppression of the same address in B is B's own, and deleting it leaves A's alone
    email = theirs["suppression_email"]
    assert api.delete(f"/api/v1/suppressions/{email}").status_code == 404
    assert api.post("/api/v1/suppressions", json={"emails": [email]}).json["added"] == 1
    assert api.delete(f"/api/v1/suppressions/{email}").status_code == 204
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(m.Suppression).where(m.Suppression.email == email)) == 1
    # the same address as a contact in both workspaces: two contacts, each upsert stays home
    same = "shared@example.com"
    a = other_api.post("/api/v1/contacts", json={"email": same, "first_name": "A"}).json
    b = api.post("/api/v1/contacts", json={"email": same, "first_name": "B"})
    assert b.status_code == 201 and b.json["id"] != a["id"]
    assert other_api.get(f"/api/v1/contacts/{a['id']}").json["first_name"] == "A"
