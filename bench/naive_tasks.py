"""The naive baseline for bench/send_throughput.py: one plain Huey task per email, no ledger.

What a first version would do: the task builds the payload and posts it. No claim, no lease,
no record of the outcome, nothing that makes a repeat safe.
"""

from __future__ import annotations

import os

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
