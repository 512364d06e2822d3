"""The web UI: server-rendered Jinja pages on one blueprint, ``ui``.

``blueprint`` holds ``bp`` and what the pages share; each route module adds its pages to it:
``account`` (sign in, settings, API keys), ``campaigns`` (list, new, operate, the campaign page),
``builder`` (the campaign builder), ``contacts`` (contacts), ``lists`` (lists, CSV import,
suppressions), ``ops`` (message log, dead letters, queue health, the outbox).

Views call ``campaigns.*`` like the API does. Every form carries the CSRF token; destructive
actions go through a confirmation page (GET shows what will happen, POST does it); live parts
are small progressive enhancements in ``static/herald.js``.
"""

from . import account, builder, campaigns, contacts, lists, ops  # noqa: F401  (registers the pages)
from .blueprint import bp

__all__ = ["bp"]
