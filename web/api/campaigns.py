"""API routes: campaigns (create, list, read, edit while a draft, delete) and the live preview.

Launch, pause, resume, cancel, test-send and the progress stream live in ``engine.py``.
The rules themselves are in ``campaigns.campaign_rules``; these handlers parse, call, answer.
"""

from __future__ import annotations

from flask import current_app, g, request
from marshmallow import Schema, fields

from campaigns import campaign_rules as rules
from campaigns.errors import BadRequest
from campaigns.models import Campaign
from campaigns.stats import campaign_stats, empty_step_stats

from ..db import get_db
from ..params import iso, paginate
from .blueprint import bp, json_body
from .openapi import doc

# --------------------------------------------------------------------------- JSON


def _body() -> dict:
    # json_body() lets the json module's RecursionError through ('[' * 100000 is a 500 there).
    try:
        return json_body()
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None



def step_json(step, stats: dict | None = None) -> dict:
    return {
        "id": step.id,
        "position": step.position,
        "type": step.type,
        "subject": step.subject,
        "html": step.html,
        "text": step.text,
        "seconds": step.wait_seconds,
        "stats": stats,
    }


def campaign_json(session, campaign: Campaign) -> dict:
    """The contract's campaign object, with its stats and each step's."""
    totals, per_step = campaign_stats(session, campaign.id)
    empty = empty_step_stats()
    return {
        "id": campaign.id,
        "name": campaign.name,
        "status": campaign.status,
        "status_reason": campaign.status_reason,
        "list_id": campaign.list_id,
        "from_email": campaign.from_email,
        "from_name": campaign.from_name,
        "reply_to": campaign.reply_to,
        "send_window": campaign.send_window,
        "limits": campaign.limits or {},
        "stop_on": campaign.stop_on if campaign.stop_on is not None else ["reply"],
        "tracking": campaign.tracking or {"opens": True, "clicks": True},
        "max_attempts": campaign.max_attempts,
        "created_at": iso(campaign.created_at),
        "launched_at": iso(campaign.launched_at),
        "finished_at": iso(campaign.finished_at),
        "stats": totals,
        "steps": [step_json(s, per_step.get(s.id) or empty) for s in campaign.steps],
    }


# --------------------------------------------------------------------------- schemas (for the OpenAPI document)


class RatesOut(Schema):
    delivered = fields.Float()
    opened = fields.Float()
    clicked = fields.Float()
    bounced = fields.Float()
    replied = fields.Float()
    unsubscribed = fields.Float()


class StepStatsOut(Schema):
    sent = fields.Integer()
    delivered = fields.Integer()
    opened = fields.Integer()
    clicked = fields.Integer()
    bounced = fields.Integer()
    dropped = fields.Integer()
    spam_reports = fields.Integer()
    replied = fields.Integer()
    unsubscribed = fields.Integer()
    failed = fields.Integer(metadata={"description": "messages that ever became dead letters (replayed and deleted "
                                                    "ones included): never decreases"})
    ambiguous = fields.Integer(metadata={"description": "a current count: outcome unknown, being reconciled"})
    scheduled = fields.Integer(metadata={"description": "a current count: messages due or waiting"})
    dead_letters = fields.Integer(metadata={"description": "a current count: failed now, to replay or delete"})
    rates = fields.Nested(RatesOut, metadata={"description": "fractions of sent"})


class CampaignStatsOut(StepStatsOut):
    enrolled = fields.Integer()
    stopped = fields.Integer(metadata={"description": "a current count: sequences that ended with emails left to send, "
                                                     "by a stop condition (a reply, an unsubscribe, a bounce, a "
                                                     "suppression) or a dead letter (until it is replayed)"})
    skipped = fields.Integer(metadata={"description": "a current count: the emails those sequences will not send; "
                                                     "progress is sent + dead letters out of enrolled x email steps "
                                                     "- skipped"})


class StepOut(Schema):
    id = fields.Integer()
    position = fields.Integer()
    type = fields.String(metadata={"enum": ["email", "wait"]})
    subject = fields.String(allow_none=True)
    html = fields.String(allow_none=True)
    text = fields.String(allow_none=True)
    seconds = fields.Integer(allow_none=True, metadata={"description": "the wait of a wait step"})
    stats = fields.Nested(StepStatsOut)


class CampaignOut(Schema):
    id = fields.Integer()
    name = fields.String()
    status = fields.String(metadata={"enum": list(rules.STATUSES)})
    status_reason = fields.String(allow_none=True)
    list_id = fields.Integer(allow_none=True)
    from_email = fields.String()
    from_name = fields.String(allow_none=True)
    reply_to = fields.String(allow_none=True)
    send_window = fields.Nested(rules.SendWindowSchema, allow_none=True)
    limits = fields.Nested(rules.LimitsSchema)
    stop_on = fields.List(fields.String(metadata={"enum": list(rules.STOP_ON)}))
    tracking = fields.Nested(rules.TrackingSchema)
    max_attempts = fields.Integer()
    created_at = fields.String(metadata={"format": "date-time"})
    launched_at = fields.String(allow_none=True, metadata={"format": "date-time"})
    finished_at = fields.String(allow_none=True, metadata={"format": "date-time"})
    stats = fields.Nested(CampaignStatsOut)
    steps = fields.List(fields.Nested(StepOut))


class CampaignPage(Schema):
    items = fields.List(fields.Nested(CampaignOut))
    next_cursor = fields.String(allow_none=True, metadata={"description": "pass as ?cursor= for the next page"})


class CampaignListQuery(Schema):
    status = fields.String(metadata={"enum": list(rules.STATUSES)})
    cursor = fields.String()
    limit = fields.Integer(metadata={"minimum": 1, "maximum": 500})


class PreviewContactOut(Schema):
    id = fields.Integer(allow_none=True, metadata={"description": "null for a sample contact"})
    email = fields.String()


class PreviewOut(Schema):
    step = fields.Integer(allow_none=True)
    contact = fields.Nested(PreviewContactOut)
    subject = fields.String(allow_none=True)
    html = fields.String(allow_none=True)
    text = fields.String(allow_none=True)
    errors = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.String()),
        metadata={"description": "template problems by field ('line N: message'); empty when it rendered"},
    )


# --------------------------------------------------------------------------- routes


@bp.post("/campaigns")
@doc("Create a campaign (a draft)", request=rules.CampaignSchema, response=CampaignOut, status=201,
     tags=["campaigns"])
def create_campaign():
    session = get_db()
    campaign = rules.create_campaign(session, g.workspace_id, _body())
    session.commit()
    return campaign_json(session, campaign), 201, {"Location": f"{bp.url_prefix}/campaigns/{campaign.id}"}


@bp.get("/campaigns")
@doc("List campaigns, newest last (keyset pages)", query=CampaignListQuery, response=CampaignPage,
     tags=["campaigns"])
def list_campaigns():
    session = get_db()
    stmt = rules.campaigns_query(g.workspace_id, request.args.get("status") or None)
    return paginate(session, stmt, Campaign, lambda c: campaign_json(session, c))


@bp.get("/campaigns/<int:campaign_id>")
@doc("A campaign with its steps and stats", response=CampaignOut, tags=["campaigns"])
def get_campaign(campaign_id: int):
    session = get_db()
    return campaign_json(session, rules.get_campaign(session, g.workspace_id, campaign_id))


@bp.patch("/campaigns/<int:campaign_id>")
@doc("Edit a draft campaign (fields given replace the stored ones; steps replace all steps)",
     request=rules.CampaignUpdateSchema, response=CampaignOut, tags=["campaigns"])
def update_campaign(campaign_id: int):
    session = get_db()
    data = _body()
    campaign = rules.get_campaign(session, g.workspace_id, campaign_id, for_update=True)
    rules.update_campaign(session, campaign, data)
    session.commit()
    return campaign_json(session, campaign)


@bp.delete("/campaigns/<int:campaign_id>")
@doc("Delete a draft, completed or cancelled campaign", status=204, tags=["campaigns"])
def delete_campaign(campaign_id: int):
    session = get_db()
    campaign = rules.get_campaign(session, g.workspace_id, campaign_id, for_update=True)
    rules.delete_campaign(session, campaign)
    session.commit()
    return "", 204


@bp.post("/campaigns/<int:campaign_id>/preview")
@doc("Render a step for a contact (or a sample one); template problems come back in errors, with 200",
     request=rules.PreviewSchema, response=PreviewOut, tags=["campaigns"])
def preview_campaign(campaign_id: int):
    session = get_db()
    data = _body()
    campaign = rules.get_campaign(session, g.workspace_id, campaign_id)
    public_url = current_app.config["HERALD_SETTINGS"].public_url.rstrip("/")
    return rules.preview_step(session, campaign, data, f"{public_url}/u/preview")
