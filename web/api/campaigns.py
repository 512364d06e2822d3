"""API routes: campaigns."""

from . import bp  # noqa: F401
