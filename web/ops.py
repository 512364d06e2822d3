"""Operational endpoints: /healthz and /metrics."""

from __future__ import annotations

from flask import Blueprint, jsonify
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import text

from campaigns.queue_health import collect_metrics
from campaigns.ratelimit import get_limiter
from tasks import huey, queue_store_ok

from .db import get_db

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    checks = {}
    try:
        get_db().execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        queue_store_ok()
        checks["queue"] = "ok"
    except Exception as exc:
        checks["queue"] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return jsonify({"status": "ok" if ok else "unavailable", "checks": checks}), (200 if ok else 503)


@bp.get("/metrics")
def metrics():
    """Prometheus text format, computed at scrape time from the ledger and the shared counters."""

    try:
        counters = get_limiter().counters()
    except Exception:  # the limiter store being down must not hide the rest
        counters = {}
    families = collect_metrics(get_db(), huey, counters)

    class _Snapshot:
        def collect(self):
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot())
    return generate_latest(registry), 200, {"Content-Type": CONTENT_TYPE_LATEST}
