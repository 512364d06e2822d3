"""Work that must follow a commit: queue a launch's fan-out, wake the dispatcher, queue a test send.

The domain records an effect on the session (``after_commit(session, FANOUT, campaign_id)``);
once that session's transaction commits, each recorded effect runs once, in the order recorded,
through the handler registered for its kind. A rollback discards them. ``tasks`` registers the
handlers at import (``register``): campaigns/ never imports tasks/ or Huey.

A handler that raises (the queue store is away) raises out of the commit, after the other
effects ran: the change is stored, and the caller reports the failure (the API answers 503).
An effect with no handler (a process that never imported ``tasks``) is logged and dropped: the
reconciler finds what it would have queued within a minute.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import event
from sqlalchemy.orm import Session

FANOUT = "fanout"  # (campaign_id,): enroll a launched campaign's list
WAKE_DISPATCHER = "wake_dispatcher"  # (): work is due now
SEND_TEST = "send_test"  # (message_id,): a queued test send (the priority lane)

KEY = "herald_effects"
DUE = "herald_effects_due"  # committed, run when the transaction has ended
log = logging.getLogger("herald.effects")
_handlers: dict[str, Callable[..., object]] = {}


def register(kind: str, handler: Callable[..., object]) -> None:
    """Run ``handler(*args)`` for every ``kind`` effect of a committed transaction."""
    _handlers[kind] = handler


def after_commit(session: Session, kind: str, *args) -> None:
    """Run this effect once ``session``'s transaction commits (the same effect twice: once)."""
    pending = session.info.setdefault(KEY, [])
    if (kind, args) not in pending:
        pending.append((kind, args))


@event.listens_for(Session, "after_commit")
def _committed(session: Session) -> None:
    effects = session.info.pop(KEY, None)
    if effects:
        session.info[DUE] = effects


@event.listens_for(Session, "after_transaction_end")
def _run(session: Session, transaction) -> None:
    # Run once the committed transaction has ended, not in ``after_commit``: an error raised
    # there would leave the session unusable ("in 'committed' state"); here it is closed.
    # A rolled-back (or closed) transaction's effects are dropped; a savepoint's end is not the
    # transaction's, so a savepoint rolled back inside it keeps the effects recorded before it.
    if transaction.parent is not None:
        return
    session.info.pop(KEY, None)
    effects = session.info.pop(DUE, None)
    if not effects:
        return
    failure: BaseException | None = None
    for kind, args in effects:
        handler = _handlers.get(kind)
        if handler is None:
            log.warning("no handler for the %s effect %s: the reconciler will pick the work up", kind, args)
            continue
        try:
            handler(*args)
        except Exception as exc:  # the other effects still run; the first failure is raised
            failure = failure or exc
    if failure is not None:
        raise failure
