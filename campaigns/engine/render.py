"""Rendering one message into the provider's ``OutgoingEmail`` (template, unsubscribe and reply
addresses, headers, tracking)."""

from __future__ import annotations

from ..config import get_settings
from ..models import Campaign, Step
from ..providers import OutgoingEmail
from ..templating import SAMPLE_CONTACT, render_step
from ..tokens import reply_address, unsubscribe_token


def unsubscribe_url(workspace_id: int, email: str, message_key: str) -> str:
    settings = get_settings()
    return f"{settings.public_url}/u/{unsubscribe_token(workspace_id, email, message_key)}"


def build_email(msg, step: Step, campaign: Campaign, contact) -> OutgoingEmail:
    """Render one message. ``msg`` and ``contact`` are rows or objects with the Message's and
    the Contact's attributes (``contact`` None: a test send to an address that is no contact)."""
    settings = get_settings()
    if contact is not None:
        contact_like = contact
    elif msg.is_test:  # a test to an address that is no contact: the sample contact, as the preview shows
        contact_like = {**SAMPLE_CONTACT, "email": msg.email}
    else:
        contact_like = {"email": msg.email, "first_name": None, "last_name": None, "timezone": None, "fields": {}}
    unsub = unsubscribe_url(msg.workspace_id, msg.email, msg.message_key)
    rendered = render_step(step, contact_like, campaign, unsub)
    subject = ("[Test] " + rendered.subject) if msg.is_test else rendered.subject
    host = settings.public_url.split("://", 1)[-1].split("/")[0].split(":")[0] or "herald.local"
    headers = {
        "List-Unsubscribe": f"<{unsub}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "Message-ID": f"<{msg.message_key}@{host}>",
    }
    reply_to = campaign.reply_to
    if settings.inbound_domain:
        reply_to = reply_address(msg.message_key, settings.inbound_domain)
    tracking = campaign.tracking or {}
    name = " ".join(x for x in ((contact.first_name, contact.last_name) if contact else ()) if x) or None
    return OutgoingEmail(
        message_key=msg.message_key,
        to_email=msg.email,
        to_name=name,
        from_email=campaign.from_email,
        from_name=campaign.from_name,
        subject=subject,
        html=rendered.html,
        text=rendered.text,
        reply_to=reply_to,
        headers=headers,
        custom_args={"herald_workspace": str(msg.workspace_id), "herald_campaign": str(msg.campaign_id)},
        track_opens=bool(tracking.get("opens", True)) and not msg.is_test,
        track_clicks=bool(tracking.get("clicks", True)) and not msg.is_test,
    )
