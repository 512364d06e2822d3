"""What the campaign pages show about a campaign: the launch summary, its settings in words,
and the sends-over-time chart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, case, exists, func, select

from campaigns import campaign_rules as rules
from campaigns.db import is_postgres, utcnow
from campaigns.models import Campaign, Contact, ContactList, Enrollment, ListMember, Message, Suppression
from campaigns.stats import shared

DAY_LABELS = {"mon": "Mon", "tue": "Tue", "wed": "Wed", "thu": "Thu", "fri": "Fri", "sat": "Sat", "sun": "Sun"}


def launch_summary(db, c: Campaign) -> dict:
    """What launching would do: who is enrolled, who is skipped and why, what is sent."""
    email_steps = [s for s in c.steps if s.type == "email"]
    # Waits after the last email delay nothing: the sequence completes when its last email is sent.
    last_email = max((s.position for s in email_steps), default=-1)
    total_wait = sum(s.wait_seconds or 0 for s in c.steps if s.type == "wait" and s.position < last_email)
    trailing_wait = sum(s.wait_seconds or 0 for s in c.steps if s.type == "wait" and s.position > last_email)
    out = {"list": None, "members": 0, "eligible": 0, "suppressed": 0, "inactive": 0, "inactive_by_status": {},
           "email_steps": len(email_steps), "total_wait": total_wait, "trailing_wait": trailing_wait,
           "enrolled": None}
    if c.list_id is None:
        return out
    out["list"] = db.get(ContactList, c.list_id)
    suppressed = exists().where(Suppression.workspace_id == Contact.workspace_id, Suppression.email == Contact.email)
    row = db.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((suppressed, 1), else_=0)), 0),
            func.coalesce(func.sum(case((and_(~suppressed, Contact.status == "active"), 1), else_=0)), 0),
        )
        .select_from(ListMember)
        .join(Contact, Contact.id == ListMember.contact_id)
        .where(ListMember.list_id == c.list_id, Contact.workspace_id == c.workspace_id)
    ).one()
    out["members"], out["suppressed"], out["eligible"] = (int(v) for v in row)
    out["inactive"] = out["members"] - out["suppressed"] - out["eligible"]
    if out["inactive"]:
        out["inactive_by_status"] = dict(
            db.execute(
                select(Contact.status, func.count())
                .select_from(ListMember)
                .join(Contact, Contact.id == ListMember.contact_id)
                .where(ListMember.list_id == c.list_id, Contact.status != "active", ~suppressed)
                .group_by(Contact.status)
            ).all()
        )
    if c.status != "draft":
        out["enrolled"] = db.scalar(select(func.count()).select_from(Enrollment)
                                    .where(Enrollment.campaign_id == c.id))
    return out


def describe_window(window: dict | None) -> str:
    if not window:
        return "Any day, any time."
    days = window.get("days") or []
    if days == list(rules.DAYS):
        day_text = "every day"
    elif days == ["mon", "tue", "wed", "thu", "fri"]:
        day_text = "Monday to Friday"
    else:
        day_text = ", ".join(DAY_LABELS[d] for d in days)
    tz = window.get("timezone")
    tz_text = (f"in each contact's time zone ({window.get('fallback_timezone') or 'UTC'} when unknown)"
               if tz == "contact" else f"in {tz}")
    return f"{day_text}, {window.get('start')}–{window.get('end')} {tz_text}."


def describe_limits(limits: dict | None) -> str:
    limits = limits or {}
    parts = []
    if limits.get("per_minute"):
        parts.append(f"at most {limits['per_minute']:,} a minute")
    if limits.get("per_day"):
        parts.append(f"at most {limits['per_day']:,} a day")
    sender = limits.get("sender") or {}
    if sender.get("daily_cap"):
        parts.append(f"sender cap {sender['daily_cap']:,} a day")
    if sender.get("warmup"):
        parts.append(f"warm-up from {sender['warmup']['start']:,} a day, +{sender['warmup']['increment']:,} daily")
    if sender.get("min_gap_seconds") or sender.get("max_gap_seconds"):
        parts.append(f"{sender.get('min_gap_seconds', 0)}–{sender.get('max_gap_seconds', 0)} s between sends")
    return ("; ".join(parts) + ".").capitalize() if parts else "Only the account's rate limit."


def describe_stop_on(stop_on: list | None) -> str:
    names = {"reply": "reply", "click": "click a link", "open": "open an email"}
    items = [names[s] for s in (stop_on if stop_on is not None else ["reply"]) if s in names]
    base = "A contact's sequence stops when they unsubscribe, bounce or report spam"
    return base + (f", or when they {' or '.join(items)}." if items else ".")


def sends_per_minute(db, campaign_id: int) -> list[tuple[datetime, int]]:
    """(minute, emails first accepted by the provider in it), test sends left out."""
    if is_postgres(db):
        bucket = func.date_trunc("minute", Message.sent_at)
    else:
        bucket = func.strftime("%Y-%m-%d %H:%M:00", Message.sent_at)
    rows = db.execute(
        select(bucket, func.count())
        .where(Message.campaign_id == campaign_id, Message.sent_at.is_not(None), Message.is_test.is_(False))
        .group_by(bucket)
        .order_by(bucket)
    ).all()
    out = []
    for when, n in rows:
        if isinstance(when, str):
            when = datetime.strptime(when, "%Y-%m-%d %H:%M:%S")
        out.append((when.replace(second=0, microsecond=0, tzinfo=None), int(n)))
    return out


BUCKET_MINUTES = (1, 2, 5, 10, 15, 30, 60, 120, 240, 720, 1440)
MAX_BARS = 90


def chart_data(points: list[tuple[datetime, int]], until: datetime | None = None) -> dict | None:
    """Geometry for the sends-over-time bar chart (inline SVG), one bar per minute, or per a
    wider bucket when the campaign spans more than ``MAX_BARS`` minutes."""
    if not points:
        return None
    start = points[0][0]
    end = max(points[-1][0], (until or points[-1][0]).replace(second=0, microsecond=0))
    span = int((end - start).total_seconds() // 60) + 1
    size = next((b for b in BUCKET_MINUTES if span / b <= MAX_BARS), BUCKET_MINUTES[-1])
    if size > 1:  # align the buckets on round times
        offset = (start.hour * 60 + start.minute) % size
        start -= timedelta(minutes=offset)
    n = int((end - start).total_seconds() // 60) // size + 1
    counts = [0] * n
    for when, count in points:
        counts[int((when - start).total_seconds() // 60) // size] += count
    top = max(counts) or 1
    nice = next((m * 10**e for e in range(0, 12) for m in (1, 2, 5) if m * 10**e >= top), top)
    width, height, left, bottom, top_pad = 960, 220, 44, 26, 10
    plot_w, plot_h = width - left - 8, height - bottom - top_pad
    slot = plot_w / n
    bars = []
    for i, count in enumerate(counts):
        h = plot_h * count / nice
        when = start + timedelta(minutes=i * size)
        bars.append({"x": round(left + i * slot + slot * 0.12, 2), "w": round(max(slot * 0.76, 1), 2),
                     "y": round(top_pad + plot_h - h, 2), "h": round(h, 2), "count": count,
                     "label": when.strftime("%H:%M"), "when": when})
    ticks = [{"y": round(top_pad + plot_h - plot_h * v / nice, 2), "value": v} for v in (0, nice // 2, nice)
             if v or v == 0]
    step = max(1, n // 6)
    xlabels = [{"x": round(left + i * slot + slot / 2, 2), "label": bars[i]["label"]} for i in range(0, n, step)]
    return {"width": width, "height": height, "left": left, "plot_w": plot_w, "base": top_pad + plot_h,
            "bars": bars, "ticks": ticks, "xlabels": xlabels, "bucket": size, "total": sum(counts),
            "peak": max(counts), "start": start, "end": start + timedelta(minutes=n * size)}


def sends_chart(db, c: Campaign, live: bool = False) -> dict | None:
    """``live``: for the page's refreshes while the campaign sends, a count shared by every viewer
    (campaigns.stats.shared: a big campaign is not counted again for each of them)."""
    until = utcnow() if c.status == "running" else None
    if live:
        points = shared(("chart", c.id), lambda: sends_per_minute(db, c.id), max_age=2.0,
                        fresh=c.status not in ("running", "paused"))
    else:
        points = sends_per_minute(db, c.id)
    return chart_data(points, until)


FOLLOW_AFTER_COMPLETION = timedelta(hours=1)


def follow_until(c: Campaign) -> int | None:
    """Until when (ms since the epoch) the campaign page keeps looking at a completed campaign's
    figures: delivery events, opens and clicks go on arriving after its last send."""
    if c.status != "completed" or c.finished_at is None or utcnow() - c.finished_at > FOLLOW_AFTER_COMPLETION:
        return None
    return int((c.finished_at + FOLLOW_AFTER_COMPLETION).replace(tzinfo=UTC).timestamp() * 1000)
