"""The ``Limiter`` contract every rate-limit store implements (Redis, SQL)."""

from __future__ import annotations

from collections.abc import Callable

from .rules import Capacity, Grant, Rule


class Limiter:
    """Contract: ``take`` grants up to n units against every rule atomically.

    ``clock`` (tests only) replaces the store's clock (Redis ``TIME``, or ``time.time``).
    ``local`` is this process's memo for callers (e.g. limits known to be shut for a while),
    forgotten with the limiter (``reset_limiter``).
    """

    clock: Callable[[], float] | None = None
    local: dict

    def take(self, rules: list[Rule], n: int = 1, watch: str | None = None) -> Grant:
        """Up to ``n`` units of every rule at once (fewer when a rule has less room now).

        ``watch``: a raw Redis key of an integer counter (the stop generation) to read in the same
        atomic step, returned as ``Grant.watched``; stores that cannot do that ignore it (None)."""
        raise NotImplementedError

    def peek(self, rules: list[Rule], horizon: float = 0.0) -> list[Capacity]:
        """How many units each rule allows by now + horizon, without taking any."""
        raise NotImplementedError

    def give_back(self, rules: list[Rule], n: int) -> None:
        """Return units that were granted but not used (the call never left)."""
        raise NotImplementedError

    def hold(self, key: str, until: float) -> None:
        """Nothing passes ``key`` until ``until`` (epoch seconds), for every consumer. The later of
        two holds wins."""
        raise NotImplementedError

    def release(self, key: str) -> None:
        """End a hold at once."""
        raise NotImplementedError

    def mark(self, key: str, value: float) -> float:
        """Store ``value`` under ``key`` unless a value is there already; return the stored one."""
        raise NotImplementedError

    def read_mark(self, key: str) -> float | None:
        raise NotImplementedError

    def incr(self, name: str, by: int = 1) -> None:
        """Bump a shared counter (for /metrics)."""
        raise NotImplementedError

    def counters(self, prefix: str = "") -> dict[str, int]:
        raise NotImplementedError
