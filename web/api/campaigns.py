"""API routes: campaigns (create, list, read, edit while a draft, delete) and the live preview.

Launch, pause, resume, cancel, test-send and the progress stream live in ``engine.py``.
The rules themselves are in ``campaigns.campaign_rules``; these handlers parse, call, answer.
"""

from __future__ import annotations

from flask import current_app, g, request
from marshmallow import Schema, fields
from sqlalchemy.orm import selectinload

from campaigns import campaign_rules as rules
from campaigns.models import Campaign
from campaigns.stats import LIST_MAX_AGE, campaign_stats, empty_step_stats, shared_campaigns_stats

from ..db import get_db
from ..params import paginate
from .blueprint import bp, json_body
from .fields import ListOr, NestedOr, Out, Timestamp, With, page_of
from .openapi import doc

# --------------------------------------------------------------------------- response schemas (the serializers)


class RatesOut(Out):
    delivered = fields.Float()
    opened = fields.Float()
    clicked = fields.Float()
    bounced = fields.Float()
    replied = fields.Float()
    unsubscribed = fields.Float()


class StepStatsOut(Out):
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


class StepOut(Out):
    id = fields.Integer()
    position = fields.Integer()
    type = fields.String(metadata={"enum": ["email", "wait"]})
    subject = fields.String(allow_none=True)
    html = fields.String(allow_none=True)
    text = fields.String(allow_none=True)
    seconds = fields.Integer(attribute="wait_seconds", allow_none=True,
                             metadata={"description": "the wait of a wait step"})
    stats = fields.Nested(StepStatsOut)


class CampaignOut(Out):
    id = fields.Integer()
    name = fields.String()
    status = fields.String(metadata={"enum": list(rules.STATUSES)})
    status_reason = fields.String(allow_none=True)
    list_id = fields.Integer(allow_none=True)
    from_email = fields.String()
    from_name = fields.String(allow_none=True)
    reply_to = fields.String(allow_none=True)
    send_window = fields.Nested(rules.SendWindowSchema, allow_none=True)
    limits = NestedOr(rules.LimitsSchema, none_as={})
    stop_on = ListOr(fields.String(metadata={"enum": list(rules.STOP_ON)}), none_as=["reply"])
    tracking = NestedOr(rules.TrackingSchema, none_as={"opens": True, "clicks": True})
    max_attempts = fields.Integer()
    created_at = Timestamp()
    launched_at = Timestamp(allow_none=True)
    finished_at = Timestamp(allow_none=True)
    stats = fields.Nested(CampaignStatsOut)
    steps = fields.List(fields.Nested(StepOut))


CampaignPage = page_of(CampaignOut, "CampaignPage")


class CampaignListQuery(Schema):
    status = fields.String(metadata={"enum": list(rules.STATUSES)})
    cursor = fields.String()
    limit = fields.Integer(metadata={"minimum": 1, "maximum": 500})


class PreviewContactOut(Out):
    id = fields.Integer(allow_none=True, metadata={"description": "null for a sample contact"})
    email = fields.String()


class PreviewOut(Out):
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


def _with_stats(campaign: Campaign, stats: tuple[dict, dict]) -> With:
    totals, per_step = stats
    empty = empty_step_stats()
    return With(campaign, stats=totals, steps=[With(s, stats=per_step.get(s.id) or empty) for s in campaign.steps])


def _campaign(session, campaign: Campaign) -> dict:
    """The contract's campaign object, with its stats (counted now) and each step's."""
    return CampaignOut().dump(_with_stats(campaign, campaign_stats(session, campaign.id)))


# --------------------------------------------------------------------------- routes


@bp.post("/campaigns")
@doc("Create a campaign (a draft)", request=rules.CampaignSchema, response=CampaignOut, status=201,
     tags=["campaigns"])
def create_campaign():
    session = get_db()
    campaign = rules.create_campaign(session, g.workspace_id, json_body())
    session.commit()
    return _campaign(session, campaign), 201, {"Location": f"{bp.url_prefix}/campaigns/{campaign.id}"}


@bp.get("/campaigns")
@doc("List campaigns, newest last (keyset pages); their stats may be a few seconds old (shared with the "
     "live views), a campaign's own page counts afresh", query=CampaignListQuery, response=CampaignPage,
     tags=["campaigns"])
def list_campaigns():
    session = get_db()
    stmt = rules.campaigns_query(g.workspace_id, request.args.get("status") or None)
    page = paginate(session, stmt.options(selectinload(Campaign.steps)), Campaign)
    stats = shared_campaigns_stats(session, [c.id for c in page["items"]], max_age=LIST_MAX_AGE)
    page["items"] = [_with_stats(c, stats[c.id]) for c in page["items"]]
    return CampaignPage().dump(page)


@bp.get("/campaigns/<int:campaign_id>")
@doc("A campaign with its steps and stats", response=CampaignOut, tags=["campaigns"])
def get_campaign(campaign_id: int):
    session = get_db()
    return _campaign(session, rules.get_campaign(session, g.workspace_id, campaign_id))


@bp.patch("/campaigns/<int:campaign_id>")
@doc("Edit a draft campaign (fields given replace the stored ones; steps replace all steps)",
     request=rules.CampaignUpdateSchema, response=CampaignOut, tags=["campaigns"])
def update_campaign(campaign_id: int):
    session = get_db()
    data = json_body()
    campaign = rules.get_campaign(session, g.workspace_id, campaign_id, for_update=True)
    rules.update_campaign(session, campaign, data)
    session.commit()
    return _campaign(session, campaign)


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
    data = json_body()
    campaign = rules.get_campaign(session, g.workspace_id, campaign_id)
    public_url = current_app.config["HERALD_SETTINGS"].public_url.rstrip("/")
    return PreviewOut().dump(rules.preview_step(session, campaign, data, f"{public_url}/u/preview"))
