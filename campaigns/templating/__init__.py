"""Step templates: a small language (a part of Jinja) checked on save, rendered per contact.

A step has three templates: ``subject`` and ``text`` (plain text, never HTML-escaped) and
``html`` (autoescaped). They see ``contact``, ``campaign`` and ``unsubscribe_url`` (``views``),
may use only what ``language`` allows (anything else is refused on save with its line), and
render in ``sandbox``, where each step of a render is sized and counted and the thread's CPU
clock read often enough that no render outruns its limit by more than a few milliseconds.
The language and its limits for users: docs/templates.md. Nothing here imports Flask.
"""

from ..text import html_to_text
from .render import (
    TEMPLATE_FIELDS,
    RenderedEmail,
    RenderError,
    check_template,
    clear_template_cache,
    errors_message,
    preview,
    render_step,
    template_cache_info,
    template_errors,
    validate_step_templates,
)
from .sandbox import MAX_OUTPUT_CHARS, MAX_RENDER_SECONDS, MAX_STEPS, MAX_VALUE_SIZE, TemplateLimitError
from .views import (
    ALLOWED_NAMES,
    CAMPAIGN_ATTRS,
    CONTACT_ATTRS,
    SAMPLE_CAMPAIGN,
    SAMPLE_CONTACT,
    VARIABLES,
    FieldUndefined,
    UnknownAttribute,
    field_key,
    template_context,
)

__all__ = [
    "ALLOWED_NAMES", "CAMPAIGN_ATTRS", "CONTACT_ATTRS", "MAX_OUTPUT_CHARS", "MAX_RENDER_SECONDS", "MAX_STEPS",
    "MAX_VALUE_SIZE", "SAMPLE_CAMPAIGN", "SAMPLE_CONTACT", "TEMPLATE_FIELDS", "VARIABLES", "FieldUndefined",
    "RenderError", "RenderedEmail", "TemplateLimitError", "UnknownAttribute", "check_template",
    "clear_template_cache", "errors_message", "field_key", "html_to_text", "preview", "render_step",
    "template_cache_info", "template_context", "template_errors", "validate_step_templates",
]
