"""The web UI in a real browser (Debian's Chromium through Playwright) against a live server
(gunicorn), a real consumer (huey_consumer) and the local SendGrid sink.

The web server is started once for the module. The consumer is started for each test: the
engine keeps a per-process cache keyed by campaign id, and ``tests/conftest.py`` restarts ids at
1 before every test, so a consumer that outlived a test could mistake a new campaign for an old
one. Both run with this run's environment (conftest already points it at the test database,
queue and sink), log to files in the test instance folder and are stopped with SIGTERM.
"""

from __future__ import annotations

import sys
import time
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import select

from campaigns.db import session_scope
from campaigns.models import Campaign, Message
from tests.helpers import ServiceProcess, consumer_command, free_port, make_workspace

pytestmark = pytest.mark.browser
playwright = pytest.importorskip("playwright.sync_api")
expect = playwright.expect

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PASSWORD = "browser-pass-1"


Server = ServiceProcess


def wait_http(url: str, server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"{url}: the server exited\n{server.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout} s\n{server.tail()}")


@pytest.fixture(scope="module")
def live(database, sink_server):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # PUBLIC_URL is this server, as in a deployment: the links in emails (unsubscribe) lead here.
    web = Server("web", [str(BIN / "gunicorn"), "-k", "gthread", "-w", "1", "--threads", "8",
                         "-b", f"127.0.0.1:{port}", "wsgi:app"], env={"PUBLIC_URL": base})
    try:
        wait_http(f"{base}/healthz", web)
        yield base
    finally:
        web.stop()


@pytest.fixture
def consumer(live):
    worker = Server("consumer", consumer_command(4), env={"PUBLIC_URL": live})
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def browser(live):
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(15_000)
    yield tab
    context.close()


def sign_in(page, base: str) -> int:
    """A fresh workspace and user; signs in with the keyboard only (the email field has focus).
    Returns the workspace's id."""
    workspace_id, _, _, email = make_workspace(password=PASSWORD)
    page.goto(base + "/login")
    expect(page.locator('input[name="email"]')).to_be_focused()  # typing before the focus lands loses keys
    page.keyboard.type(email)
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    expect(page.locator('input[name="email"]')).to_have_value(email)
    page.keyboard.press("Enter")
    try:
        page.wait_for_url(base + "/")
    except playwright.Error as exc:  # say what the sign-in page answered (a 401, a 429, an error page)
        raise AssertionError(f"sign-in stayed at {page.url}: {page.locator('body').inner_text()[:500]!r}") from exc
    expect(page.locator("h1")).to_have_text("Campaigns")
    return workspace_id


def campaign_id_from(page) -> int:
    return int(page.url.rstrip("/").split("/campaigns/")[1].split("/")[0].split("?")[0])


def test_import_build_preview_launch_and_watch_it_complete_live(page, live, consumer, sink):
    base = live
    sign_in(page, base)

    # CSV import: a bad row is reported with its line number, the good ones stored
    page.click("nav >> text=Contacts")
    page.click("text=Import CSV")
    csv = b"email,first_name\nada@example.com,Ada\ngrace@example.com,Grace\nnot-an-email,Bad\nalan@example.com,Alan\n"
    page.set_input_files("#file", files=[{"name": "people.csv", "mimeType": "text/csv", "buffer": csv}])
    page.fill("#new_list", "Browser list")
    page.click("text=Upload and import")
    expect(page.locator("[data-import-status]")).to_have_text("done")
    expect(page.locator('[data-import-count="created"]')).to_have_text("3")
    report = page.locator("[data-import-errors] tr")
    expect(report).to_have_count(1)
    expect(report.first).to_contain_text("4")
    expect(report.first).to_contain_text("invalid email address 'not-an-email'")
    assert page.eval_on_selector("[data-import-progress]", "p => p.value") == 1

    # a two-step campaign with a short wait
    page.click("nav >> text=Campaigns")
    page.click("text=New campaign")
    page.fill("#name", "Browser campaign")
    page.select_option("#list_id", label="Browser list")
    page.fill("#from_email", "team@example.com")
    page.click("text=Create draft")
    expect(page.locator(".flash-success")).to_contain_text("Draft created")
    page.click("text=+ Wait step")
    page.fill("#steps-1-amount", "3")
    page.select_option("#steps-1-unit", "seconds")
    page.click("text=+ Email step")
    expect(page.locator("#steps-2-subject")).to_have_value("Following up")

    # the live preview, rendered for the first contact of the list as one types
    page.fill("#steps-0-subject", "Hi {{ contact.first_name }}!")
    expect(page.locator("#step-0 [data-preview-subject]")).to_have_text("Hi Ada!")
    page.select_option("#preview_contact", label="grace@example.com (Grace)")
    expect(page.locator("#step-0 [data-preview-subject]")).to_have_text("Hi Grace!")
    frame = page.frame_locator("#step-2 [data-preview-html]")
    expect(frame.locator("body")).to_contain_text("Hi Grace")
    # a template error is shown at its line, and the editor can jump to it
    page.fill("#steps-0-html", "<p>Hello</p>\n<p>{{ contact.first_name }</p>")
    error = page.locator("#step-0 [data-preview-errors] .template-error")
    expect(error).to_contain_text("HTML, line 2:")
    expect(error.locator(".excerpt .bad")).to_contain_text("{{ contact.first_name }</p>")
    error.locator("text=Go to line 2").click()
    assert page.evaluate("document.activeElement.id") == "steps-0-html"
    page.fill("#steps-0-html", "<p>Hello {{ contact.first_name }}</p>")
    expect(error).to_have_count(0)
    expect(page.frame_locator("#step-0 [data-preview-html]").locator("body")).to_have_text("Hello Grace")
    page.click(".savebar >> text=Save draft")
    expect(page.locator(".flash-success")).to_have_text("Draft saved.")

    # what launch will do, then launch
    page.click(".page-head >> text=Review and launch…")
    expect(page.locator(".big-line")).to_contain_text("3 contacts will be enrolled from Browser list")
    page.click("text=Launch now")
    page.wait_for_url(f"{base}/campaigns/*")
    cid = campaign_id_from(page)

    # live progress: the numbers change and the campaign completes, with no navigation
    navigations = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url) if frame == page.main_frame else None)
    page.evaluate("window.__stillTheSamePage = true")
    page.evaluate("document.querySelector('#campaign-live').setAttribute('data-follow-every', '300')")
    sent = page.locator('.stats [data-stat="sent"]')
    first_seen = int(sent.inner_text())
    expect(page.locator("[data-live]")).to_be_visible()
    expect(page.locator("h1 [data-status-badge]")).to_have_text("completed", timeout=45_000)
    expect(sent).to_have_text("6")
    assert first_seen < 6
    expect(page.locator('.stats [data-stat="enrolled"]')).to_have_text("3")
    expect(page.locator("[data-progress-text]")).to_contain_text("6 of 6 emails handled (100%)")
    expect(page.locator(".flash-success")).to_be_hidden()  # "Launched: …" is stale once it has completed
    expect(page.locator("[data-chart] svg")).to_be_visible()
    expect(page.locator("[data-chart] figcaption")).to_contain_text("6 in all")
    expect(page.locator(".controls >> text=Pause")).to_be_hidden()
    assert page.evaluate("window.__stillTheSamePage") is True and navigations == []
    with session_scope() as s:
        assert s.get(Campaign, cid).status == "completed"
    # delivery events go on arriving after the last send: the page keeps following them
    delivered = page.locator('.stats [data-stat="delivered"]')
    expect(delivered).to_have_text("0")
    with session_scope() as s:
        s.execute(Message.__table__.update().where(Message.campaign_id == cid)
                  .values(delivered_at=Message.sent_at, status="delivered"))
    expect(delivered).to_have_text("6", timeout=10_000)
    assert navigations == []

    # a message's details: its attempt, the provider's answer
    page.locator("tbody tr[data-step-id] >> text=Messages").first.click()
    page.locator("tbody a[href^='/messages/']").first.click()
    expect(page.locator("h1")).to_contain_text("Message")
    attempts = page.locator("section:has(h2:text('Attempts')) tbody tr")
    expect(attempts).to_have_count(1)
    expect(attempts.first).to_contain_text("sent")
    expect(attempts.first).to_contain_text("202")
    assert len(sink.accepted()) == 6


def test_dead_letter_replay_pause_resume_and_cancel(page, live, consumer, sink):
    from campaigns import campaign_rules, contacts

    base = live
    ws_id = sign_in(page, base)
    with session_scope() as s:
        lst = contacts.create_list(s, ws_id, "Dead letters list")
        for email in ("one@example.com", "two@example.com", "three@example.com"):
            contact, _ = contacts.upsert_contact(s, ws_id, email)
            contacts.add_list_members(s, ws_id, lst.id, [contact.id])
        campaign = campaign_rules.create_campaign(s, ws_id, {
            "name": "Replay me", "list_id": lst.id, "from_email": "team@example.com",
            "steps": [{"type": "email", "subject": "First", "html": "<p>1</p>"}, {"type": "wait", "seconds": 600},
                      {"type": "email", "subject": "Second", "html": "<p>2</p>"}]})
        cid = campaign.id
    sink.fail_addresses(["two@example.com"], status=400)  # a permanent refusal for one address

    page.goto(f"{base}/campaigns/{cid}")
    page.click(".controls >> text=Review and launch…")
    page.click("text=Launch now")
    page.wait_for_url(f"{base}/campaigns/{cid}")
    expect(page.locator('.stats [data-stat="sent"]')).to_have_text("2")
    expect(page.locator('.stats [data-stat="failed"]')).to_have_text("1")  # live, no reload

    # a form posted without its CSRF token is refused
    page.evaluate("document.querySelector('form[action$=\"/pause\"] input[name=csrf_token]').remove()")
    page.click(".controls >> text=Pause")
    expect(page.locator("h1")).to_have_text("Request refused")
    expect(page.locator("main")).to_contain_text("security token is missing")
    with session_scope() as s:
        assert s.get(Campaign, cid).status == "running"

    # pause and resume
    page.goto(f"{base}/campaigns/{cid}")
    page.click(".controls >> text=Pause")
    expect(page.locator("h1 [data-status-badge]")).to_have_text("paused")
    expect(page.locator("[data-status-reason]")).to_have_text("(paused by a user)")
    page.click(".controls >> text=Resume")
    expect(page.locator("h1 [data-status-badge]")).to_have_text("running")

    # the dead letter: listed with its error, replayed once the address is accepted again
    page.click("nav >> text=Dead letters")
    row = page.locator("tbody tr", has_text="two@example.com")
    expect(row).to_contain_text("failed")
    sink.clear_fail_addresses()
    row.get_by_role("button", name="Replay", exact=True).click()
    expect(page.locator(".flash-success")).to_contain_text("queued again")
    expect(page.locator(".empty")).to_contain_text("No dead letters")
    with session_scope() as s:
        dead_id = s.scalar(select(Message.id).where(Message.email == "two@example.com"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with session_scope() as s:
            if s.get(Message, dead_id).status == "sent":
                break
        time.sleep(0.2)
    page.goto(f"{base}/messages/{dead_id}")
    expect(page.locator("h1 .badge")).to_have_text("sent")
    attempts = page.locator("section:has(h2:text('Attempts')) tbody tr")
    expect(attempts).to_have_count(2)
    expect(attempts.nth(0)).to_contain_text("400")
    expect(attempts.nth(1)).to_contain_text("202")

    # cancel, after a confirmation
    page.goto(f"{base}/campaigns/{cid}")
    expect(page.locator('.stats [data-stat="sent"]')).to_have_text("3")
    page.click(".controls >> text=Cancel…")
    expect(page.locator("h1")).to_have_text("Cancel Replay me?")
    expect(page.locator("main")).to_contain_text("3 scheduled emails will not be sent")
    page.click("text=Cancel campaign")
    expect(page.locator("h1 [data-status-badge]")).to_have_text("cancelled")
    with session_scope() as s:
        assert s.get(Campaign, cid).status == "cancelled"



def test_dead_letters_deleted_one_then_all_after_confirmations(page, live, consumer, sink):
    from campaigns import campaign_rules, contacts, engine

    base = live
    ws_id = sign_in(page, base)
    addresses = ("keep@example.com", "bad1@example.com", "bad2@example.com", "bad3@example.com")
    with session_scope() as s:
        lst = contacts.create_list(s, ws_id, "Delete dead letters list")
        for email in addresses:
            contact, _ = contacts.upsert_contact(s, ws_id, email)
            contacts.add_list_members(s, ws_id, lst.id, [contact.id])
        campaign = campaign_rules.create_campaign(s, ws_id, {
            "name": "Delete my dead letters", "list_id": lst.id, "from_email": "team@example.com",
            "steps": [{"type": "email", "subject": "Hello", "html": "<p>1</p>"}]})
        cid = campaign.id
    sink.fail_addresses(list(addresses[1:]), status=400)
    with session_scope() as s:
        engine.launch(s, ws_id, cid)
    from tasks.engine import fanout_campaign

    fanout_campaign(cid)
    page.goto(f"{base}/campaigns/{cid}")
    expect(page.locator('.stats [data-stat="failed"]')).to_have_text("3")

    # one, from its row: a confirmation page, then back to the dead letters
    page.click("nav >> text=Dead letters")
    row = page.locator("tbody tr", has_text="bad1@example.com")
    row.get_by_role("link", name="Delete…").click()
    expect(page.locator("h1")).to_have_text("Delete the dead letter to bad1@example.com?")
    page.click("text=Delete dead letter")
    expect(page.locator(".flash-success")).to_contain_text("Dead letter to bad1@example.com deleted.")
    expect(page.locator("tbody tr")).to_have_count(2)
    expect(page.locator("tbody")).not_to_contain_text("bad1@example.com")

    # the rest of the campaign's, after a confirmation that counts them; "Keep them" changes nothing
    page.click("text=Delete all 2…")
    expect(page.locator("h1")).to_have_text("Delete 2 dead letters of Delete my dead letters?")
    page.click("text=Keep them")
    expect(page.locator("tbody tr")).to_have_count(2)
    page.click("text=Delete all 2…")
    page.get_by_role("button", name="Delete 2").click()
    expect(page.locator(".flash-success")).to_contain_text("2 dead letters of Delete my dead letters deleted.")
    expect(page.locator(".empty")).to_contain_text("No dead letters")
    with session_scope() as s:
        left = s.scalars(select(Message.status).where(Message.campaign_id == cid)).all()
    assert left == ["sent"]


def click_for_a_new_tab(page, link):
    """Click ``link``; the tab it opens. Chromium opened nothing, the link in place and the click
    reported done, for a click on a link in the sandboxed frame in 3 of about 90 runs of this
    file (cause not found); the click is then made once more. A link that opens in its frame, or
    never in a new tab, still fails: the second click finds no link, or no tab opens."""
    for attempt in (1, 2):
        try:
            with page.context.expect_page(timeout=10_000) as opened:
                link.click(timeout=10_000)
            return opened.value
        except playwright.Error:
            if attempt == 2:
                raise
            print(f"no new tab 10 s after the click on {link}: clicking again")
    raise AssertionError("unreachable")


def test_a_link_in_an_email_in_the_outbox_opens_in_a_new_tab(page, live, consumer, sink):
    """The outbox shows an email's HTML in a frame where no script runs; its links (the
    unsubscribe link) used to navigate that frame, where the unsubscribe form could not be sent.
    They open in a new tab now, as in a mail client."""
    from campaigns import campaign_rules, contacts, engine, suppressions

    base = live
    ws_id = sign_in(page, base)
    with session_scope() as s:
        lst = contacts.create_list(s, ws_id, "Outbox link list")
        contact, _ = contacts.upsert_contact(s, ws_id, "reader@example.com")
        contacts.add_list_members(s, ws_id, lst.id, [contact.id])
        cid = campaign_rules.create_campaign(s, ws_id, {
            "name": "Outbox links", "list_id": lst.id, "from_email": "team@example.com",
            "steps": [{"type": "email", "subject": "Hello",
                       "html": '<p>Hi</p><p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>'}]}).id
    with session_scope() as s:
        engine.launch(s, ws_id, cid)
    from tasks.engine import fanout_campaign

    fanout_campaign(cid)
    page.goto(f"{base}/campaigns/{cid}")
    expect(page.locator('.stats [data-stat="sent"]')).to_have_text("1")
    page.goto(f"{base}/outbox")
    page.locator("tbody a[href^='/outbox/']").first.click()
    link = page.frame_locator(".mail-frame").locator("text=Unsubscribe")
    expect(link).to_be_visible()
    page.wait_for_load_state("load")  # the frame's document too
    tab = click_for_a_new_tab(page, link)
    tab.wait_for_load_state()
    assert tab.url.startswith(base + "/u/")  # the unsubscribe page (PUBLIC_URL), in a tab of its own ...
    tab.get_by_role("button", name="Unsubscribe").click()  # ... where its form can be sent
    expect(tab.locator("h1")).to_have_text("You are unsubscribed")
    assert page.url.startswith(f"{base}/outbox/")  # the outbox stays as it was
    with session_scope() as s:
        assert suppressions.suppressed_emails(s, ws_id, ["reader@example.com"]) == {"reader@example.com"}


def a_campaign(ws_id: int, name: str, status: str = "draft", *, waiting: bool = False) -> int:
    """A one-step campaign on an empty list, in ``status`` (no consumer: only the page matters).
    ``waiting``: launched for real to a list of one contact whose email is due in a day, so the
    campaign stays running while a consumer runs (an empty running campaign is completed by the
    consumer's reconciler, which ends its live view)."""
    from campaigns import campaign_rules, contacts, engine

    with session_scope() as s:
        lst = contacts.create_list(s, ws_id, f"{name} list")
        steps = [{"type": "email", "subject": "First", "html": "<p>1</p>"}]
        if waiting:
            steps.insert(0, {"type": "wait", "seconds": 86400})
            contacts.add_members(s, ws_id, lst.id, emails=["waiting@example.com"])
        campaign = campaign_rules.create_campaign(s, ws_id, {
            "name": name, "list_id": lst.id, "from_email": "team@example.com", "steps": steps})
        if waiting:
            engine.launch(s, ws_id, campaign.id)
            s.flush()
            engine.fanout(s, campaign.id)  # here, at once (the consumer's run of it finds it done)
        else:
            campaign.status = status
        return campaign.id


def test_the_live_view_reconnects_after_a_503(page, live):
    """EventSource gives up for good on an answer that is not the stream (a 503 while the
    database restarts): the page connects again by itself a few seconds later."""
    base = live
    cid = a_campaign(sign_in(page, base), "Reconnect", "running")
    answers: list[int] = []

    def stream(route):
        if not answers:
            answers.append(503)
            route.fulfill(status=503, content_type="application/json", headers={"Retry-After": "5"},
                          body='{"error": {"code": "unavailable", "message": "the database is not answering"}}')
        else:
            answers.append(200)
            route.continue_()

    page.route(f"**/api/v1/campaigns/{cid}/stream*", stream)
    page.goto(f"{base}/campaigns/{cid}")
    expect(page.locator("[data-live]")).to_be_visible(timeout=15_000)
    assert answers[0] == 503 and 200 in answers


# Chromium reports each blocked script, style, image or frame both ways: in the console ("Refused
# to ...") and as a securitypolicyviolation event on the document (listened for from the start).
RECORD_CSP = """document.addEventListener("securitypolicyviolation", function (e) {
  (window.__csp = window.__csp || []).push(e.violatedDirective + " " + e.blockedURI);
});"""


def test_the_pages_break_no_rule_of_the_content_security_policy(page, live, consumer, sink):
    """The policy has no inline script: the pages, the live view and the builder's preview (a
    sandboxed srcdoc frame, under the page's policy, showing an email styled inline) still work
    and nothing is refused."""
    base = live
    refused: list[str] = []
    page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
    page.add_init_script(RECORD_CSP)
    ws_id = sign_in(page, base)
    draft, running = a_campaign(ws_id, "CSP draft"), a_campaign(ws_id, "CSP live", "running", waiting=True)
    visited = []
    for path in ["/", "/campaigns/new", "/contacts", "/contacts/new", "/contacts/import", "/lists", "/suppressions",
                 "/messages", "/dead-letters", "/queue", "/outbox", "/settings", f"/campaigns/{draft}"]:
        page.goto(base + path)
        page.wait_for_load_state("load")
        visited.append((path, page.evaluate("window.__csp || []")))
    page.goto(f"{base}/campaigns/{running}")
    expect(page.locator("[data-live]")).to_be_visible()  # the stream (herald.js, connect-src 'self')
    visited.append(("live", page.evaluate("window.__csp || []")))
    page.goto(f"{base}/campaigns/{draft}/edit")
    page.fill("#steps-0-html", '<style>h2 { color: rgb(0, 0, 255); }</style><h2>Title</h2>'
                               '<p style="color: rgb(255, 0, 0)">Styled {{ contact.email }}</p>')
    frame = page.frame_locator("[data-step-editor] iframe[data-preview-html]").first
    expect(frame.locator("p")).to_have_css("color", "rgb(255, 0, 0)")  # a style attribute
    expect(frame.locator("h2")).to_have_css("color", "rgb(0, 0, 255)")  # a <style> element
    visited.append(("preview", page.evaluate("window.__csp || []")))
    assert [(path, v) for path, v in visited if v] == [] and refused == []


def test_the_live_view_polls_while_the_server_refuses_more_streams(page, live):
    """Past the bound on open streams the server answers 429: the page then polls the campaign's
    JSON (every 5 s) and its numbers and status still move."""
    base = live
    cid = a_campaign(sign_in(page, base), "Busy", "running")
    streams: list[int] = []

    def refuse(route):
        streams.append(429)
        route.fulfill(status=429, content_type="application/json", headers={"Retry-After": "15"},
                      body='{"error": {"code": "too_many_streams", "message": "too many", "details": {}}}')

    page.route(f"**/api/v1/campaigns/{cid}/stream*", refuse)
    with page.expect_response(f"**/api/v1/campaigns/{cid}") as polled:
        page.goto(f"{base}/campaigns/{cid}")
    assert polled.value.status == 200
    with session_scope() as s:
        s.get(Campaign, cid).status = "paused"
    expect(page.locator("[data-status-badge]").first).to_have_text("paused", timeout=15_000)
    assert streams and set(streams) == {429}
