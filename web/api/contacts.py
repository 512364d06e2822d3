"""API routes: contacts."""

from . import bp  # noqa: F401
