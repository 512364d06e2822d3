"""SendGrid's v3 wire format: the checks ``/v3/mail/send`` makes of a body, and its error shapes.

``validate_mail_send`` answers what SendGrid would: [] when a body would be accepted, else the
``{"message", "field", "help"}`` errors SendGrid returns, in its order and wording.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_BODY_BYTES = 20 * 1024 * 1024  # 20,971,520: SendGrid's limit for the whole request
MAX_PERSONALIZATIONS = 1000
MAX_RECIPIENTS = 1000
MAX_CUSTOM_ARGS_BYTES = 10_000
MAX_CATEGORIES = 10

_HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"
_EMAIL_RE = re.compile(r"^[^\s@<>,;\"]+@[^\s@<>,;\".]+(?:\.[^\s@<>,;\".]+)+$")
_RESERVED_HEADERS = frozenset(
    h.lower()
    for h in (
        "x-sg-id", "x-sg-eid", "received", "dkim-signature", "Content-Type",
        "Content-Transfer-Encoding", "To", "From", "Subject", "Reply-To", "CC", "BCC",
    )
)
ERR_AUTH_MISSING = "authorization required"
ERR_AUTH_BAD = "The provided authorization grant is invalid, expired, or revoked"
MSG_INVALID_ADDRESS = "Does not contain a valid address."
_MSG_FROM = (
    "The from object must be provided for every email send. It is an object that requires "
    'the email parameter, but may also contain a name parameter.  e.g. {"email" : '
    '"example@example.com"}  or {"email" : "example@example.com", "name" : '
    '"Example Recipient"}.'
)
_MSG_SUBJECT = (
    "The subject is required. You can get around this requirement if you use a template "
    "with a subject defined or if every personalization has a subject defined."
)
_MSG_SUBJECT_TYPE = "The subject of your email must be a string at least one character in length."
_MSG_CONTENT = (
    "Unless a valid template_id is provided, the content parameter is required. There must "
    "be at least one defined content block. We typically suggest both text/plain and "
    "text/html blocks are included, but only one block is required."
)
_MSG_CONTENT_ORDER = (
    "Following RFC 1341, section 7.2, if either text/html or text/plain are to be sent in "
    "your email: text/plain needs to be first, followed by text/html, followed by any "
    "other content."
)
_MSG_TO = (
    "The to array is required for all personalization objects, and must have at least one "
    "email object with a valid email address."
)
_MSG_SEND_AT = (
    "The send_at parameter is expecting a Unix timestamp as an integer. We will send "
    "immediately if you include a send_at timestamp that is in the past."
)

REASONS = {
    400: "BAD REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT FOUND",
    405: "METHOD NOT ALLOWED", 413: "PAYLOAD TOO LARGE", 415: "UNSUPPORTED MEDIA TYPE",
    429: "TOO MANY REQUESTS", 500: "INTERNAL SERVER ERROR", 502: "BAD GATEWAY",
    503: "SERVICE UNAVAILABLE", 504: "GATEWAY TIMEOUT",
}


def err(message: str, field: str | None = None, help_anchor: str | None = None) -> dict:
    """One error in SendGrid's shape."""
    return {"message": message, "field": field, "help": f"{_HELP}#{help_anchor}" if help_anchor else None}


def error_body(errors: list[dict]) -> bytes:
    return json.dumps({"errors": errors}).encode("utf-8")


def status_message(status: int) -> str:
    """SendGrid's message for an error status the sink was told to answer."""
    return {
        400: "Bad Request", 401: ERR_AUTH_BAD, 403: "access forbidden", 404: "not found",
        413: "The JSON payload you have included in your request is too large.",
        429: "too many requests", 500: "internal error", 502: "bad gateway",
        503: "service unavailable", 504: "gateway timeout",
    }.get(status, "error")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _type_err(expected: str, value: Any, field: str, anchor: str | None = None) -> dict:
    return err(f"Invalid type. Expected: {expected}, given: {_type_name(value)}.", field, anchor)


def _valid_email(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 320 and _EMAIL_RE.match(value) is not None


def _check_custom_args(value: Any, field: str, anchor: str, errors: list) -> bool:
    if not isinstance(value, dict):
        errors.append(_type_err("object", value, field, anchor))
        return False
    if not value:
        errors.append(err("custom_args cannot be empty.", field, anchor))
        return False
    for name, arg in value.items():
        if not isinstance(arg, str):
            errors.append(err("All values of custom arguments object must be strings", f"{field}.{name}", anchor))
            return False
    return True


def _check_headers(value: Any, field: str, anchor: str, errors: list) -> None:
    if not isinstance(value, dict):
        errors.append(_type_err("object", value, field, anchor))
        return
    for name, header in value.items():
        if not isinstance(header, str):
            errors.append(err("The header values must be strings.", f"{field}.{name}", anchor))
            return
        if name.lower() in _RESERVED_HEADERS:
            errors.append(err("Header can not be one of the reserved keys.", f"{field}.{name}", anchor))
            return
        if not name or not name.isascii() or " " in name:
            errors.append(err("Header keys cannot contain non-ASCII characters and empty spaces.", field, anchor))
            return


def _check_send_at(value: Any, field: str, anchor: str, errors: list) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        errors.append(err(_MSG_SEND_AT, field, anchor))


def validate_mail_send(body: Any) -> list[dict]:
    """SendGrid's checks of a v3 mail-send body; [] when it would be accepted."""
    if not isinstance(body, dict):
        return [err(f"Invalid type. Expected: object, given: {_type_name(body)}.")]
    errors: list[dict] = []
    template_id = body.get("template_id")
    has_template = isinstance(template_id, str) and template_id != ""
    all_subjects = _check_personalizations(body, errors)
    _check_from(body.get("from"), errors)
    _check_reply_to(body, errors)
    _check_subject(body, has_template, all_subjects, errors)
    _check_content(body.get("content"), has_template, errors)
    _check_message_extras(body, errors)
    return errors


def _check_personalizations(body: dict, errors: list) -> bool:
    """Check every personalization; True when each one has its own subject."""
    pers = body.get("personalizations")
    if not isinstance(pers, list) or not pers:
        errors.append(err(
            "The personalizations field is required and must have at least one personalization.",
            "personalizations", "-Personalizations-Errors",
        ))
        return False
    if len(pers) > MAX_PERSONALIZATIONS:
        errors.append(err(
            f"The personalization block is limited to {MAX_PERSONALIZATIONS} personalizations per "
            f"API request. You have provided {len(pers)} personalizations. Please consider "
            "splitting this into multiple requests and resending your request.",
            "personalizations", "message.personalizations",
        ))
        return False
    top_args = body.get("custom_args") if isinstance(body.get("custom_args"), dict) else {}
    all_subjects = True
    total = 0
    for i, p in enumerate(pers):
        if not isinstance(p, dict):
            errors.append(_type_err("object", p, f"personalizations.{i}"))
            all_subjects = False
            continue
        total += _check_recipients(p, f"personalizations.{i}", errors)
        if not _check_personalization(p, f"personalizations.{i}", top_args, errors):
            all_subjects = False
    if total > MAX_RECIPIENTS:
        errors.append(err(
            "There is a limit of 1000 total recipients (to + cc + bcc) per request.",
            "personalizations", "message.personalizations",
        ))
    return all_subjects


def _check_recipients(p: dict, pfield: str, errors: list) -> int:
    """Check a personalization's to, cc and bcc; returns how many recipients it counts."""
    seen: set[str] = set()
    total = 0
    for kind in ("to", "cc", "bcc"):
        lst = p.get(kind)
        anchor = f"message.personalizations.{kind}"
        if kind == "to" and (not isinstance(lst, list) or not lst):
            errors.append(err(_MSG_TO, f"{pfield}.to", anchor))
            continue
        if lst is None:
            continue
        if not isinstance(lst, list):
            errors.append(_type_err("array", lst, f"{pfield}.{kind}", anchor))
            continue
        for j, rcpt in enumerate(lst):
            rfield = f"{pfield}.{kind}.{j}"
            if not isinstance(rcpt, dict):
                errors.append(_type_err("object", rcpt, rfield, anchor))
                continue
            email = rcpt.get("email")
            if email is None or email == "":
                errors.append(err(f"The {kind} email parameter is required.", f"{rfield}.email", anchor))
            elif not _valid_email(email):
                errors.append(err(MSG_INVALID_ADDRESS, f"{rfield}.email", anchor))
            else:
                low = email.lower()
                if low in seen:
                    errors.append(err(
                        "Each email address in the personalization block should be unique between "
                        f"to, cc, and bcc. We found the first duplicate instance of [{email}] in the "
                        f"{pfield}.{kind} field.",
                        pfield, "message.personalizations",
                    ))
                seen.add(low)
            total += 1
    return total


def _check_personalization(p: dict, pfield: str, top_args: dict, errors: list) -> bool:
    """Check a personalization's subject, custom_args, headers and send_at; True if it has a subject."""
    subject = p.get("subject")
    if subject is not None and (not isinstance(subject, str) or subject == ""):
        errors.append(err(_MSG_SUBJECT_TYPE, f"{pfield}.subject", "message.personalizations.subject"))
    if "custom_args" in p:
        anchor = "message.personalizations.custom_args"
        if _check_custom_args(p["custom_args"], f"{pfield}.custom_args", anchor, errors):
            merged = {**top_args, **p["custom_args"]}
            if len(json.dumps(merged, separators=(",", ":")).encode("utf-8")) > MAX_CUSTOM_ARGS_BYTES:
                errors.append(err(
                    "The combined size of both global and personalization custom arguments may "
                    "not exceed 10,000 bytes per personalization.",
                    f"{pfield}.custom_args", anchor,
                ))
    if "headers" in p:
        _check_headers(p["headers"], f"{pfield}.headers", "message.personalizations.headers", errors)
    _check_send_at(p.get("send_at"), f"{pfield}.send_at", "message.personalizations.send_at", errors)
    return isinstance(subject, str) and bool(subject)


def _check_from(sender: Any, errors: list) -> None:
    if not isinstance(sender, dict) or sender.get("email") in (None, ""):
        errors.append(err(_MSG_FROM, "from.email", "message.from"))
    elif not _valid_email(sender.get("email")):
        errors.append(err("The from email does not contain a valid address.", "from.email", "message.from"))


def _check_reply_to(body: dict, errors: list) -> None:
    reply_to = body.get("reply_to")
    if reply_to is not None and (not isinstance(reply_to, dict) or not _valid_email(reply_to.get("email"))):
        errors.append(err("The reply_to email does not contain a valid address.", "reply_to.email",
                          "message.reply_to"))
    reply_list = body.get("reply_to_list")
    if reply_list is None:
        return
    if not isinstance(reply_list, list):
        errors.append(_type_err("array", reply_list, "reply_to_list"))
        return
    for j, item in enumerate(reply_list):
        if not isinstance(item, dict) or not _valid_email(item.get("email")):
            errors.append(err(MSG_INVALID_ADDRESS, f"reply_to_list.{j}.email", "message.reply_to"))


def _check_subject(body: dict, has_template: bool, all_subjects: bool, errors: list) -> None:
    subject = body.get("subject")
    pers = body.get("personalizations")
    if subject is not None and not isinstance(subject, str):
        errors.append(err(_MSG_SUBJECT_TYPE, "subject", "message.subject"))
    elif not has_template and not subject and not all_subjects and isinstance(pers, list) and pers:
        errors.append(err(_MSG_SUBJECT, "subject", "message.subject"))


def _check_content(content: Any, has_template: bool, errors: list) -> None:
    if content is None or content == []:
        if not has_template:
            errors.append(err(_MSG_CONTENT, "content", "message.content"))
        return
    if not isinstance(content, list):
        errors.append(_type_err("array", content, "content", "message.content"))
        return
    types: list[str] = []
    for k, part in enumerate(content):
        if not isinstance(part, dict):
            errors.append(_type_err("object", part, f"content.{k}"))
            continue
        ctype = part.get("type")
        if not isinstance(ctype, str) or not ctype:
            errors.append(err(
                "Your content type must be a string with length of at least one character.",
                f"content.{k}.type", "message.content.type",
            ))
        else:
            types.append(ctype.lower())
        value = part.get("value")
        if not isinstance(value, str) or value == "":
            errors.append(err(
                "The content value must be a string at least one character in length.",
                f"content.{k}.value", "message.content.value",
            ))
    expected_first = [t for t in ("text/plain", "text/html") if t in types]
    if types[: len(expected_first)] != expected_first:
        errors.append(err(_MSG_CONTENT_ORDER, "content", "message.content.value"))


def _check_message_extras(body: dict, errors: list) -> None:
    """The message-level custom_args, headers, categories and send_at."""
    if "custom_args" in body:
        _check_custom_args(body["custom_args"], "custom_args", "message.custom_args", errors)
    if "headers" in body:
        _check_headers(body["headers"], "headers", "message.headers", errors)
    categories = body.get("categories")
    if categories is not None:
        if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
            errors.append(err("Categories must be an array of strings.", "categories", "message.categories"))
        elif len(categories) > MAX_CATEGORIES:
            errors.append(err(
                f"There is a limit of 10 categories for each email that is sent. You provided "
                f"{len(categories)} categories.", "categories", "message.categories",
            ))
    _check_send_at(body.get("send_at"), "send_at", "message.send_at", errors)
