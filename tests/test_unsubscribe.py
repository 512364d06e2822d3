"""Unsubscribe: the confirm page, RFC 8058 one-click, and no email after the POST returns."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest
from sqlalchemy import select

from campaigns.db import utcnow
from campaigns.models import Contact, Message, Suppression
from campaigns.tokens import unsubscribe_token
from tasks import huey
from tests.helpers import drain, launched_campaign, make_contacts

ONE_CLICK = "List-Unsubscribe=One-Click"
STEPS = [
    {"type": "email", "subject": "Hello {{ contact.first_name }}",
     "html": '<p>Hi</p><p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>'},
    {"type": "wait", "seconds": 2},
    {"type": "email", "subject": "Following up", "html": "<p>Again</p>"},
]



def path_of(list_unsubscribe: str) -> str:
    """The /u/<token> path of a List-Unsubscribe header (``<https://...>``, the HTTPS URL first)."""
    url = list_unsubscribe.split(",")[0].strip().strip("<>")
    return urlsplit(url).path


def one_click(client, path):
    # What a mail client's server sends: the form body only, no cookie, no CSRF token.
    return client.post(path, data=ONE_CLICK, content_type="application/x-www-form-urlencoded")


def test_one_click_unsubscribe_then_the_due_step_is_never_sent(api, client, db, sink):
    list_id = make_contacts(api, 3)
    cid = launched_campaign(api, list_id, steps=STEPS)
    drain(huey, until=lambda: len(sink.accepted()) >= 3, timeout=60)

    first = next(m for m in sink.accepted() if m["to"][0] == "person0@example.com")
    assert first["headers"]["List-Unsubscribe-Post"] == ONE_CLICK
    path = path_of(first["headers"]["List-Unsubscribe"])
    assert path.startswith("/u/")
    assert path in (first.get("html") or "")  # the visible link is the same URL

    resp = one_click(client, path)
    returned = time.time()
    assert resp.status_code == 200
    assert "set-cookie" not in {k.lower() for k in resp.headers.keys()}
    suppressed_at = db.scalar(select(Suppression.created_at).where(Suppression.email == "person0@example.com"))
    assert suppressed_at is not None and suppressed_at <= utcnow()

    # the second step comes due (2 s wait) for everyone; person0's must not be sent
    drain(huey, until=lambda: api.get(f"/api/v1/campaigns/{cid}").json["status"] == "completed", timeout=60)
    to_person0 = [m for m in sink.messages() if m["to"][0] == "person0@example.com"]
    assert len(to_person0) == 1 and to_person0[0]["time"] < returned  # time to suppress: before; sends after: 0
    assert len(sink.accepted()) == 5

    db.expire_all()
    first_step = db.scalar(select(Message.step_id).where(Message.message_key == first["custom_args"]["message_key"]))
    second = db.scalars(select(Message.status).where(Message.email == "person0@example.com",
                                                     Message.step_id != first_step)).all()
    assert second == ["cancelled"]
    assert db.scalar(select(Contact.status).where(Contact.email == "person0@example.com")) == "unsubscribed"
    assert db.scalar(select(Suppression.reason).where(Suppression.email == "person0@example.com")) == "unsubscribe"
    stats = api.get(f"/api/v1/campaigns/{cid}").json["stats"]
    assert stats["unsubscribed"] == 1 and stats["sent"] == 5


def test_the_confirm_page_and_its_button(api, client, db):
    token = unsubscribe_token(api.workspace_id, "Someone@Example.com", "k" * 32)
    page = client.get(f"/u/{token}")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "someone@example.com" in html
    assert 'method="post"' in html and f'action="/u/{token}"' in html
    assert '<button type="submit">Unsubscribe</button>' in html
    assert 'name="List-Unsubscribe" value="One-Click"' in html
    assert "set-cookie" not in {k.lower() for k in page.headers.keys()}
    assert page.headers["Cache-Control"] == "no-store" and page.headers["Referrer-Policy"] == "no-referrer"
    assert db.scalar(select(Suppression.id)) is None  # a GET changes nothing

    # the button posts the form (no CSRF token needed)
    done = client.post(f"/u/{token}", data={"List-Unsubscribe": "One-Click"})
    assert done.status_code == 200 and "You are unsubscribed" in done.get_data(as_text=True)
    assert db.execute(select(Suppression.workspace_id, Suppression.email, Suppression.reason)).all() == [
        (api.workspace_id, "someone@example.com", "unsubscribe")]
    # again: still fine, still one row, and the page says so
    assert one_click(client, f"/u/{token}").status_code == 200
    assert len(db.scalars(select(Suppression)).all()) == 1
    assert "already unsubscribed" in client.get(f"/u/{token}").get_data(as_text=True)


@pytest.mark.parametrize("method", ["get", "post"])
def test_a_bad_token_is_a_404_page(api, client, db, method):
    good = unsubscribe_token(api.workspace_id, "a@example.com", None)
    for token in ("nonsense", good[:-2] + ("AA" if not good.endswith("AA") else "BB"),
                  unsubscribe_token(987654321, "a@example.com", None)):  # a workspace that does not exist
        resp = getattr(client, method)(f"/u/{token}", data=ONE_CLICK if method == "post" else None,
                                       content_type="application/x-www-form-urlencoded")
        assert resp.status_code == 404, token
        assert "not valid" in resp.get_data(as_text=True)
    assert db.scalar(select(Suppression.id)) is None


def test_unsubscribing_sets_the_message_first_seen_once(api, client, db, sink):
    list_id = make_contacts(api, 1)
    cid = launched_campaign(api, list_id, steps=STEPS[:1])
    drain(huey, until=lambda: api.get(f"/api/v1/campaigns/{cid}").json["status"] == "completed", timeout=60)
    msg = db.scalars(select(Message)).one()
    path = path_of(sink.accepted()[0]["headers"]["List-Unsubscribe"])
    one_click(client, path)
    db.expire_all()
    first = db.get(Message, msg.id).unsubscribed_at
    assert first is not None
    one_click(client, path)
    db.expire_all()
    assert db.get(Message, msg.id).unsubscribed_at == first
    assert api.get(f"/api/v1/campaigns/{cid}").json["stats"]["unsubscribed"] == 1
