"""API routes: engine."""

from . import bp  # noqa: F401
