"""The naive baselines for bench/send_throughput.py: one plain Huey task per email, no ledger.

- ``send_one``: the task builds a fixed payload from its number and posts it (Huey's cost per
  email on top of the floor);
- ``send_rendered``: what a first version of the engine would do per email: read the contact,
  the step and the campaign (one ORM ``get`` each), render the step for the contact (the same
  ``build_email`` Herald uses: templates, signed unsubscribe link, headers) and post it.

Neither claims, leases or records anything: nothing makes a repeat safe.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import redis
from huey import PriorityRedisExpireHuey

from campaigns.providers import OutgoingEmail

huey = PriorityRedisExpireHuey(
    os.environ.get("HERALD_QUEUE_NAME", "bench") + "-naive",
    connection_pool=redis.ConnectionPool.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14")),
    results=False,
)
_mailer = None


def mailer():
    global _mailer
    if _mailer is None:
        from campaigns.providers.sendgrid import SendGridMailer

        _mailer = SendGridMailer("bench", os.environ["SENDGRID_API_HOST"])
    return _mailer


def email_for(i: int) -> OutgoingEmail:
    return OutgoingEmail(
        message_key=f"naive-{i}", to_email=f"c{i}@bench.example.com", to_name=f"C{i}",
        from_email="bench@example.com", from_name=None, subject=f"Hello C{i}",
        html=f"<p>Hi C{i}, a short note.</p>", text=f"Hi C{i}, a short note.",
    )


@huey.task()
def send_one(i: int) -> None:
    mailer().send(email_for(i))


@huey.task()
def send_rendered(contact_id: int, campaign_id: int, step_id: int) -> None:
    from campaigns.db import session_scope
    from campaigns.engine import build_email
    from campaigns.models import Campaign, Contact, Step

    with session_scope() as s:
        contact, campaign, step = s.get(Contact, contact_id), s.get(Campaign, campaign_id), s.get(Step, step_id)
        msg = SimpleNamespace(message_key=f"naive-{contact_id}", email=contact.email,
                              workspace_id=campaign.workspace_id, campaign_id=campaign_id, is_test=False)
        email = build_email(msg, step, campaign, contact)
    mailer().send(email)
