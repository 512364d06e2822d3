"""What a valid contact is: the address, names, time zone and custom fields, with their size
limits. The API, the UI and the CSV import all check contacts here, so they accept and refuse
the same things with the same reasons (limits: README, "Contacts")."""

from __future__ import annotations

import math
import zoneinfo
from functools import lru_cache

from email_validator import EmailNotValidError, validate_email

from .errors import InvalidInput

NAME_MAX = 200  # first name, last name (and a list's name)
EMAIL_MAX = 320
TIMEZONE_MAX = 64
MAX_FIELDS = 100  # custom fields per contact
FIELD_KEY_MAX = 100  # characters in a custom field's name
FIELD_VALUE_MAX = 8_192  # characters in a custom field's text value
FIELDS_TOTAL_MAX = 65_536  # characters in all of a contact's field names and text values together


def text_problem(value: str) -> str | None:
    """What makes a string unstorable (PostgreSQL refuses NUL; lone surrogates are not UTF-8)."""
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text"
    return None


def email_problem(raw) -> str | None:
    """Why ``raw`` is not an acceptable address, or None when it is."""
    if not isinstance(raw, str):
        return "not a string"
    value = raw.strip()
    if not value:
        return "the address is empty"
    if len(value) > EMAIL_MAX:
        return "the address is too long"
    try:
        validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        return str(exc)
    return None


def normalize_email(raw) -> str:
    """The normalised address (stripped, lower-cased), or InvalidInput saying what is wrong."""
    problem = email_problem(raw)
    if problem:
        raise InvalidInput(f"{raw!r} is not a valid email address: {problem}", {"email": [problem]})
    return raw.strip().lower()


@lru_cache(maxsize=1)
def _iana_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


@lru_cache(maxsize=4096)
def is_timezone(name: str) -> bool:
    """True for an IANA zone name (``Europe/Paris``, ``UTC``)."""
    zones = _iana_zones()
    if zones:
        return name in zones
    try:  # no zone list on this system: ask zoneinfo directly
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def timezone_problem(name) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str):
        return "not a string"
    if len(name) > TIMEZONE_MAX or not is_timezone(name):
        return f"{name!r} is not an IANA time zone (e.g. Europe/Paris, America/New_York, UTC)"
    return None


def check_timezone(name) -> str | None:
    """The zone name (None or '' clears it), or InvalidInput when it is not an IANA zone."""
    if name is None or (isinstance(name, str) and not name.strip()):
        return None
    name = name.strip() if isinstance(name, str) else name
    problem = timezone_problem(name)
    if problem:
        raise InvalidInput(problem, {"timezone": [problem]})
    return name


def fields_problems(fields) -> dict[str, list[str]]:
    """Per-key problems of a custom-field dict: at most MAX_FIELDS keys, names of 1..FIELD_KEY_MAX
    characters, values str/number/bool/null, a text value at most FIELD_VALUE_MAX characters,
    FIELDS_TOTAL_MAX characters in all."""
    if not isinstance(fields, dict):
        return {"_schema": ["fields must be an object"]}
    if len(fields) > MAX_FIELDS:
        return {"_schema": [f"a contact has at most {MAX_FIELDS} custom fields (this has {len(fields):,})"]}
    problems: dict[str, list[str]] = {}
    for key, value in fields.items():
        if not isinstance(key, str) or not key.strip() or text_problem(key):
            problems[repr(key)[:40]] = ["a field name must be a non-empty string of text"]
        elif len(key) > FIELD_KEY_MAX:
            problems[key[:40] + "..."] = [f"a field name has at most {FIELD_KEY_MAX} characters"]
        elif value is not None and not isinstance(value, str | int | float | bool):
            problems[key] = ["a field value must be a string, a number, true/false or null"]
        elif isinstance(value, float) and not math.isfinite(value):
            problems[key] = ["a field value must be a finite number"]
        elif isinstance(value, str) and text_problem(value):
            problems[key] = ["a field value " + text_problem(value)]
        elif isinstance(value, str) and len(value) > FIELD_VALUE_MAX:
            problems[key] = [f"a field value has at most {FIELD_VALUE_MAX:,} characters (this one has {len(value):,})"]
    total = fields_size(fields)
    if not problems and total > FIELDS_TOTAL_MAX:
        problems["_schema"] = [f"a contact's custom fields hold at most {FIELDS_TOTAL_MAX:,} characters in all, "
                               f"names and values (these hold {total:,})"]
    return problems


def fields_size(fields: dict) -> int:
    """Characters in the field names and text values (a number or true/false counts as 8)."""
    return sum(len(str(k)) + (len(v) if isinstance(v, str) else 8) for k, v in fields.items())


def check_fields(fields) -> dict:
    if fields is None:
        return {}
    problems = fields_problems(fields)
    if problems:
        raise InvalidInput("fields is not valid", {"fields": problems})
    return dict(fields)


def name_problem(value) -> str | None:
    """Why a first/last name cannot be stored, or None (None clears it)."""
    if value is None:
        return None
    if not isinstance(value, str):
        return "not a string"
    return text_problem(value) or (f"at most {NAME_MAX} characters" if len(value.strip()) > NAME_MAX else None)


def check_name(value, what: str = "name") -> str | None:
    """A first/last name, stripped: None or '' clears it; InvalidInput saying what is wrong."""
    problem = name_problem(value)
    if problem:
        raise InvalidInput(f"{what}: {problem}", {what: [problem]})
    return None if value is None else value.strip() or None


def sort_addresses(raw: list) -> tuple[list[str], list[dict]]:
    """Typed addresses -> ``(the valid ones normalised, in order, [{"email", "reason"}] for the rest)``."""
    valid: list[str] = []
    invalid: list[dict] = []
    for email in raw:
        problem = email_problem(email)
        if problem:
            invalid.append({"email": email, "reason": problem})
        else:
            valid.append(email.strip().lower())
    return valid, invalid


def _optional_timezone_problem(value) -> str | None:
    """A blank time zone clears it; anything else must be an IANA name."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return timezone_problem(value.strip() if isinstance(value, str) else value)


def _fields_problem(value) -> str | None:
    """The custom fields' problems in one sentence, or None."""
    if value is None:
        return None
    return "; ".join(f"{k}: {', '.join(p)}" for k, p in fields_problems(value).items()) or None


_CHECKS = {
    "email": email_problem,
    "first_name": name_problem,
    "last_name": name_problem,
    "timezone": _optional_timezone_problem,
    "fields": _fields_problem,
}


def contact_problems(data: dict, partial: bool = False) -> dict[str, list[str]]:
    """Every problem of a contact's attributes at once, by attribute (``{"email": [...]}``);
    ``partial``: a change, where the address may be left out. Empty when it is valid."""
    problems: dict[str, list[str]] = {}
    if not partial and "email" not in data:
        problems["email"] = ["Missing data for required field."]
    for key, value in data.items():
        problem = _CHECKS[key](value) if key in _CHECKS else "Unknown field."
        if problem:
            problems[key] = [problem]
    return problems
