"""The sink's fault controls: answers it is told to give instead of a 202, and refused addresses.

A behaviour (``/_sink/behaviour``) is 429 with rate-limit headers, a 4xx/5xx, a slow answer or a
held request whose connection is then dropped ("hang"); behaviours queue up, each applying until
its count or seconds run out. Fail addresses (``/_sink/fail-addresses``) refuse any call that
names them. ``Faults`` holds no lock: ``SinkState`` calls it under its own.
"""

from __future__ import annotations

from collections import deque

from .wire import MSG_INVALID_ADDRESS, err, status_message


class Behaviour:
    """One queued answer: mode "429", "error" (a 4xx/5xx status), "slow", "hang" or "ok"."""

    __slots__ = ("mode", "status", "count", "until", "delay", "reset_in", "limit", "seconds")

    def __init__(self, spec: dict) -> None:
        mode = str(spec.get("mode", "ok")).lower()
        status = spec.get("status")
        if mode.isdigit():
            status = int(mode)
            mode = "429" if status == 429 else "error"
        elif mode in ("5xx", "error"):
            mode = "error"
            status = int(status) if status is not None else 500
        elif mode in ("429", "rate_limit", "ratelimit"):
            mode, status = "429", 429
        elif mode not in ("ok", "slow", "hang"):
            raise ValueError(f"unknown mode {mode!r}: use 429, 5xx, slow, hang or ok")
        if mode == "error" and not 400 <= int(status) <= 599:
            raise ValueError("status must be a 4xx or 5xx code")
        self.mode = mode
        self.status = int(status) if status is not None else None
        count = spec.get("count")
        self.count = int(count) if count is not None else None
        seconds = spec.get("seconds")
        self.seconds = float(seconds) if seconds is not None else None
        self.until: float | None = None  # set when this behaviour becomes the current one
        default_delay = 60.0 if mode == "hang" else 1.0
        self.delay = float(spec["delay"]) if spec.get("delay") is not None else default_delay
        self.reset_in = float(spec["reset_in"]) if spec.get("reset_in") is not None else 1.0
        self.limit = int(spec["limit"]) if spec.get("limit") is not None else 600
        if self.count is not None and self.count < 0:
            raise ValueError("count must be >= 0")

    def expired(self, now: float) -> bool:
        return (self.count is not None and self.count <= 0) or (self.until is not None and now >= self.until)

    def describe(self, now: float) -> dict:
        return {
            "mode": self.mode if self.mode != "error" else "5xx" if self.status >= 500 else "error",
            "status": self.status,
            "remaining_count": self.count,
            "remaining_seconds": (self.seconds if self.until is None
                                  else max(0.0, round(self.until - now, 3))),
            "delay": self.delay,
            "reset_in": self.reset_in,
        }


class Faults:
    """The queue of behaviours and the refused addresses (lower-cased email -> status)."""

    def __init__(self) -> None:
        self.behaviours: deque[Behaviour] = deque()
        self.fail_addresses: dict[str, int] = {}

    def set_behaviours(self, specs: list[dict], append: bool, now: float) -> list[dict]:
        """Replace (or extend) the queue; a bare {"mode": "ok"} means normal answers."""
        parsed = [Behaviour(s) for s in specs]
        if not append:
            self.behaviours.clear()
        for b in parsed:
            if b.mode != "ok" or b.count is not None or b.seconds is not None:
                self.behaviours.append(b)
        return self.describe(now)

    def _current(self, now: float) -> Behaviour | None:
        q = self.behaviours
        while q:
            b = q[0]
            if b.until is None and b.seconds is not None:
                b.until = now + b.seconds
            if not b.expired(now):
                return b
            q.popleft()
        return None

    def describe(self, now: float) -> list[dict]:
        self._current(now)
        return [b.describe(now) for b in self.behaviours]

    def apply(self, rec: dict, authed: bool, now: float) -> Behaviour | None:
        """Set ``rec``'s final status and errors; returns the behaviour that applied, if any.

        ``rec["status"]`` holds the validation verdict on entry. Only an authorized call takes
        a behaviour from the queue; only an otherwise accepted one is checked for refused
        addresses.
        """
        behaviour = self._current(now) if authed else None
        if behaviour is not None and behaviour.count is not None:
            behaviour.count -= 1
        if behaviour is not None and behaviour.mode == "ok":
            behaviour = None
        if behaviour is not None:
            rec["behaviour"] = behaviour.mode
            if behaviour.mode == "429":
                rec["status"] = 429
                rec["errors"] = [err("too many requests")]
            elif behaviour.mode == "error":
                rec["status"] = behaviour.status
                rec["errors"] = [err(status_message(behaviour.status))]
            elif behaviour.mode == "hang":
                rec["status"] = None
                rec["errors"] = None
        if rec["status"] == 202 and self.fail_addresses:
            refused = self._refused(rec)
            if refused:
                rec["status"], rec["errors"] = refused
        return behaviour

    def _refused(self, rec: dict) -> tuple[int, list[dict]] | None:
        for i, p in enumerate(rec["personalizations"]):
            for kind in ("to", "cc", "bcc"):
                for j, email in enumerate(p[kind]):
                    status = self.fail_addresses.get(email.lower())
                    if status is not None:
                        field = f"personalizations.{i}.{kind}.{j}.email"
                        if status == 400:
                            return 400, [err(MSG_INVALID_ADDRESS, field, f"message.personalizations.{kind}")]
                        return status, [err(status_message(status), field)]
        return None
