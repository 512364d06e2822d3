"""The JSON API (``/api/v1``): Bearer key or the UI session; every query scoped to a workspace.

Handlers are thin: parse and validate the body (marshmallow), call ``campaigns``, return JSON.
Each route module adds its routes to ``bp`` (``blueprint.py``); importing them here registers
them. Paging and query parameters are shared with the UI (``web.params``).
"""

from . import campaigns, contacts, engine, openapi  # noqa: F401  (registers the routes)
from .blueprint import bp

__all__ = ["bp"]
