"""Campaign rules: create, edit and delete campaigns and their steps, and what a campaign may hold.

Input is checked in two passes, and every problem comes back at once as an ``InvalidInput``
(422, code ``validation_failed``) whose details map a flat field path to its messages, the
same way for the body's shape and for the domain's checks::

    {"name": [...], "send_window.start": [...], "steps[1].seconds": [...], "steps[2].html": ["line 3: ..."]}

1. Shape (marshmallow, ``CampaignSchema``): types are strict (``"5"`` is not a number, ``1`` is
   not a boolean), unknown keys are refused at every level.
2. Domain: the list belongs to the workspace; each email step's templates compile and name
   nothing outside ``contact``/``campaign``/``unsubscribe_url`` (``campaigns.templating``).

Decisions the engine relies on:

- ``send_window``: ``start``/``end`` are ``HH:MM`` (24 h), ``start != end``. A window whose
  ``end`` is earlier than its ``start`` crosses midnight (``22:00``-``06:00``); ``days`` names
  the day on which the window *opens*. ``timezone`` is ``"contact"`` (each contact's own zone,
  else ``fallback_timezone``, default ``UTC``) or an IANA name. ``days`` is stored in week order.
  No window (``null``) means any time.
- ``limits``: ``per_minute``/``per_day`` positive; ``sender`` (``daily_cap``, ``warmup`` with
  ``start``/``increment``, ``min_gap_seconds``/``max_gap_seconds``) is stored as given.
- Steps are stored at positions ``0..n-1``; an update that carries ``steps`` replaces them all
  (new rows, new ids). A sequence may start or end with a wait; it needs one email step.
- Only a draft can be edited; a running or paused campaign cannot be deleted. Both take the
  campaign row's lock (``FOR UPDATE`` on PostgreSQL) so they do not race a launch.

Nothing here commits: the caller owns the transaction.
"""

from __future__ import annotations

import functools
import re
import zoneinfo

from email_validator import EmailNotValidError, validate_email
from marshmallow import RAISE, Schema, ValidationError, fields, post_load, validate, validates, validates_schema
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from . import templating
from .contacts import text_problem
from .errors import BadRequest, Conflict, InvalidInput, NotFound
from .ids import MAX_ID, valid_id
from .models import Campaign, Contact, ContactList, Step

STATUSES = ("draft", "running", "paused", "completed", "cancelled")
EDITABLE = ("draft",)
DELETABLE = ("draft", "completed", "cancelled")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
STOP_ON = ("reply", "click", "open")
MAX_STEPS = 100
MAX_WAIT_SECONDS = 365 * 24 * 3600
MAX_TEMPLATE_CHARS = 1_000_000
MAX_SUBJECT_CHARS = 2_000
MAX_RATE = 10_000_000
MAX_GAP_SECONDS = 24 * 3600
HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


# --------------------------------------------------------------------------- field helpers


class Text(fields.String):
    """A string the database can store and a header can carry: no NUL (PostgreSQL refuses it),
    no lone surrogate (not UTF-8: the driver refused it with a 500)."""

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        problem = text_problem(value)
        if problem:
            raise ValidationError(problem)
        return value


def _id(**kw):
    return fields.Integer(strict=True, validate=validate.Range(min=1, max=MAX_ID, error="not a valid id"), **kw)


def _int(**kw):
    return fields.Integer(strict=True, **kw)


class StrictBoolean(fields.Boolean):
    """``true`` or ``false`` only: not ``1``, ``"yes"`` or ``"true"``."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


def _bool(**kw):
    return StrictBoolean(**kw)


def _not_blank(value: str) -> None:
    if not value.strip():
        raise ValidationError("must not be blank")


class EmailAddress(Text):
    """An email address checked with email-validator (syntax only), stored normalised."""

    default_error_messages = {"email": "not a valid email address: {reason}"}

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        try:
            return validate_email(value.strip(), check_deliverability=False).normalized
        except EmailNotValidError as exc:
            raise self.make_error("email", reason=str(exc)) from None


@functools.lru_cache(maxsize=1024)
def is_timezone(name: str) -> bool:
    if not name or name != name.strip() or name.startswith(("/", ".")):
        return False
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def _timezone(value: str) -> None:
    if not is_timezone(value):
        raise ValidationError(f"{value!r} is not an IANA time zone (e.g. 'Europe/Paris', 'UTC')")


class _Strict(Schema):
    class Meta:
        unknown = RAISE


# --------------------------------------------------------------------------- schemas


class SendWindowSchema(_Strict):
    start = Text(required=True, validate=validate.Regexp(HHMM, error="must be HH:MM (24-hour), e.g. 09:00"))
    end = Text(required=True, validate=validate.Regexp(HHMM, error="must be HH:MM (24-hour), e.g. 17:00"))
    days = fields.List(
        Text(validate=validate.OneOf(DAYS, error="must be one of mon, tue, wed, thu, fri, sat, sun")),
        required=True,
        validate=validate.Length(min=1, error="name at least one day"),
    )
    timezone = Text(required=True)
    fallback_timezone = Text(load_default="UTC", validate=_timezone)

    @validates("days")
    def _days(self, value, **_kw):
        if len(set(value)) != len(value):
            raise ValidationError("a day is named twice")

    @validates("timezone")
    def _tz(self, value, **_kw):
        if value != "contact":
            _timezone(value)

    @validates_schema
    def _window(self, data, **_kw):
        if data.get("start") is not None and data.get("start") == data.get("end"):
            raise ValidationError("start and end must differ (an end before the start crosses midnight)", "end")

    @post_load
    def _order(self, data, **_kw):
        data["days"] = [d for d in DAYS if d in data["days"]]
        return data


class WarmupSchema(_Strict):
    start = _int(required=True, validate=validate.Range(min=1, max=MAX_RATE))
    increment = _int(required=True, validate=validate.Range(min=1, max=MAX_RATE))


class SenderSchema(_Strict):
    daily_cap = _int(validate=validate.Range(min=1, max=MAX_RATE))
    warmup = fields.Nested(WarmupSchema)
    min_gap_seconds = _int(validate=validate.Range(min=0, max=MAX_GAP_SECONDS))
    max_gap_seconds = _int(validate=validate.Range(min=0, max=MAX_GAP_SECONDS))

    @validates_schema
    def _gaps(self, data, **_kw):
        low, high = data.get("min_gap_seconds"), data.get("max_gap_seconds")
        if low is not None and high is not None and low > high:
            raise ValidationError("must not be less than min_gap_seconds", "max_gap_seconds")


class LimitsSchema(_Strict):
    per_minute = _int(validate=validate.Range(min=1, max=MAX_RATE))
    per_day = _int(validate=validate.Range(min=1, max=MAX_RATE))
    sender = fields.Nested(SenderSchema)


class TrackingSchema(_Strict):
    opens = _bool(load_default=True)
    clicks = _bool(load_default=True)


class StepSchema(_Strict):
    """An email step ``{"type": "email", "subject", "html", "text"?}`` or ``{"type": "wait", "seconds"}``."""

    type = Text(required=True, validate=validate.OneOf(("email", "wait"), error="must be 'email' or 'wait'"))
    subject = Text(validate=[validate.Length(max=MAX_SUBJECT_CHARS), _not_blank])
    html = Text(validate=[validate.Length(max=MAX_TEMPLATE_CHARS), _not_blank])
    text = Text(allow_none=True, validate=validate.Length(max=MAX_TEMPLATE_CHARS))
    seconds = _int(validate=validate.Range(min=1, max=MAX_WAIT_SECONDS))

    @validates_schema
    def _by_type(self, data, **_kw):
        errors: dict[str, list[str]] = {}
        if data["type"] == "email":
            for name in ("subject", "html"):
                if name not in data:
                    errors[name] = ["required in an email step"]
            if "seconds" in data:
                errors["seconds"] = ["only a wait step has seconds"]
        else:
            if "seconds" not in data:
                errors["seconds"] = ["required in a wait step"]
            for name in ("subject", "html", "text"):
                if name in data:
                    errors[name] = ["only an email step has " + name]
        if errors:
            raise ValidationError(errors)

    @post_load
    def _blank_text(self, data, **_kw):
        if data.get("text") is not None and not data["text"].strip():
            data["text"] = None  # no text template: the text part is derived from the HTML
        return data


class CampaignSchema(_Strict):
    """The body of ``POST /api/v1/campaigns``."""

    name = Text(required=True, validate=[validate.Length(max=200), _not_blank])
    list_id = _id(required=True)
    from_email = EmailAddress(required=True)
    from_name = Text(allow_none=True, validate=validate.Length(max=200))
    reply_to = EmailAddress(allow_none=True)
    send_window = fields.Nested(SendWindowSchema, allow_none=True)
    limits = fields.Nested(LimitsSchema, load_default=dict)
    stop_on = fields.List(
        Text(validate=validate.OneOf(STOP_ON, error="must be one of reply, click, open")),
        load_default=lambda: ["reply"],
    )
    tracking = fields.Nested(TrackingSchema, load_default=lambda: {"opens": True, "clicks": True})
    max_attempts = _int(load_default=5, validate=validate.Range(min=1, max=20))
    steps = fields.List(
        fields.Nested(StepSchema),
        required=True,
        validate=validate.Length(min=1, max=MAX_STEPS, error="a campaign needs between {min} and {max} steps"),
    )

    @validates_schema  # skipped when a field is wrong, so every step here is well-formed
    def _one_email(self, data, **_kw):
        steps = data.get("steps")
        if steps and not any(step["type"] == "email" for step in steps):
            raise ValidationError("a campaign needs at least one email step", "steps")

    @validates("stop_on")
    def _stop_on(self, value, **_kw):
        if len(set(value)) != len(value):
            raise ValidationError("a value is named twice")

    @post_load
    def _tidy(self, data, **_kw):
        if "name" in data:
            data["name"] = data["name"].strip()
        if data.get("from_name") is not None:
            data["from_name"] = data["from_name"].strip() or None
        if "stop_on" in data:
            data["stop_on"] = [s for s in STOP_ON if s in data["stop_on"]]
        return data


class CampaignUpdateSchema(CampaignSchema):
    """The body of ``PATCH /api/v1/campaigns/<id>``: the same fields, each optional; a field
    given replaces the stored one (``steps`` replaces every step; ``null`` clears
    ``from_name``, ``reply_to`` and ``send_window``)."""

    def __init__(self, **kwargs):
        # Partial at the top level only: a send_window given still needs its start and end.
        kwargs.setdefault("partial", tuple(self._declared_fields))
        super().__init__(**kwargs)


# --------------------------------------------------------------------------- validation


def flatten_errors(messages, prefix: str = "") -> dict[str, list[str]]:
    """marshmallow's nested messages as ``{"steps[1].seconds": [...], "send_window.start": [...]}``."""
    out: dict[str, list[str]] = {}
    if isinstance(messages, dict):
        for key, value in messages.items():
            if key == "_schema":
                path = prefix or "_schema"
            elif isinstance(key, int):
                path = f"{prefix}[{key}]"
            else:
                path = f"{prefix}.{key}" if prefix else str(key)
            for k, v in flatten_errors(value, path).items():
                out.setdefault(k, []).extend(v)
    elif isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        out[prefix or "_schema"] = list(messages)
    elif isinstance(messages, list):
        for value in messages:
            for k, v in flatten_errors(value, prefix).items():
                out.setdefault(k, []).extend(v)
    else:
        out[prefix or "_schema"] = [str(messages)]
    return out


def _invalid(errors: dict[str, list[str]], what: str = "the campaign") -> InvalidInput:
    field, problems = next(iter(errors.items()))
    more = sum(len(p) for p in errors.values()) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return InvalidInput(f"{what} is not valid: {field}: {problems[0]}{tail}", details=errors,
                        code="validation_failed")


def _load(schema: Schema, data, what: str = "the campaign") -> dict:
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise _invalid(flatten_errors(exc.messages), what) from None


def _domain_errors(session: Session, workspace_id: int, data: dict) -> dict[str, list[str]]:
    errors: dict[str, list[str]] = {}
    if "list_id" in data:
        found = session.scalar(
            select(ContactList.id).where(ContactList.id == data["list_id"], ContactList.workspace_id == workspace_id)
        )
        if found is None:
            errors["list_id"] = [f"there is no list {data['list_id']} in this workspace"]
    for i, step in enumerate(data.get("steps") or ()):
        if step["type"] == "email":
            errors.update(templating.template_errors(step["subject"], step["html"], step.get("text"), f"steps[{i}]"))
    return errors


def validate_campaign(session: Session, workspace_id: int, data, partial: bool = False) -> dict:
    """The checked, normalised campaign data; raises ``InvalidInput`` with every problem."""
    loaded = _load(CampaignUpdateSchema() if partial else CampaignSchema(), data)
    errors = _domain_errors(session, workspace_id, loaded)
    if errors:
        raise _invalid(errors)
    return loaded


# --------------------------------------------------------------------------- persistence


SCALARS = ("name", "list_id", "from_email", "from_name", "reply_to", "send_window", "limits", "stop_on",
           "tracking", "max_attempts")


def _make_steps(workspace_id: int, steps: list[dict]) -> list[Step]:
    return [
        Step(
            workspace_id=workspace_id,
            position=i,
            type=s["type"],
            subject=s.get("subject"),
            html=s.get("html"),
            text=s.get("text"),
            wait_seconds=s.get("seconds"),
        )
        for i, s in enumerate(steps)
    ]


def create_campaign(session: Session, workspace_id: int, data) -> Campaign:
    """A new draft campaign with its steps (flushed, not committed)."""
    loaded = validate_campaign(session, workspace_id, data)
    campaign = Campaign(workspace_id=workspace_id, status="draft", **{k: loaded.get(k) for k in SCALARS})
    campaign.steps = _make_steps(workspace_id, loaded["steps"])
    session.add(campaign)
    session.flush()
    return campaign


def get_campaign(session: Session, workspace_id: int, campaign_id: int, for_update: bool = False) -> Campaign:
    """The workspace's campaign, or ``NotFound`` (also for another workspace's campaign)."""
    campaign = None
    if valid_id(campaign_id):  # a larger number is no id, and PostgreSQL would refuse it
        stmt = select(Campaign).where(Campaign.id == campaign_id, Campaign.workspace_id == workspace_id)
        if for_update:
            stmt = stmt.with_for_update()
        campaign = session.scalar(stmt)
    if campaign is None:
        raise NotFound(f"there is no campaign {campaign_id}", details={"campaign_id": campaign_id})
    return campaign


def _lock(session: Session, campaign: Campaign) -> None:
    # Re-read the status under the row lock, so a launch committed meanwhile is seen.
    session.refresh(campaign, attribute_names=["status"], with_for_update=True)


def update_campaign(session: Session, campaign: Campaign, data) -> Campaign:
    """Apply a partial update to a draft; ``Conflict`` (409) once it has been launched."""
    _lock(session, campaign)
    if campaign.status not in EDITABLE:
        raise Conflict(
            f"campaign {campaign.id} is {campaign.status}; only a draft can be edited",
            details={"status": campaign.status},
            code="campaign_not_draft",
        )
    loaded = validate_campaign(session, campaign.workspace_id, data, partial=True)
    for key in SCALARS:
        if key in loaded:
            setattr(campaign, key, loaded[key])
    if "steps" in loaded:
        # Delete the old rows first: the (campaign, position) unique key would refuse the new
        # rows if the unit of work inserted them before deleting (it does inserts first).
        campaign.steps.clear()
        session.flush()
        campaign.steps = _make_steps(campaign.workspace_id, loaded["steps"])
    session.flush()
    return campaign


def delete_campaign(session: Session, campaign: Campaign) -> None:
    """Delete a draft, completed or cancelled campaign with its steps, enrollments and ledger."""
    _lock(session, campaign)
    if campaign.status not in DELETABLE:
        raise Conflict(
            f"campaign {campaign.id} is {campaign.status}; cancel it before deleting it",
            details={"status": campaign.status},
            code="campaign_active",
        )
    session.delete(campaign)
    session.flush()


def campaigns_query(workspace_id: int, status: str | None = None):
    """The select for a workspace's campaigns (steps loaded eagerly), for ``paginate``."""
    stmt = select(Campaign).where(Campaign.workspace_id == workspace_id).options(selectinload(Campaign.steps))
    if status:
        if status not in STATUSES:
            raise BadRequest(f"status must be one of {', '.join(STATUSES)}", details={"status": [status]})
        stmt = stmt.where(Campaign.status == status)
    return stmt


# --------------------------------------------------------------------------- preview


class PreviewSchema(_Strict):
    """The body of ``POST /api/v1/campaigns/<id>/preview``: which step (position; default the
    first email step), for whom (``contact_id``, or ``email`` of a contact, else a sample
    contact), and optionally unsaved ``subject``/``html``/``text`` that replace the step's."""

    step = _int(validate=validate.Range(min=0, max=MAX_STEPS))
    contact_id = _id()
    email = Text(validate=validate.Length(max=320))
    subject = Text(validate=validate.Length(max=MAX_SUBJECT_CHARS))
    html = Text(validate=validate.Length(max=MAX_TEMPLATE_CHARS))
    text = Text(allow_none=True, validate=validate.Length(max=MAX_TEMPLATE_CHARS))

    @validates_schema
    def _one_contact(self, data, **_kw):
        if "contact_id" in data and "email" in data:
            raise ValidationError("give contact_id or email, not both", "email")


def _preview_contact(session: Session, workspace_id: int, data: dict):
    if "contact_id" in data:
        contact = session.scalar(
            select(Contact).where(Contact.id == data["contact_id"], Contact.workspace_id == workspace_id)
        )
        if contact is None:
            raise NotFound(f"there is no contact {data['contact_id']}", details={"contact_id": data["contact_id"]})
        return contact
    if data.get("email"):
        email = data["email"].strip().lower()
        contact = session.scalar(
            select(Contact).where(Contact.workspace_id == workspace_id, Contact.email == email)
        )
        return contact or {**templating.SAMPLE_CONTACT, "email": email, "first_name": None, "last_name": None}
    return dict(templating.SAMPLE_CONTACT)


def preview_step(session: Session, campaign: Campaign, data, unsubscribe_url: str) -> dict:
    """Render one email step of the campaign for a contact: ``{"step", "contact", "subject",
    "html", "text", "errors"}``. Template problems come back in ``errors`` (the rendered
    parts are then ``None``); a bad request (no such step or contact) raises."""
    loaded = _load(PreviewSchema(), data, "the preview request")
    steps = list(campaign.steps)
    overrides = {k: loaded[k] for k in templating.TEMPLATE_FIELDS if k in loaded}
    step = None
    if "step" in loaded:
        step = next((s for s in steps if s.position == loaded["step"]), None)
        if step is None:
            raise _invalid({"step": [f"the campaign has no step at position {loaded['step']}"]}, "the preview request")
        if step.type != "email":
            raise _invalid({"step": [f"step {loaded['step']} is a wait step; only email steps render"]},
                           "the preview request")
    elif not ("subject" in overrides and "html" in overrides):
        step = next((s for s in steps if s.type == "email"), None)
        if step is None:
            raise _invalid({"step": ["the campaign has no email step; send subject and html to preview them"]},
                           "the preview request")
    source = {k: getattr(step, k) if step is not None else None for k in templating.TEMPLATE_FIELDS}
    source.update(overrides)
    contact = _preview_contact(session, campaign.workspace_id, loaded)
    result = templating.preview(source, contact, campaign, unsubscribe_url)
    contact_id = contact.get("id") if isinstance(contact, dict) else contact.id
    contact_email = contact.get("email") if isinstance(contact, dict) else contact.email
    return {
        "step": step.position if step is not None else None,
        "contact": {"id": contact_id, "email": contact_email},
        **result,
    }


# --------------------------------------------------------------------------- templates saved by older versions

OPEN_STATUSES = ("draft", "scheduled", "running", "paused")


def refused_templates(session: Session) -> list[tuple[Campaign, Step, dict]]:
    """The email steps of campaigns that may still send (every workspace) whose templates the
    template language refuses now, with ``{field: ["line N: message", ...]}``. Templates saved
    by an older Herald may use what the allow-list no longer has (``|format``, methods...): each
    of their emails would fail at send, so an upgrade is checked with this first
    (``flask --app wsgi check-templates``)."""
    found = []
    rows = session.execute(
        select(Campaign, Step).join(Step, Step.campaign_id == Campaign.id)
        .where(Campaign.status.in_(OPEN_STATUSES), Step.type == "email")
        .order_by(Campaign.id, Step.position)
    ).all()
    for campaign, step in rows:
        errors = templating.template_errors(step.subject, step.html, step.text, f"steps[{step.position}]")
        if errors:
            found.append((campaign, step, errors))
    return found
