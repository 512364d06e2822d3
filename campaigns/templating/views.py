"""What a step template sees: ``contact``, ``campaign`` and ``unsubscribe_url``.

``VARIABLES`` is the allow-list of names and their attributes (the check on save reads it,
and the read-only views below enforce it at render for what the check cannot see, such as an
alias: ``{% set c = contact %}{{ c.phone }}``). Nothing here imports Jinja's sandbox.
"""

from __future__ import annotations

import re
from typing import Any

from jinja2 import ChainableUndefined, UndefinedError

ANY = "*"  # any attribute name below this one (custom fields)

# name -> its attributes (None: a value without attributes; ANY: any name, as deep as wanted).
VARIABLES: dict[str, dict[str, Any] | None] = {
    "contact": {"email": None, "first_name": None, "last_name": None, "timezone": None, "fields": ANY},
    "campaign": {"id": None, "name": None, "from_email": None, "from_name": None, "reply_to": None},
    "unsubscribe_url": None,
}
ALLOWED_NAMES = frozenset(VARIABLES)
CONTACT_ATTRS = tuple(VARIABLES["contact"])
CAMPAIGN_ATTRS = tuple(VARIABLES["campaign"])
ALLOWED_HINT = "templates can use contact, campaign and unsubscribe_url"

SAMPLE_CONTACT = {
    "email": "jane.doe@example.com",
    "first_name": "Jane",
    "last_name": "Doe",
    "timezone": "UTC",
    "fields": {},
}

SAMPLE_CAMPAIGN = {"id": 1, "name": "Sample campaign", "from_email": "team@example.com", "from_name": "Team",
                   "reply_to": None}


def unknown_attribute_message(owner: str, name: Any) -> str:
    attrs = VARIABLES[owner]
    if owner == "contact":
        return (f"unknown variable 'contact.{name}' (a contact has {', '.join(attrs)}; "
                f"custom fields are contact.fields.{name})")
    return f"unknown variable '{owner}.{name}' (a {owner} has {', '.join(attrs)})"


class UnknownAttribute(UndefinedError):
    """A contact or campaign attribute that does not exist, reached where the check on save cannot
    see it (through an alias: ``{% set c = contact %}{{ c.phone }}``)."""


class FieldUndefined(ChainableUndefined):
    """A custom field the contact lacks, or a contact's or campaign's attribute that is empty
    (no first name): renders empty, and so does anything under it; ``|default('there')``
    replaces it, and ``|int``/``|float`` give their default (0) as for any value that is no
    number."""

    __slots__ = ()

    def __int__(self):
        raise TypeError("no value")

    __float__ = __int__


_NOT_WORD = re.compile(r"[\W_]+")


def field_key(name) -> str:
    """How a custom field's name is matched when it is not found as written: case, spaces and
    punctuation aside (a CSV column "Company Name" is ``contact.fields.company_name``)."""
    return _NOT_WORD.sub("_", str(name)).strip("_").casefold()


class Fields:
    """``contact.fields``: lookups of the custom fields, missing ones empty. A name not found as
    written matches a field whose name differs only in case, spaces and punctuation
    (``field_key``): the first such field in name order."""

    __slots__ = ("_data", "_keys")

    def __init__(self, data: dict | None):
        self._data = data if isinstance(data, dict) else {}
        self._keys: dict[str, str] | None = None

    def _find(self, key):
        if key in self._data:
            return key
        if self._keys is None:
            self._keys = {}
            for name in sorted(self._data, key=str):
                self._keys.setdefault(field_key(name), name)
        return self._keys.get(field_key(key))

    def lookup(self, key):
        found = self._find(key)
        if found is not None:
            value = self._data[found]
            return Fields(value) if isinstance(value, dict) else value
        return FieldUndefined(name=str(key))

    def __contains__(self, key) -> bool:
        return self._find(key) is not None

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __bool__(self) -> bool:
        return bool(self._data)

    def __str__(self) -> str:
        return str(self._data)


class View:
    """A read-only object exposing exactly the attributes ``VARIABLES`` gives its ``owner``."""

    __slots__ = ("owner", "_values")

    def __init__(self, owner: str, values: dict):
        self.owner = owner
        self._values = values

    def lookup(self, name):
        if name in VARIABLES[self.owner]:
            value = self._values.get(name)
            # Missing (None, or an empty cell of an import): undefined, so that it prints as
            # nothing and ``|default(...)`` and ``|upper`` behave ("NONE" was printed).
            return FieldUndefined(name=name) if value is None or value == "" else value
        raise UnknownAttribute(unknown_attribute_message(self.owner, name))

    def __str__(self) -> str:
        return str(self._values.get("email" if self.owner == "contact" else "name") or "")


def get(obj: Any, name: str, default=None):
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def template_context(contact_like: Any, campaign_like: Any, unsubscribe_url: str) -> dict:
    """The context a template sees, built from a Contact/Campaign row or a plain dict."""
    contact = {name: get(contact_like, name) for name in CONTACT_ATTRS if name != "fields"}
    contact["fields"] = Fields(get(contact_like, "fields") or {})
    campaign = {name: get(campaign_like, name) for name in CAMPAIGN_ATTRS}
    return {
        "contact": View("contact", contact),
        "campaign": View("campaign", campaign),
        "unsubscribe_url": unsubscribe_url or "",
    }
