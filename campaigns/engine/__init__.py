"""The campaign engine: launch and fan-out, dispatch, idempotent sending, retries, dead letters,
reconciliation. The message state machine, the stages and their guarantees are described in
docs/architecture.md.

``from campaigns import engine; engine.launch(...)``: the names the rest of Herald uses are
re-exported here. A test that patches a name patches it in the module that looks it up
(``engine.send.pace``, ``engine.record._record_once``), not here.
"""

from __future__ import annotations

from ..completion import UNSETTLED, maybe_complete
from ..db import utcnow
from ..ratelimit import get_limiter
from . import (
    common,
    dead_letters,
    dispatch,
    enrollment,
    lifecycle,
    limits,
    pacing,
    planning,
    reconciler,
    record,
    send,
    sequence,
)
from .common import BULK_PRIORITY, PENDING, SEND_BATCH, TEST_PRIORITY, Hooks, get_campaign, new_message_key, worker_id
from .dead_letters import delete_dead_letter, delete_failed, replay_failed, replay_message, settle_ambiguous
from .dispatch import DispatchResult, _next_due, _next_due_stmt, _queue_stmt, dispatch_once, run_dispatcher
from .enrollment import enroll_contact, enroll_new_members_of_list, fanout, fanout_in_parts, fanout_lease, unsuppress
from .lifecycle import cancel, launch, pause, resume, test_send
from .limits import (
    _read_limits,
    account_rule,
    campaign_rules,
    dispatch_horizon,
    sender_day0,
    sender_rules,
    waiting_on_limits,
    workspace_slots,
)
from .pacing import pace
from .planning import backoff_delay, retry_base, retry_cap, sender_key
from .reconciler import ReconcileReport, reconcile, stale_queued
from .record import _PG_RECORD_SENT, Outcome, _release_stmt
from .render import build_email, unsubscribe_url
from .send import SEND_GROUP, _claim_stmt, send_batch
from .sequence import _advance, _complete_enrollments_stmt, clear_caches

__all__ = [
    "utcnow", "get_limiter",
    "UNSETTLED", "maybe_complete", "common", "dead_letters", "dispatch", "enrollment", "lifecycle", "limits",
    "pacing", "planning", "record", "send", "reconciler", "sequence", "PENDING", "SEND_BATCH", "Hooks",
    "BULK_PRIORITY", "TEST_PRIORITY",
    "get_campaign", "new_message_key", "worker_id", "delete_dead_letter", "delete_failed", "replay_failed",
    "replay_message", "settle_ambiguous", "DispatchResult", "_next_due", "_next_due_stmt", "_queue_stmt",
    "dispatch_once", "run_dispatcher", "enroll_contact", "enroll_new_members_of_list", "fanout", "fanout_in_parts",
    "fanout_lease", "unsuppress", "cancel", "launch", "pause", "resume", "test_send", "_read_limits", "account_rule",
    "campaign_rules", "dispatch_horizon", "sender_day0", "sender_rules", "waiting_on_limits", "workspace_slots",
    "pace", "backoff_delay", "retry_base", "retry_cap", "sender_key", "ReconcileReport", "reconcile",
    "stale_queued", "_PG_RECORD_SENT", "Outcome", "_release_stmt", "build_email", "unsubscribe_url", "SEND_GROUP",
    "_claim_stmt", "send_batch", "_advance", "_complete_enrollments_stmt", "clear_caches",
]
