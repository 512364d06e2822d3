"""API routes that run campaigns: launch/pause/resume/cancel, test sends, the progress stream,
the message log, dead-letter replay and deletion, and the queue's health. Handlers answer at once; the
consumers do the work."""

from __future__ import annotations

import json
import math
import time

from flask import Response, g, request, stream_with_context
from marshmallow import Schema, fields, validate
from sqlalchemy import false, select

from campaigns import campaign_rules as rules
from campaigns import contacts, engine, queue_health, stats
from campaigns.db import TRANSIENT_ERRORS, new_session
from campaigns.errors import BadRequest, NotFound
from campaigns.models import Event, Message, MessageAttempt
from tasks import huey

from .. import streams
from ..db import get_db
from ..params import int_arg, paginate
from .blueprint import bp, json_body
from .campaigns import CampaignStatsOut, StepStatsOut
from .fields import Out, Rounded, Timestamp, With, page_of
from .openapi import EventStream, doc

MESSAGE_STATUSES = ("scheduled", "queued", "sending", "sent", "delivered", "bounced", "dropped", "ambiguous",
                    "failed", "cancelled")


class TestSendIn(Schema):
    email = fields.String(required=True)
    # strict: 0.5 or "1" is no step position (it was truncated: 1.9 sent the step at position 1)
    step = fields.Integer(load_default=None, allow_none=True, strict=True, validate=validate.Range(min=0))


class CampaignStatusOut(Out):
    id = fields.Integer()
    status = fields.String()
    status_reason = fields.String(allow_none=True)


class MessageOut(Out):
    """A message of the log; its times keep the stored microseconds."""

    id = fields.Integer()
    campaign_id = fields.Integer()
    step_id = fields.Integer(allow_none=True, metadata={
        "description": "null for a draft's test send whose step has since been edited away"})
    enrollment_id = fields.Integer(allow_none=True)
    email = fields.String()
    message_key = fields.String()
    status = fields.String(metadata={"enum": list(MESSAGE_STATUSES)})
    is_test = fields.Boolean()
    attempts = fields.Integer()
    max_attempts = fields.Integer()
    resends = fields.Integer(metadata={"description": "times it was sent again after an ambiguous outcome"})
    due_at = Timestamp(seconds=False, allow_none=True)
    sent_at = Timestamp(seconds=False, allow_none=True)
    failed_at = Timestamp(seconds=False, allow_none=True)
    delivered_at = Timestamp(seconds=False, allow_none=True)
    opened_at = Timestamp(seconds=False, allow_none=True)
    clicked_at = Timestamp(seconds=False, allow_none=True)
    replied_at = Timestamp(seconds=False, allow_none=True)
    last_error = fields.String(allow_none=True)
    provider_message_id = fields.String(allow_none=True)


MessagePage = page_of(MessageOut, "MessagePage")


class MessageQuery(Schema):
    campaign_id = fields.Integer()
    step_id = fields.Integer()
    status = fields.String(metadata={"enum": list(MESSAGE_STATUSES)})
    email = fields.String(metadata={"description": "one address (normalised before matching)"})
    cursor = fields.String(metadata={"description": "next_cursor of the previous page"})
    limit = fields.Integer(validate=validate.Range(1, 500), metadata={"description": "page size (default 50)"})


class AttemptOut(Out):
    number = fields.Integer()
    started_at = Timestamp(seconds=False, allow_none=True)
    duration_ms = Rounded(places=1)
    outcome = fields.String()
    http_status = fields.Integer(allow_none=True)
    error = fields.String(allow_none=True)
    retry_at = Timestamp(seconds=False, allow_none=True)


class MessageEventOut(Out):
    event = fields.String()
    timestamp = Timestamp(seconds=False, allow_none=True)
    url = fields.String(allow_none=True)
    received_at = Timestamp(seconds=False, allow_none=True)


class MessageDetailOut(MessageOut):
    last_response = fields.String(allow_none=True)
    attempts_log = fields.List(fields.Nested(AttemptOut))
    events = fields.List(fields.Nested(MessageEventOut))


class ReplayedOut(Out):
    replayed = fields.Integer(metadata={"description": "how many dead letters were queued again"})


class StreamProgressOut(Out):
    """The data of a stream's ``progress`` event: the campaign's counts, and each step's by step id."""

    id = fields.Integer()
    status = fields.String(metadata={"enum": list(rules.STATUSES)})
    status_reason = fields.String(allow_none=True)
    stats = fields.Nested(CampaignStatsOut)
    steps = fields.Dict(keys=fields.String(), values=fields.Nested(StepStatsOut))


class StreamEndOut(Out):
    """The data of a stream's last event, ``end``, once the campaign has ended."""

    status = fields.String(metadata={"enum": ["completed", "cancelled"]})


class StreamQuery(Schema):
    lifetime = fields.Float(metadata={"description": "seconds before the stream closes (at most 55)"})
    interval = fields.Float(metadata={"description": "seconds between two looks (0.2 to 10; default 1)"})
    last_event_id = fields.String(metadata={"description": "as the Last-Event-ID header: the id to go on from"})


class DeletedOut(Out):
    deleted = fields.Integer(metadata={"description": "how many dead letters were deleted"})


class DurationsOut(Out):
    p50 = fields.Float(allow_none=True, metadata={"description": "milliseconds; null without attempts in 5 minutes"})
    p95 = fields.Float(allow_none=True)


class QueueOut(Out):
    depth = fields.Integer()
    scheduled = fields.Integer()
    in_flight = fields.Integer()
    stalled = fields.Integer()
    dead_letters = fields.Integer()
    queued = fields.Integer()
    ambiguous = fields.Integer()
    failure_rate_5m = fields.Float()
    attempts_5m = fields.Integer()
    duration_ms = fields.Nested(DurationsOut)
    # due messages held back now, per limit: {"account": n, "campaign:<id>:minute": n, ...}
    waiting = fields.Dict(keys=fields.String(), values=fields.Integer())


def _status(c) -> dict:
    return CampaignStatusOut().dump(c)


def _message(m: Message) -> dict:
    return MessageOut().dump(m)


@bp.post("/campaigns/<int:campaign_id>/launch")
@doc("Launch a draft campaign (fan-out runs in the background); again: no change; paused: 409, resume it",
     response=CampaignStatusOut, status=202, errors=(409, 422))
def launch_campaign(campaign_id):
    db = get_db()
    c = engine.launch(db, g.workspace_id, campaign_id)
    db.commit()  # queues the fan-out (campaigns.effects)
    return _status(c), 202


@bp.post("/campaigns/<int:campaign_id>/pause")
@doc("Pause: no new send of the campaign starts once this returns", response=CampaignStatusOut, errors=(409,))
def pause_campaign(campaign_id):
    db = get_db()
    c = engine.pause(db, g.workspace_id, campaign_id, reason="paused by a user")
    db.commit()
    return _status(c)


@bp.post("/campaigns/<int:campaign_id>/resume")
@doc("Resume a paused campaign", response=CampaignStatusOut, errors=(409,))
def resume_campaign(campaign_id):
    db = get_db()
    c = engine.resume(db, g.workspace_id, campaign_id)
    db.commit()  # wakes the dispatcher
    return _status(c)


@bp.post("/campaigns/<int:campaign_id>/cancel")
@doc("Cancel a running or paused campaign: pending messages are cancelled, sequences stop (a draft: 409, "
     "delete it instead)", response=CampaignStatusOut, errors=(409,))
def cancel_campaign(campaign_id):
    db = get_db()
    c = engine.cancel(db, g.workspace_id, campaign_id)
    db.commit()
    return _status(c)


@bp.post("/campaigns/<int:campaign_id>/test-send")
@doc("Send one step to any address, first in line, kept out of statistics; 409 when the address is suppressed",
     request=TestSendIn, response=MessageOut, status=202, errors=(409,))
def test_send(campaign_id):
    data = TestSendIn().load(json_body())
    db = get_db()
    msg = engine.test_send(db, g.workspace_id, campaign_id, data["email"], data.get("step"))
    db.commit()  # queues the send, first in line
    return _message(msg), 202


@bp.get("/campaigns/<int:campaign_id>/stream")
@doc("Server-sent events: the campaign's counts as they change; closes within 60 s (reconnect with Last-Event-ID); "
     "429 with Retry-After past the bound on open streams",
     query=StreamQuery, response=EventStream({"progress": StreamProgressOut, "end": StreamEndOut}), errors=(429,))
def campaign_stream(campaign_id):
    engine.get_campaign(get_db(), g.workspace_id, campaign_id)
    get_db().close()
    try:
        lifetime = float(request.args.get("lifetime", 55))
        interval = float(request.args.get("interval", 1))
    except ValueError:
        raise BadRequest("lifetime and interval must be numbers") from None
    if not (math.isfinite(lifetime) and math.isfinite(interval)):
        raise BadRequest("lifetime and interval must be finite numbers")
    lifetime, interval = min(lifetime, 55.0), min(max(interval, 0.2), 10.0)
    last_id = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or ""
    # Our own ids are ASCII digits; anything else (a reconnect from elsewhere, "²") starts at 0.
    first_seq = int(last_id) if last_id.isascii() and last_id.isdigit() and len(last_id) <= 18 else 0

    def snapshot(session):
        c = engine.get_campaign(session, g.workspace_id, campaign_id)
        # shared by every viewer of the campaign in this process; counted afresh once it has ended
        totals, per_step = stats.shared_campaign_stats(session, campaign_id, max_age=interval,
                                                 fresh=c.status in ("completed", "cancelled"))
        return {
            "id": c.id, "status": c.status, "status_reason": c.status_reason, "stats": totals,
            "steps": {str(k): v for k, v in per_step.items()},
        }

    def events():
        started = time.monotonic()
        seq = first_seq
        previous = None
        yield "retry: 2000\n\n"
        while time.monotonic() - started < lifetime:
            session = new_session()
            try:
                data = snapshot(session)
            except TRANSIENT_ERRORS:  # the database is away for a moment: keep the stream, try again
                yield ": the database is not answering\n\n"
                time.sleep(interval)
                continue
            finally:
                session.close()
            body = json.dumps(data, sort_keys=True)
            if body != previous:
                seq += 1
                previous = body
                yield f"id: {seq}\nevent: progress\ndata: {body}\n\n"
                if data["status"] in ("completed", "cancelled"):
                    yield f"id: {seq}\nevent: end\ndata: {json.dumps({'status': data['status']})}\n\n"
                    return
            else:
                yield ": keep-alive\n\n"
            time.sleep(interval)

    release = streams.limiter().acquire(g.workspace_id)  # a thread each: bounded (web/streams.py)
    if release is None:
        return streams.busy_response(g.workspace_id)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    resp = Response(stream_with_context(streams.releasing(events(), release)), mimetype="text/event-stream",
                    headers=headers)
    resp.call_on_close(release)  # the server closes every response, a client gone mid-stream too
    return resp


@bp.get("/messages")
@doc("The message log: filter by campaign_id, status, email; cursor pagination", query=MessageQuery,
     response=MessagePage)
def list_messages():
    stmt = select(Message).where(Message.workspace_id == g.workspace_id)
    campaign_id = int_arg("campaign_id")
    if campaign_id is not None:
        stmt = stmt.where(Message.campaign_id == campaign_id)
    status = request.args.get("status")
    if status:
        if status not in MESSAGE_STATUSES:
            raise BadRequest(f"status must be one of {', '.join(MESSAGE_STATUSES)}")
        stmt = stmt.where(Message.status == status)
    email = request.args.get("email")
    if email:  # an address no row can hold (NUL, lone surrogates) matches nothing, as for contacts
        bad = contacts.text_problem(email)
        stmt = stmt.where(false()) if bad else stmt.where(Message.email == email.strip().lower())
    step_id = int_arg("step_id")
    if step_id is not None:
        stmt = stmt.where(Message.step_id == step_id)
    return MessagePage().dump(paginate(get_db(), stmt, Message))


def _own_message(message_id) -> Message:
    m = get_db().get(Message, message_id) if contacts.valid_id(message_id) else None
    if m is None or m.workspace_id != g.workspace_id:
        raise NotFound("no such message")
    return m


@bp.get("/messages/<int:message_id>")
@doc("One message with its attempts and events", response=MessageDetailOut)
def get_message(message_id):
    m = _own_message(message_id)
    db = get_db()
    attempts = db.scalars(select(MessageAttempt).where(MessageAttempt.message_id == m.id).order_by(MessageAttempt.id))
    events = db.scalars(select(Event).where(Event.message_id == m.id).order_by(Event.id))
    return MessageDetailOut().dump(With(m, attempts_log=list(attempts), events=list(events)))


@bp.post("/messages/<int:message_id>/replay")
@doc("Queue a dead letter again, same message key", response=MessageOut, status=202, errors=(409,))
def replay_message(message_id):
    db = get_db()
    _own_message(message_id)
    m = engine.replay_message(db, g.workspace_id, message_id)
    db.commit()  # queues the test send again, or wakes the dispatcher
    return _message(m), 202


@bp.post("/campaigns/<int:campaign_id>/replay-failed")
@doc("Queue every dead letter of the campaign again, same message keys", response=ReplayedOut, status=202,
     errors=(409,))
def replay_failed(campaign_id):
    db = get_db()
    n = engine.replay_failed(db, g.workspace_id, campaign_id)
    db.commit()  # wakes the dispatcher
    return ReplayedOut().dump({"replayed": n}), 202


@bp.delete("/messages/<int:message_id>")
@doc("Delete a dead letter (a failed message) and its attempts for good; 409 for any other status", status=204)
def delete_message(message_id):
    db = get_db()
    engine.delete_dead_letter(db, g.workspace_id, message_id)  # NotFound for another workspace's
    db.commit()
    return "", 204


@bp.post("/campaigns/<int:campaign_id>/delete-failed")
@doc("Delete every dead letter of the campaign and their attempts for good", response=DeletedOut)
def delete_failed(campaign_id):
    db = get_db()
    n = engine.delete_failed(db, g.workspace_id, campaign_id)
    db.commit()
    return DeletedOut().dump({"deleted": n})


@bp.get("/queue")
@doc("Queue health: depth, scheduled, in flight, stalled, dead letters, failure rate, durations", response=QueueOut)
def queue():
    return QueueOut().dump(queue_health.snapshot(get_db(), huey, workspace_id=g.workspace_id))
