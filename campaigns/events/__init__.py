"""Delivery events from SendGrid's Event Webhook: stored in the request (``parse_batch``,
``store_batch``: deduplicated, mapped to messages), applied by a task (``process_pending``,
under the ``events`` lease). What each event does: docs/architecture.md, "Delivery events".

``parsing.py`` turns a request body into rows, ``storing.py`` writes them, ``applying.py``
applies them to messages, suppressions and sequences.
"""

from .applying import (
    BATCH,
    LEASE,
    ProcessReport,
    pending_count,
    process_batch,
    process_pending,
    suppression_reason,
)
from .parsing import event_row, message_key_of, parse_batch, provider_id_of
from .storing import insert_rows, map_rows, store_batch

__all__ = [
    "BATCH", "LEASE", "ProcessReport", "event_row", "insert_rows", "map_rows", "message_key_of",
    "parse_batch", "pending_count", "process_batch", "process_pending", "provider_id_of",
    "store_batch", "suppression_reason",
]
