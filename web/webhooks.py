"""Webhooks: SendGrid's Event Webhook and Inbound Parse (CSRF-exempt; authenticated by signature)."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("webhooks", __name__, url_prefix="/webhooks")
