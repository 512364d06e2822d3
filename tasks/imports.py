"""Background CSV imports: the API saves the upload and queues its ``Import`` id here."""

from __future__ import annotations

import logging

from huey.signals import SIGNAL_INTERRUPTED

from campaigns import importer

from . import jobs
from .engine import RECONCILE_SWEEPS
from .queue import huey

log = logging.getLogger(__name__)


@huey.task(retries=0)
def run_import(import_id: int) -> None:
    """Run one queued import (see ``campaigns.importer.run_import``), then let running
    campaigns of the target list enroll the new members."""
    report = importer.run_import(import_id)
    # Notified on every finished run into a list, not only when this run added members: a
    # resumed import's earlier part added members that were not announced yet.
    if report is not None and report.list_id is not None:
        jobs.notify_list_changed(report.list_id)


@huey.signal(SIGNAL_INTERRUPTED)
def requeue_interrupted_import(signal, task, *args, **kwargs) -> None:
    """The consumer is stopping with an import unfinished: put it back in the queue; the next
    run resumes after the last committed batch (the rows are upserts, so nothing doubles)."""
    if not isinstance(task, run_import.task_class):
        return
    (import_id,) = task.args
    if importer.release_import(import_id):
        log.warning("import %s interrupted; queued again, it will resume", import_id)
        run_import(import_id)


def requeue_stale_imports() -> int:
    """Queue again the imports whose run is gone (``importer.stale_imports``: a consumer killed
    mid-import, or a task lost with the queue store); the new run takes over and resumes.
    Called by the reconciler."""
    ids = importer.stale_imports()
    for import_id in ids:
        run_import(import_id)
    if ids:
        log.warning("imports %s had no live run; queued again, they will resume", ids)
    return len(ids)


RECONCILE_SWEEPS.append(requeue_stale_imports)
