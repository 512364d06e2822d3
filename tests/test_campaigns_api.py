"""The campaigns API: create, read, list, edit while a draft, delete, preview; every refusal."""

import copy
import uuid

import pytest
from sqlalchemy import select, update

from campaigns.db import utcnow
from campaigns.models import Campaign, Contact, ContactList, Enrollment, Message, Step

STAT_KEYS = {"sent", "delivered", "opened", "clicked", "bounced", "dropped", "spam_reports", "replied",
             "unsubscribed", "failed", "scheduled", "rates"}
RATE_KEYS = {"delivered", "opened", "clicked", "bounced", "replied", "unsubscribed"}


def make_list(db, workspace_id, name=None):
    lst = ContactList(workspace_id=workspace_id, name=name or f"list-{uuid.uuid4().hex[:6]}")
    db.add(lst)
    db.commit()
    return lst.id


def make_contact(db, workspace_id, email, **kw):
    contact = Contact(workspace_id=workspace_id, email=email, fields=kw.pop("fields", {}), **kw)
    db.add(contact)
    db.commit()
    return contact.id


def body(list_id, **overrides):
    data = {
        "name": "Welcome series",
        "list_id": list_id,
        "from_email": "team@example.com",
        "from_name": "The Team",
        "reply_to": "support@example.com",
        "send_window": {"start": "09:00", "end": "17:30", "days": ["fri", "mon", "tue"], "timezone": "contact"},
        "limits": {"per_minute": 60, "per_day": 5000,
                   "sender": {"daily_cap": 200, "warmup": {"start": 20, "increment": 10},
                              "min_gap_seconds": 30, "max_gap_seconds": 90}},
        "stop_on": ["reply", "click"],
        "tracking": {"opens": True, "clicks": False},
        "max_attempts": 7,
        "steps": [
            {"type": "email", "subject": "Hi {{ contact.first_name }}", "html": "<p>Hello {{ contact.email }}</p>",
             "text": "Hello {{ contact.email }}"},
            {"type": "wait", "seconds": 86400},
            {"type": "email", "subject": "Still there?", "html": "<p>{{ contact.fields.company }}</p>"},
        ],
    }
    data.update(overrides)
    return data


@pytest.fixture
def list_id(api, db):
    return make_list(db, api.workspace_id)


@pytest.fixture
def campaign(api, list_id):
    resp = api.post("/api/v1/campaigns", json=body(list_id))
    assert resp.status_code == 201, resp.json
    return resp.json


def set_status(db, campaign_id, status):
    db.execute(update(Campaign).where(Campaign.id == campaign_id).values(status=status))
    db.commit()


def assert_error(resp, status, *fields):
    assert resp.status_code == status, resp.get_data(as_text=True)
    err = resp.json["error"]
    assert set(err) == {"code", "message", "details"} and err["message"]
    for field in fields:
        assert field in err["details"], (field, err["details"])
    return err


# --------------------------------------------------------------------------- create and read


def test_create_and_read_back(api, list_id):
    resp = api.post("/api/v1/campaigns", json=body(list_id))
    assert resp.status_code == 201
    c = resp.json
    assert resp.headers["Location"].endswith(f"/api/v1/campaigns/{c['id']}")
    assert c["status"] == "draft" and c["status_reason"] is None
    assert c["name"] == "Welcome series" and c["list_id"] == list_id
    assert (c["from_email"], c["from_name"], c["reply_to"]) == ("team@example.com", "The Team", "support@example.com")
    # days are kept in week order; the fallback zone defaults to UTC
    assert c["send_window"] == {"start": "09:00", "end": "17:30", "days": ["mon", "tue", "fri"],
                                "timezone": "contact", "fallback_timezone": "UTC"}
    assert c["limits"]["sender"]["warmup"] == {"start": 20, "increment": 10}
    assert c["stop_on"] == ["reply", "click"]
    assert c["tracking"] == {"opens": True, "clicks": False}
    assert c["max_attempts"] == 7
    assert c["created_at"].endswith("Z") and c["launched_at"] is None and c["finished_at"] is None
    assert set(c["stats"]) >= STAT_KEYS | {"enrolled"}
    assert set(c["stats"]["rates"]) == RATE_KEYS
    assert [s["position"] for s in c["steps"]] == [0, 1, 2]
    assert [s["type"] for s in c["steps"]] == ["email", "wait", "email"]
    first, wait, last = c["steps"]
    assert first["subject"] == "Hi {{ contact.first_name }}" and first["text"] == "Hello {{ contact.email }}"
    assert wait["seconds"] == 86400 and wait["subject"] is None and wait["html"] is None
    assert last["text"] is None and last["seconds"] is None
    assert all(set(s["stats"]) >= STAT_KEYS and s["stats"]["sent"] == 0 for s in c["steps"])

    again = api.get(f"/api/v1/campaigns/{c['id']}")
    assert again.status_code == 200
    assert again.json == c


def test_defaults(api, list_id):
    resp = api.post("/api/v1/campaigns", json={
        "name": "Minimal", "list_id": list_id, "from_email": "Team@Example.COM",
        "steps": [{"type": "email", "subject": "s", "html": "<p>h</p>", "text": "  "}],
    })
    assert resp.status_code == 201, resp.json
    c = resp.json
    assert c["from_email"] == "Team@example.com"  # the domain is normalised
    assert c["from_name"] is None and c["reply_to"] is None and c["send_window"] is None
    assert c["limits"] == {} and c["stop_on"] == ["reply"]
    assert c["tracking"] == {"opens": True, "clicks": True} and c["max_attempts"] == 5
    assert c["steps"][0]["text"] is None  # blank text: derived from the HTML when sent


def test_window_crossing_midnight_is_allowed(api, list_id):
    window = {"start": "22:00", "end": "06:00", "days": ["sat"], "timezone": "America/New_York",
              "fallback_timezone": "Europe/Paris"}
    resp = api.post("/api/v1/campaigns", json=body(list_id, send_window=window))
    assert resp.status_code == 201, resp.json
    assert resp.json["send_window"] == window


def test_stats_come_from_the_ledger(api, db, campaign):
    contact_id = make_contact(db, api.workspace_id, "s@example.com")
    enrollment = Enrollment(workspace_id=api.workspace_id, campaign_id=campaign["id"], contact_id=contact_id)
    db.add(enrollment)
    db.flush()
    step_id = campaign["steps"][0]["id"]
    now = utcnow()
    db.add_all([
        Message(workspace_id=api.workspace_id, campaign_id=campaign["id"], enrollment_id=enrollment.id,
                step_id=step_id, contact_id=contact_id, email="s@example.com", message_key=uuid.uuid4().hex,
                status="delivered", sent_at=now, delivered_at=now, opened_at=now),
        Message(workspace_id=api.workspace_id, campaign_id=campaign["id"], step_id=step_id,
                email="t@example.com", message_key=uuid.uuid4().hex, status="sent", sent_at=now, is_test=True),
    ])
    db.commit()
    c = api.get(f"/api/v1/campaigns/{campaign['id']}").json
    assert c["stats"]["enrolled"] == 1
    assert (c["stats"]["sent"], c["stats"]["delivered"], c["stats"]["opened"]) == (1, 1, 1)
    assert c["stats"]["rates"]["opened"] == 1.0
    assert c["steps"][0]["stats"]["sent"] == 1
    assert c["steps"][2]["stats"]["sent"] == 0


# --------------------------------------------------------------------------- list


def test_list_filters_and_pages(api, other_api, db, list_id):
    ids = [api.post("/api/v1/campaigns", json=body(list_id, name=f"c{i}")).json["id"] for i in range(3)]
    other_list = make_list(db, other_api.workspace_id)
    other_api.post("/api/v1/campaigns", json=body(other_list))
    set_status(db, ids[1], "running")

    everything = api.get("/api/v1/campaigns")
    assert everything.status_code == 200
    assert [c["id"] for c in everything.json["items"]] == ids and everything.json["next_cursor"] is None
    assert everything.json["items"][0]["steps"][0]["position"] == 0

    assert [c["id"] for c in api.get("/api/v1/campaigns?status=running").json["items"]] == [ids[1]]
    assert [c["id"] for c in api.get("/api/v1/campaigns?status=draft").json["items"]] == [ids[0], ids[2]]

    page = api.get("/api/v1/campaigns?limit=2").json
    assert [c["id"] for c in page["items"]] == ids[:2] and page["next_cursor"]
    rest = api.get(f"/api/v1/campaigns?limit=2&cursor={page['next_cursor']}").json
    assert [c["id"] for c in rest["items"]] == ids[2:] and rest["next_cursor"] is None

    assert_error(api.get("/api/v1/campaigns?status=bogus"), 400, "status")
    assert_error(api.get("/api/v1/campaigns?cursor=!!!"), 400)
    assert_error(api.get("/api/v1/campaigns?limit=0"), 400)


# --------------------------------------------------------------------------- update


def test_update_while_draft(api, db, campaign):
    old_step_ids = [s["id"] for s in campaign["steps"]]
    resp = api.patch(f"/api/v1/campaigns/{campaign['id']}", json={
        "name": "  Renamed  ",
        "reply_to": None,
        "send_window": None,
        "steps": [{"type": "wait", "seconds": 60},
                  {"type": "email", "subject": "New {{ campaign.name }}", "html": "<p>new</p>"}],
    })
    assert resp.status_code == 200, resp.json
    c = resp.json
    assert c["name"] == "Renamed" and c["reply_to"] is None and c["send_window"] is None
    assert c["from_email"] == campaign["from_email"] and c["limits"] == campaign["limits"]  # untouched
    assert c["max_attempts"] == 7 and c["stop_on"] == ["reply", "click"]
    assert [(s["position"], s["type"]) for s in c["steps"]] == [(0, "wait"), (1, "email")]
    assert not {s["id"] for s in c["steps"]} & set(old_step_ids)
    positions = db.scalars(select(Step.position).where(Step.campaign_id == campaign["id"]).order_by(Step.position))
    assert positions.all() == [0, 1]
    db.rollback()  # end the read: on SQLite every transaction holds the write lock
    assert api.get(f"/api/v1/campaigns/{campaign['id']}").json == c

    # a field-less patch changes nothing; a partial nested object is still checked whole
    assert api.patch(f"/api/v1/campaigns/{campaign['id']}", json={}).json["name"] == "Renamed"
    assert_error(api.patch(f"/api/v1/campaigns/{campaign['id']}", json={"send_window": {"start": "09:00"}}),
                 422, "send_window.end", "send_window.days", "send_window.timezone")
    assert_error(api.patch(f"/api/v1/campaigns/{campaign['id']}", json={"steps": []}), 422, "steps")
    assert_error(api.patch(f"/api/v1/campaigns/{campaign['id']}", json={"name": None}), 422, "name")


@pytest.mark.parametrize("status", ["running", "paused", "completed", "cancelled"])
def test_only_a_draft_can_be_edited(api, db, campaign, status):
    set_status(db, campaign["id"], status)
    err = assert_error(api.patch(f"/api/v1/campaigns/{campaign['id']}", json={"name": "x"}), 409, "status")
    assert err["details"]["status"] == status and status in err["message"]
    assert api.get(f"/api/v1/campaigns/{campaign['id']}").json["name"] == "Welcome series"


# --------------------------------------------------------------------------- delete


@pytest.mark.parametrize("status,code", [("draft", 204), ("completed", 204), ("cancelled", 204),
                                         ("running", 409), ("paused", 409)])
def test_delete_rules(api, db, campaign, status, code):
    set_status(db, campaign["id"], status)
    resp = api.delete(f"/api/v1/campaigns/{campaign['id']}")
    assert resp.status_code == code, resp.get_data(as_text=True)
    after = api.get(f"/api/v1/campaigns/{campaign['id']}")
    if code == 204:
        assert resp.data == b""
        assert after.status_code == 404
        assert db.scalar(select(Step.id).where(Step.campaign_id == campaign["id"])) is None
    else:
        assert resp.json["error"]["details"]["status"] == status
        assert after.status_code == 200


def test_delete_takes_the_ledger_with_it(api, db, campaign):
    contact_id = make_contact(db, api.workspace_id, "gone@example.com")
    enrollment = Enrollment(workspace_id=api.workspace_id, campaign_id=campaign["id"], contact_id=contact_id)
    db.add(enrollment)
    db.flush()
    db.add(Message(workspace_id=api.workspace_id, campaign_id=campaign["id"], enrollment_id=enrollment.id,
                   step_id=campaign["steps"][0]["id"], contact_id=contact_id, email="gone@example.com",
                   message_key=uuid.uuid4().hex, status="delivered"))
    db.commit()
    set_status(db, campaign["id"], "completed")
    assert api.delete(f"/api/v1/campaigns/{campaign['id']}").status_code == 204
    db.expire_all()
    assert db.scalar(select(Message.id).where(Message.campaign_id == campaign["id"])) is None
    assert db.scalar(select(Enrollment.id).where(Enrollment.campaign_id == campaign["id"])) is None
    assert db.get(Contact, contact_id) is not None


# --------------------------------------------------------------------------- workspaces


def test_other_workspaces_campaigns_are_invisible(api, other_api, campaign):
    path = f"/api/v1/campaigns/{campaign['id']}"
    assert_error(other_api.get(path), 404)
    assert_error(other_api.patch(path, json={"name": "mine now"}), 404)
    assert_error(other_api.delete(path), 404)
    assert_error(other_api.post(path + "/preview", json={}), 404)
    assert other_api.get("/api/v1/campaigns").json["items"] == []
    assert api.get(path).json["name"] == "Welcome series"
    assert_error(api.get("/api/v1/campaigns/999999"), 404)
    assert_error(api.get("/api/v1/campaigns/99999999999999999999999"), 404)
    assert_error(api.delete("/api/v1/campaigns/0"), 404)
    assert_error(api.get("/api/v1/campaigns/abc"), 404)


def test_list_of_another_workspace_is_refused(api, other_api, db, campaign):
    foreign = make_list(db, other_api.workspace_id)
    err = assert_error(api.post("/api/v1/campaigns", json=body(foreign)), 422, "list_id")
    assert str(foreign) in err["details"]["list_id"][0]
    assert_error(api.post("/api/v1/campaigns", json=body(123456789)), 422, "list_id")
    assert_error(api.patch(f"/api/v1/campaigns/{campaign['id']}", json={"list_id": foreign}), 422, "list_id")


def test_unauthenticated(client, campaign):
    assert_error(client.get("/api/v1/campaigns"), 401)
    assert_error(client.post("/api/v1/campaigns", json={}), 401)
    assert_error(client.get(f"/api/v1/campaigns/{campaign['id']}"), 401)


# --------------------------------------------------------------------------- every refusal


def _set(path, value):
    """A body mutation: set (or with value=DROP, remove) the key at a dotted path like 'steps.1.seconds'."""

    def mutate(data):
        keys = path.split(".")
        target = data
        for key in keys[:-1]:
            target = target[int(key)] if isinstance(target, list) else target[key]
        last = keys[-1]
        if value is DROP:
            del target[last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
        return data

    return mutate


DROP = object()

INVALID = [
    # top level
    ("name", DROP, "name"),
    ("name", "   ", "name"),
    ("name", 42, "name"),
    ("name", "x" * 201, "name"),
    ("list_id", DROP, "list_id"),
    ("list_id", "1", "list_id"),
    ("list_id", 1.5, "list_id"),
    ("list_id", True, "list_id"),
    ("list_id", 0, "list_id"),
    ("list_id", 2**64, "list_id"),
    ("name", "a\x00b", "name"),
    ("steps.0.html", "<p>\x00</p>", "steps[0].html"),
    # a lone surrogate is no UTF-8: the driver refused it with a 500
    ("name", "a\ud800b", "name"),
    ("from_name", "\udfff", "from_name"),
    ("steps.0.subject", "Hi \ud83d", "steps[0].subject"),
    ("steps.0.html", "<p>\ud800</p>", "steps[0].html"),
    ("from_email", DROP, "from_email"),
    ("from_email", "not-an-email", "from_email"),
    ("from_email", "Team <team@example.com>", "from_email"),
    ("from_email", ["a@example.com"], "from_email"),
    ("reply_to", "nope@", "reply_to"),
    ("from_name", 12, "from_name"),
    ("surprise", 1, "surprise"),
    ("max_attempts", 0, "max_attempts"),
    ("max_attempts", 21, "max_attempts"),
    ("max_attempts", "5", "max_attempts"),
    # stop_on / tracking
    ("stop_on", ["reply", "bounce"], "stop_on[1]"),
    ("stop_on", "reply", "stop_on"),
    ("stop_on", ["open", "open"], "stop_on"),
    ("tracking", {"opens": "yes"}, "tracking.opens"),
    ("tracking", {"opens": 1}, "tracking.opens"),
    ("tracking", {"pixels": True}, "tracking.pixels"),
    ("tracking", [True], "tracking"),
    # send window
    ("send_window", "9-5", "send_window"),
    ("send_window.start", "9:00", "send_window.start"),
    ("send_window.start", "24:00", "send_window.start"),
    ("send_window.end", "17:60", "send_window.end"),
    ("send_window.end", "09:00", "send_window.end"),  # start == end
    ("send_window.end", 1700, "send_window.end"),
    ("send_window.days", [], "send_window.days"),
    ("send_window.days", ["mon", "mon"], "send_window.days"),
    ("send_window.days", ["monday"], "send_window.days[0]"),
    ("send_window.days", "mon", "send_window.days"),
    ("send_window.days", DROP, "send_window.days"),
    ("send_window.timezone", "Mars/Olympus", "send_window.timezone"),
    ("send_window.timezone", "../../etc/passwd", "send_window.timezone"),
    ("send_window.timezone", "", "send_window.timezone"),
    ("send_window.timezone", DROP, "send_window.timezone"),
    ("send_window.fallback_timezone", "contact", "send_window.fallback_timezone"),
    ("send_window.fallback_timezone", "Nowhere", "send_window.fallback_timezone"),
    ("send_window.hours", 8, "send_window.hours"),
    # limits
    ("limits", 60, "limits"),
    ("limits.per_minute", 0, "limits.per_minute"),
    ("limits.per_minute", -5, "limits.per_minute"),
    ("limits.per_day", 2.5, "limits.per_day"),
    ("limits.per_day", "100", "limits.per_day"),
    ("limits.per_hour", 10, "limits.per_hour"),
    ("limits.sender", 5, "limits.sender"),
    ("limits.sender.daily_cap", 0, "limits.sender.daily_cap"),
    ("limits.sender.warmup", {"start": 10}, "limits.sender.warmup.increment"),
    ("limits.sender.warmup", {"start": 0, "increment": 1}, "limits.sender.warmup.start"),
    ("limits.sender.warmup", {"start": 1, "increment": "2"}, "limits.sender.warmup.increment"),
    ("limits.sender.min_gap_seconds", -1, "limits.sender.min_gap_seconds"),
    ("limits.sender.max_gap_seconds", 10, "limits.sender.max_gap_seconds"),  # below min_gap_seconds (30)
    ("limits.sender.jitter", 1, "limits.sender.jitter"),
    # steps
    ("steps", DROP, "steps"),
    ("steps", [], "steps"),
    ("steps", "email", "steps"),
    ("steps", {"type": "email"}, "steps"),
    ("steps", [{"type": "wait", "seconds": 10}], "steps"),  # no email step
    ("steps", [{"type": "email", "subject": "s", "html": "h"}] * 101, "steps"),
    ("steps.0", "email", "steps[0]"),
    ("steps.0", None, "steps[0]"),
    ("steps.0.type", "sms", "steps[0].type"),
    ("steps.0.type", DROP, "steps[0].type"),
    ("steps.0.subject", DROP, "steps[0].subject"),
    ("steps.0.subject", "", "steps[0].subject"),
    ("steps.0.html", DROP, "steps[0].html"),
    ("steps.0.html", ["<p>"], "steps[0].html"),
    ("steps.0.seconds", 5, "steps[0].seconds"),
    ("steps.0.cc", "x@example.com", "steps[0].cc"),
    ("steps.1.seconds", 0, "steps[1].seconds"),
    ("steps.1.seconds", 366 * 86400, "steps[1].seconds"),
    ("steps.1.seconds", "60", "steps[1].seconds"),
    ("steps.1.seconds", DROP, "steps[1].seconds"),
    ("steps.1.subject", "wait steps have no subject", "steps[1].subject"),
    # templates
    ("steps.2.html", "<p>\n{% if contact.first_name %}\n", "steps[2].html"),
    ("steps.2.subject", "Hi {{ contact.phone }}", "steps[2].subject"),
    ("steps.0.text", "line one\n{{ ''.__class__.__mro__ }}", "steps[0].text"),
    ("steps.0.html", "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "steps[0].html"),
    ("steps.0.html", "{% if 1 %}" * 150 + "{% endif %}" * 150, "steps[0].html"),
]


@pytest.mark.parametrize("path,value,field", INVALID, ids=[f"{p}={v!r}"[:60] for p, v, _ in INVALID])
def test_every_invalid_field_is_a_422_naming_it(api, list_id, path, value, field):
    data = _set(path, value)(copy.deepcopy(body(list_id)))
    err = assert_error(api.post("/api/v1/campaigns", json=data), 422, field)
    assert err["code"] == "validation_failed"
    assert all(isinstance(v, list) and v and all(isinstance(m, str) for m in v) for v in err["details"].values())


def test_all_problems_come_back_at_once(api, list_id):
    data = body(list_id, name="", max_attempts=0)
    data["send_window"]["days"] = ["someday"]
    data["steps"][1]["seconds"] = -1
    err = assert_error(api.post("/api/v1/campaigns", json=data), 422,
                       "name", "max_attempts", "send_window.days[0]", "steps[1].seconds")
    assert "and 3 more problems" in err["message"]


def test_template_errors_name_the_step_and_line(api, list_id):
    data = body(list_id)
    data["steps"][2]["html"] = "<p>one</p>\n<p>two</p>\n<p>{{ contact.first_name }</p>"
    err = assert_error(api.post("/api/v1/campaigns", json=data), 422, "steps[2].html")
    assert err["details"]["steps[2].html"][0].startswith("line 3: ")
    assert "steps[2].html" in err["message"] and "line 3" in err["message"]

    data = body(list_id)
    data["steps"][0]["html"] = "<p>Hi</p>\n\n\n<p>{{ contact.phone }}</p>"
    data["steps"][0]["text"] = "{{ discount }}"
    err = assert_error(api.post("/api/v1/campaigns", json=data), 422, "steps[0].html", "steps[0].text")
    assert err["details"]["steps[0].html"][0].startswith("line 4: unknown variable 'contact.phone'")
    assert err["details"]["steps[0].text"][0].startswith("line 1: unknown variable 'discount'")


@pytest.mark.parametrize("payload", [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ lipsum.__globals__ }}",
    "{{ contact.fields | attr('__class__') }}",
])
def test_injection_payloads_are_refused(api, list_id, campaign, payload):
    data = body(list_id)
    data["steps"][0]["subject"] = payload
    assert_error(api.post("/api/v1/campaigns", json=data), 422, "steps[0].subject")
    assert_error(api.patch(f"/api/v1/campaigns/{campaign['id']}", json={"steps": data["steps"]}),
                 422, "steps[0].subject")


@pytest.mark.parametrize("method", ["post", "patch"])
def test_bad_bodies_are_4xx_never_500(api, campaign, method):
    path = "/api/v1/campaigns" if method == "post" else f"/api/v1/campaigns/{campaign['id']}"
    call = getattr(api, method)
    assert_error(call(path), 400)
    assert_error(call(path, data="{not json", content_type="application/json"), 400)
    assert_error(call(path, data="name=x", content_type="application/x-www-form-urlencoded"), 400)
    assert_error(call(path, json=[1, 2]), 400)
    assert_error(call(path, json="a string"), 400)
    assert_error(call(path, json=None), 400)
    assert_error(call(path, data=b"\xff\xfe\x00", content_type="application/json"), 400)
    assert_error(call(path, data="[" * 100_000, content_type="application/json"), 400)
    assert_error(call(path, json={"steps": [[1, 2], 3, {"type": ["email"]}]}), 422)
    assert_error(call(path, json={"send_window": {"start": None, "end": {}, "days": [None], "timezone": 5}}), 422)
    assert_error(call(path, json={"limits": {"sender": {"warmup": [1]}}}), 422, "limits.sender.warmup")


# --------------------------------------------------------------------------- preview


def test_preview_for_a_contact(api, db, campaign):
    contact_id = make_contact(db, api.workspace_id, "eve@example.com", first_name="<b>Eve</b>",
                              fields={"company": "Evil & Co"})
    resp = api.post(f"/api/v1/campaigns/{campaign['id']}/preview", json={"step": 2, "contact_id": contact_id})
    assert resp.status_code == 200, resp.json
    p = resp.json
    assert p["step"] == 2 and p["contact"] == {"id": contact_id, "email": "eve@example.com"}
    assert p["subject"] == "Still there?" and p["html"] == "<p>Evil &amp; Co</p>" and p["text"] == "Evil & Co"
    assert p["errors"] == {}

    # by email, and the first email step by default; html escaped, subject/text not
    p = api.post(f"/api/v1/campaigns/{campaign['id']}/preview", json={"email": "EVE@example.com"}).json
    assert p["step"] == 0 and p["contact"]["id"] == contact_id
    assert p["subject"] == "Hi <b>Eve</b>" and p["html"] == "<p>Hello eve@example.com</p>"


def test_preview_with_a_sample_contact_and_unsaved_templates(api, campaign):
    path = f"/api/v1/campaigns/{campaign['id']}/preview"
    p = api.post(path, json={}).json
    assert p["contact"] == {"id": None, "email": "jane.doe@example.com"} and p["subject"] == "Hi Jane"

    p = api.post(path, json={"subject": "{{ campaign.name }}", "html": '<a href="{{ unsubscribe_url }}">Bye</a>'}).json
    assert p["step"] is None and p["subject"] == "Welcome series"
    assert p["text"].startswith("Bye (http") and "/u/preview" in p["text"]

    p = api.post(path, json={"email": "new@example.com", "step": 0, "html": "<p>{{ contact.first_name }}!</p>"}).json
    assert p["contact"] == {"id": None, "email": "new@example.com"} and p["html"] == "<p>!</p>"


def test_preview_reports_template_errors_with_200(api, campaign):
    path = f"/api/v1/campaigns/{campaign['id']}/preview"
    resp = api.post(path, json={"step": 0, "html": "<p>\n{{ contact.phone }}</p>", "subject": "{% if %}"})
    assert resp.status_code == 200
    assert resp.json["html"] is None and resp.json["subject"] is None
    assert resp.json["errors"]["html"][0].startswith("line 2: unknown variable 'contact.phone'")
    assert resp.json["errors"]["subject"][0].startswith("line 1: ")
    p = api.post(path, json={"step": 0, "html": "{{ ''.__class__ }}"}).json
    assert list(p["errors"]) == ["html"]


def test_preview_refusals(api, other_api, db, campaign):
    path = f"/api/v1/campaigns/{campaign['id']}/preview"
    assert_error(api.post(path, json={"step": 9}), 422, "step")
    assert_error(api.post(path, json={"step": 1}), 422, "step")  # a wait step
    assert_error(api.post(path, json={"step": -1}), 422, "step")
    assert_error(api.post(path, json={"step": "0"}), 422, "step")
    assert_error(api.post(path, json={"nope": 1}), 422, "nope")
    assert_error(api.post(path, json={"contact_id": 1, "email": "a@example.com"}), 422, "email")
    foreign = make_contact(db, other_api.workspace_id, "foreign@example.com")
    assert_error(api.post(path, json={"contact_id": foreign}), 404)
    assert_error(api.post(path, json={"contact_id": 2**70}), 422, "contact_id")
    assert_error(api.post(path, json={"email": "a\x00@example.com"}), 422, "email")
    assert_error(api.post(path, json=[1]), 400)
    assert_error(api.post(path, data="x", content_type="text/plain"), 415)  # issue 18.8: not read as JSON
