"""`make screenshots`: PNGs of Herald's main pages in docs/screenshots/.

Starts everything on a throw-away instance (a temporary HERALD_INSTANCE_DIR: SQLite and
SqliteHuey, whatever DATABASE_URL/REDIS_URL say): the local SendGrid sink, the web app under
gunicorn and a consumer. Seeds demo data through the domain layer, runs real campaigns through
the consumer and the sink, then takes the pictures with Debian's Chromium through Playwright.

One finished campaign's history is spread over the last hour afterwards (send times, opens,
clicks, replies), so that its chart and funnel look like a real campaign's, not like 80 emails
sent in one second. Everything else on the pictures happened for real.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
EMAIL, PASSWORD = "demo@example.com", "herald-demo"

FIRST = ["Ada", "Grace", "Alan", "Katherine", "Linus", "Margaret", "Dennis", "Barbara", "Ken", "Frances",
         "Edsger", "Radia", "Tim", "Hedy", "John", "Sophie", "Donald", "Anita", "Guido", "Shafi"]
LAST = ["Lovelace", "Hopper", "Turing", "Johnson", "Torvalds", "Hamilton", "Ritchie", "Liskov", "Thompson",
        "Allen", "Dijkstra", "Perlman", "Berners-Lee", "Lamarr", "McCarthy", "Wilson", "Knuth", "Borg", "van Rossum",
        "Goldwasser"]
COMPANIES = ["Analytical Engines", "Compiler Co", "Enigma Labs", "Orbital Maths", "Kernel Works", "Apollo Systems"]
ZONES = ["Europe/London", "Europe/Paris", "America/New_York", "America/Los_Angeles", "Asia/Tokyo", None]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"screenshots: {url} did not answer within {timeout:.0f} s")


class Processes:
    """The sink, the web app and a consumer, logging to files in the instance folder."""

    def __init__(self, instance: Path, env: dict):
        self.instance, self.env, self.procs = instance, env, []

    def start(self, name: str, cmd: list[str]) -> None:
        log = open(self.instance / f"{name}.log", "wb")  # closed in stop()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append((name, proc, log))

    def stop(self) -> None:
        for _name, proc, _log in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _name, proc, log in reversed(self.procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            log.close()


def seed(sink_url: str) -> dict:
    """Workspaces, contacts, lists, suppressions and campaigns (run by the consumer)."""

    from campaigns import accounts, campaign_rules, contacts, engine, suppressions
    from campaigns.db import session_scope
    from campaigns.models import Campaign
    from tasks import engine as task_engine

    rng = random.Random(7)
    with session_scope() as s:
        ws = accounts.create_workspace(s, "Acme Outreach")
        accounts.create_user(s, EMAIL, PASSWORD, ws)
        side = accounts.create_workspace(s, "Side project")
        accounts.create_user(s, EMAIL, PASSWORD, side)
        accounts.create_api_key(s, ws, "CRM sync")
        accounts.create_api_key(s, ws, "Zapier")
        ws_id = ws.id
        spring = contacts.create_list(s, ws_id, "Spring prospects")
        webinar = contacts.create_list(s, ws_id, "Webinar attendees")
        contacts.create_list(s, ws_id, "Newsletter")
        ids = {"spring": [], "webinar": []}
        emails = {"spring": [], "webinar": []}
        for i in range(64):
            first, last = FIRST[i % len(FIRST)], LAST[(i * 7) % len(LAST)]
            email = f"{first.lower()}.{last.lower().replace(' ', '')}{i if i >= len(FIRST) else ''}@example.com"
            contact, _ = contacts.upsert_contact(
                s, ws_id, email, first_name=first, last_name=last, timezone=ZONES[i % len(ZONES)],
                fields={"company": COMPANIES[i % len(COMPANIES)]})
            ids["spring" if i < 40 else "webinar"].append(contact.id)
            emails["spring" if i < 40 else "webinar"].append(contact.email)
        contacts.add_list_members(s, ws_id, spring.id, ids["spring"])
        contacts.add_list_members(s, ws_id, webinar.id, ids["webinar"])
        suppressions.suppress(s, ws_id, [emails["spring"][3], "old.address@example.com", "no-thanks@example.org"],
                          "manual")
        suppressions.suppress(s, ws_id, ["bounced.mailbox@example.net"], "bounce")
        suppressions.suppress(s, ws_id, [emails["spring"][11]], "unsubscribe")
        base = {"from_email": "hello@acme.example", "from_name": "Maya at Acme", "reply_to": "maya@acme.example"}
        email_one = {"type": "email", "subject": "A faster way to ship, {{ contact.first_name }}?",
                     "html": ("<p>Hi {{ contact.first_name }},</p>\n<p>Teams like {{ contact.fields.company }} "
                              "use Acme to ship twice as often.</p>\n<p>Worth a 15-minute call?</p>\n"
                              "<p>Maya</p>\n<p><small><a href=\"{{ unsubscribe_url }}\">Unsubscribe</a></small></p>")}
        email_two = {"type": "email", "subject": "Re: A faster way to ship",
                     "html": ("<p>Hi {{ contact.first_name }}, just bringing this back to the top of your inbox."
                              "</p>\n<p>Maya</p>\n<p><small><a href=\"{{ unsubscribe_url }}\">Unsubscribe</a>"
                              "</small></p>")}
        spring_c = campaign_rules.create_campaign(s, ws_id, {
            **base, "name": "Spring launch", "list_id": spring.id, "stop_on": ["reply", "click"],
            "steps": [email_one, {"type": "wait", "seconds": 2}, email_two]})
        webinar_c = campaign_rules.create_campaign(s, ws_id, {
            **base, "name": "Webinar follow-up", "list_id": webinar.id, "limits": {"per_minute": 600},
            "steps": [{**email_one, "subject": "Thanks for joining, {{ contact.first_name }}"},
                      {"type": "wait", "seconds": 3 * 86400}, email_two]})
        campaign_rules.create_campaign(s, ws_id, {
            **base, "name": "Q3 newsletter", "list_id": spring.id,
            "send_window": {"start": "09:00", "end": "17:00", "days": ["mon", "tue", "wed", "thu", "fri"],
                            "timezone": "contact", "fallback_timezone": "UTC"},
            "limits": {"per_day": 500},
            "steps": [{"type": "email", "subject": "What's new at Acme this quarter",
                       "html": ("<h2>Hello {{ contact.first_name }}!</h2>\n<p>Three things we shipped for "
                                "{{ contact.fields.company }}:</p>\n<ul>\n  <li>Faster builds</li>\n"
                                "  <li>Team dashboards</li>\n  <li>Audit logs</li>\n</ul>\n"
                                "<p><a href=\"{{ unsubscribe_url }}\">Unsubscribe</a></p>")},
                      {"type": "wait", "seconds": 7 * 86400},
                      {"type": "email", "subject": "Did you see this, {{ contact.first_name }}?",
                       "html": "<p>A quick reminder about our quarterly update.</p>"}]})
        ids = {"workspace": ws_id, "spring": spring_c.id, "webinar": webinar_c.id}
        refused = emails["webinar"][5]

    # One webinar address is refused by the sink for good: a dead letter to show.
    req = urllib.request.Request(sink_url + "/_sink/fail-addresses", method="POST",
                                 data=json.dumps({"emails": [refused], "status": 400}).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).close()
    for key in ("spring", "webinar"):
        with session_scope() as s:
            engine.launch(s, ws_id, ids[key])
        task_engine.fanout_campaign(ids[key])

    def status(cid):
        with session_scope() as s:
            return s.scalar(select(Campaign.status).where(Campaign.id == cid))

    deadline = time.monotonic() + 90
    while status(ids["spring"]) != "completed":
        if time.monotonic() > deadline:
            raise SystemExit("screenshots: the demo campaign did not complete; see the logs")
        time.sleep(0.3)
    ids["message"] = backdate(ids["spring"], rng)
    return ids


def backdate(campaign_id: int, rng: random.Random) -> int:
    """Spread a finished campaign's history over the last hour, with believable engagement;
    returns the id of a message given a full set of events."""

    from campaigns.db import session_scope, utcnow
    from campaigns.models import Campaign, Event, Message

    now = utcnow()
    with session_scope() as s:
        c = s.get(Campaign, campaign_id)
        first_step = c.steps[0].id
        messages = s.scalars(select(Message).where(Message.campaign_id == campaign_id,
                                                   Message.is_test.is_(False)).order_by(Message.id)).all()
        c.launched_at = now - timedelta(minutes=58)
        c.finished_at = now - timedelta(minutes=3)
        for n, m in enumerate(messages):
            start = 57 if m.step_id == first_step else 26
            sent = now - timedelta(minutes=start - rng.triangular(0, 20, 4), seconds=rng.randint(0, 59))
            m.sent_at = m.due_at = m.created_at = sent
            m.status = "delivered"
            m.delivered_at = sent + timedelta(seconds=rng.randint(1, 20))
            roll = rng.random()
            if n % 23 == 7:
                m.status, m.delivered_at = "bounced", None
                continue
            if roll < 0.62:
                m.opened_at = m.delivered_at + timedelta(minutes=rng.randint(1, 15))
            if roll < 0.24:
                m.clicked_at = m.opened_at + timedelta(minutes=1)
            if roll < 0.09:
                m.replied_at = m.opened_at + timedelta(minutes=3)
            if 0.6 < roll < 0.62:
                m.unsubscribed_at = m.delivered_at + timedelta(minutes=2)
        shown = messages[0]
        for n, kind in enumerate(("processed", "delivered", "open", "click")):
            s.add(Event(workspace_id=c.workspace_id, message_id=shown.id, message_key=shown.message_key,
                        dedupe_key=f"demo-{shown.id}-{n}", event=kind, email=shown.email,
                        timestamp=shown.sent_at + timedelta(minutes=n * 3),
                        url="https://acme.example/pricing" if kind == "click" else None,
                        payload={"event": kind}, received_at=shown.sent_at + timedelta(minutes=n * 3, seconds=2),
                        processed_at=shown.sent_at + timedelta(minutes=n * 3, seconds=2)))
        shown.opened_at = shown.sent_at + timedelta(minutes=6)
        shown.clicked_at = shown.sent_at + timedelta(minutes=9)
        shown.status = "delivered"
        return shown.id


def shoot(base: str, ids: dict, out: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    shots: list[Path] = []
    csv = ("email,first_name,last_name,company\nmarie.curie@example.com,Marie,Curie,Radium Inc\n"
           "niels.bohr@example.com,Niels,Bohr,Atomics\nnot-an-address,Bad,Row,X\n"
           "lise.meitner@example.com,Lise,Meitner,Fission Ltd,extra cell\nemmy.noether@example.com,Emmy,Noether,"
           "Algebra AG\n")
    csv_path = out.parent / "demo-import.csv"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860}, device_scale_factor=1)

        def snap(name: str, full: bool = True) -> None:
            path = out / f"{name}.png"
            page.wait_for_timeout(300)
            page.screenshot(path=str(path), full_page=full)
            shots.append(path)

        page.goto(base + "/login")
        snap("01-sign-in", full=False)
        page.fill("#email", EMAIL)
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(base + "/")
        snap("02-campaigns")

        page.goto(f"{base}/campaigns/{ids['spring']}")
        snap("03-campaign")

        page.goto(base + "/")
        page.click("text=Q3 newsletter")
        page.wait_for_selector("#builder")
        draft = page.url
        page.set_viewport_size({"width": 1280, "height": 2700})  # the save bar sticks to the bottom
        page.wait_for_timeout(500)
        snap("04-builder", full=False)
        page.set_viewport_size({"width": 1280, "height": 860})
        page.fill("#steps-0-html", page.input_value("#steps-0-html").replace(
            "{{ contact.fields.company }}", "{{ contact.company }"))
        page.wait_for_selector("[data-preview-errors] .template-error")
        page.locator("#step-0").screenshot(path=str(out / "05-template-error.png"))
        shots.append(out / "05-template-error.png")

        page.goto(draft.replace("/edit", "/launch"))
        snap("06-launch-summary")

        page.goto(base + "/contacts")
        snap("07-contacts", full=False)

        csv_path.write_text(csv)
        page.goto(base + "/contacts/import")
        page.set_input_files("#file", str(csv_path))
        page.fill("#new_list", "Physicists")
        page.click("text=Upload and import")
        page.wait_for_selector("[data-import-status]:has-text('done')")
        snap("08-import-report")

        page.goto(base + "/lists")
        page.click("text=Spring prospects")
        snap("09-list", full=False)
        page.goto(base + "/suppressions")
        snap("10-suppressions")
        page.goto(f"{base}/messages?campaign_id={ids['spring']}")
        snap("11-messages", full=False)
        page.goto(f"{base}/messages/{ids['message']}")
        snap("12-message")
        page.goto(base + "/dead-letters")
        snap("13-dead-letters")
        page.goto(base + "/queue")
        page.wait_for_selector("[data-live]:not([hidden])")
        snap("14-queue")
        page.goto(base + "/outbox")
        snap("15-outbox", full=False)
        page.locator("text=View email").first.click()
        snap("16-outbox-email", full=False)
        page.goto(base + "/settings")
        page.fill("#key-name", "Reporting script")
        page.click("text=Create key")
        snap("17-settings")

        phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
        phone.context.add_cookies(page.context.cookies())
        phone.goto(f"{base}/campaigns/{ids['spring']}")
        path = out / "18-phone.png"
        phone.screenshot(path=str(path), full_page=False)
        shots.append(path)
        browser.close()
    csv_path.unlink()
    return shots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary instance folder (logs, database)")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"screenshots: {CHROMIUM} is missing; run `make browser` (installs Debian's chromium)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    instance = Path(tempfile.mkdtemp(prefix="herald-screens-"))
    web_port, sink_port = free_port(), free_port()
    base, sink_url = f"http://127.0.0.1:{web_port}", f"http://127.0.0.1:{sink_port}"
    for name in ("DATABASE_URL", "REDIS_URL", "SENDGRID_API_KEY", "SENDGRID_WEBHOOK_PUBLIC_KEY", "SECRET_KEY",
                 "INBOUND_PARSE_SECRET", "INBOUND_DOMAIN", "HERALD_SINK_EVENTS_URL"):
        os.environ.pop(name, None)
    os.environ.update({
        "HERALD_INSTANCE_DIR": str(instance), "SENDGRID_API_HOST": sink_url, "PUBLIC_URL": base,
        "HERALD_QUEUE_NAME": f"herald-screens-{os.getpid()}", "SENDGRID_RATE_LIMIT": "200/second",
        "PYTHONPATH": str(ROOT),
    })
    env = dict(os.environ)
    procs = Processes(instance, env)
    try:
        subprocess.run([str(BIN / "flask"), "--app", "wsgi", "migrate"], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        procs.start("sink", [str(BIN / "flask"), "--app", "wsgi", "sendgrid-sink", "--port", str(sink_port)])
        procs.start("web", [str(BIN / "gunicorn"), "-k", "gthread", "-w", "1", "--threads", "8", "-b",
                            f"127.0.0.1:{web_port}", "wsgi:app"])
        procs.start("consumer", [str(BIN / "huey_consumer"), "tasks.huey", "-k", "thread", "-w", "4", "-g", "TERM",
                                 "-t", "30", "-d", "0.05", "-m", "0.3"])
        wait_http(sink_url + "/_sink/stats")
        wait_http(base + "/healthz")
        sys.path.insert(0, str(ROOT))
        ids = seed(sink_url)
        shots = shoot(base, ids, out)
    finally:
        procs.stop()
        if args.keep:
            print(f"screenshots: instance kept in {instance}")
        else:
            shutil.rmtree(instance, ignore_errors=True)
    for path in shots:
        print(f"screenshots: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
