"""API routes: openapi."""

from . import bp  # noqa: F401
