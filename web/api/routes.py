"""Imports every route module of the API so their routes land on ``bp``."""

from . import campaigns, contacts, engine, openapi  # noqa: F401
