"""Checking step templates on save, compiling them once and rendering them per contact.

A template is refused on save (``InvalidInput``, 422, each problem with its line) when it does not
parse, uses what the language leaves out (``language.problems``), or fails for the sample contact
in a way that is the template's fault (an unknown attribute reached through an alias, a limit).
A render that fails for one contact's data raises ``RenderError`` (a permanent failure for that
message). Compiled templates are cached by source: compiled once per process, rendered for every
contact.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

from jinja2 import TemplateSyntaxError
from jinja2.sandbox import SecurityError

from .. import text
from ..errors import InvalidInput
from . import language, sandbox
from .sandbox import BUDGET, Budget, TemplateLimitError
from .views import SAMPLE_CAMPAIGN, SAMPLE_CONTACT, UnknownAttribute, get, template_context

TEMPLATE_FIELDS = ("subject", "html", "text")


class RenderError(InvalidInput):
    """A template that could not be rendered for this contact (a permanent failure for it)."""

    code = "render_failed"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}", details={field: [message]})
        self.field = field


class RenderedEmail(NamedTuple):
    subject: str
    html: str
    text: str


_ENVS = {"html": sandbox.make_env(True, language.FILTERS, language.TESTS),
         "plain": sandbox.make_env(False, language.FILTERS, language.TESTS)}


def _kind(field: str) -> str:
    return "html" if field == "html" else "plain"


@functools.lru_cache(maxsize=512)  # bounded: a template may be up to 1 MB
def _compiled(kind: str, source: str):
    """The compiled template for this source (compile once, render many), or the first of its
    problems as a ``TemplateSyntaxError``."""
    env = _ENVS[kind]
    too_complex = language.too_complex(env, source)
    if too_complex:
        raise TemplateSyntaxError(too_complex, 1)
    ast = env.parse(source)
    found = language.problems(ast)
    if found:
        line, message = found[0]
        raise TemplateSyntaxError(message, line)
    return env.from_string(language.prepare(ast))


def template_cache_info():
    """Hits and misses of the compiled-template cache (``functools`` ``CacheInfo``)."""
    return _compiled.cache_info()


def clear_template_cache() -> None:
    _compiled.cache_clear()


def _template_line(exc: BaseException) -> int | None:
    """The template's line an exception was raised at (its innermost template frame)."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _render(template, context: dict, label: str) -> str:
    """Render within a fresh budget, the output at most MAX_OUTPUT_CHARS."""
    token = BUDGET.set(Budget())
    try:
        chunks = template.generate(context)
        parts, size = [], 0
        for chunk in chunks:
            size += len(chunk)
            if size > sandbox.MAX_OUTPUT_CHARS:
                error = TemplateLimitError(f"the rendered {label} is too large (more than "
                                           f"{sandbox.MAX_OUTPUT_CHARS:,} characters)")
                chunks.throw(error)  # raised where the template is, so that it carries its line
                raise error
            parts.append(chunk)
        return "".join(parts)
    finally:
        BUDGET.reset(token)


def check_template(source: str | None, kind: str = "plain") -> list[str]:
    """Problems with one template, each as ``"line N: message"``; empty when it is fine."""
    if not source:
        return []
    env = _ENVS[kind]
    try:
        too_complex = language.too_complex(env, source)
        if too_complex:
            return [f"line 1: {too_complex}"]
        found = language.problems(env.parse(source))
        if found:
            return [f"line {line}: {message}" for line, message in found]
        template = _compiled(kind, source)  # warms the cache for the renders to come
    except TemplateSyntaxError as exc:
        return [f"line {exc.lineno}: {exc.message}"]
    except RecursionError:
        return ["line 1: the template is nested too deeply"]
    except Exception as exc:  # e.g. Python refusing the generated code: refuse the template
        return [f"line 1: the template cannot be compiled ({type(exc).__name__})"]
    try:  # the sample contact: what fails here whoever the contact is, is the template's fault
        _render(template, template_context(SAMPLE_CONTACT, SAMPLE_CAMPAIGN, "https://example.invalid/u/check"),
                "template")
    except (UnknownAttribute, SecurityError) as exc:  # a limit, an unknown attribute through an alias
        return [f"line {_template_line(exc) or 1}: {exc}"]
    except Exception:  # data-dependent failures are reported per message at send time
        pass
    return []


def _field_name(prefix: str, field: str) -> str:
    return f"{prefix}.{field}" if prefix else field


def template_errors(subject: str | None, html: str | None, text_: str | None, field_prefix: str = "") -> dict:
    """``{field: ["line N: message", ...]}`` for each template that would be refused."""
    errors = {}
    for field, source in zip(TEMPLATE_FIELDS, (subject, html, text_), strict=True):
        problems = check_template(source, _kind(field))
        if problems:
            errors[_field_name(field_prefix, field)] = problems
    return errors


def errors_message(errors: dict) -> str:
    field, problems = next(iter(errors.items()))
    more = sum(len(p) for p in errors.values()) - 1
    tail = f" (and {more} more)" if more else ""
    return f"{field}: {problems[0]}{tail}"


def validate_step_templates(subject: str | None, html: str | None, text_: str | None, field_prefix: str = "") -> None:
    """Raise ``InvalidInput`` (422) naming the field and line of every problem, e.g.
    ``details={"steps[1].html": ["line 3: unknown variable 'contact.phone' ..."]}``."""
    errors = template_errors(subject, html, text_, field_prefix)
    if errors:
        raise InvalidInput(f"template error in {errors_message(errors)}", details=errors, code="invalid_template")


def _render_one(field: str, source: str, context: dict, field_prefix: str) -> str:
    name = _field_name(field_prefix, field)
    try:
        template = _compiled(_kind(field), source)
    except TemplateSyntaxError as exc:
        raise RenderError(name, f"line {exc.lineno}: {exc.message}") from None
    except Exception as exc:  # too deep to parse, or Python refusing the generated code
        raise RenderError(name, f"the template cannot be compiled ({type(exc).__name__})") from None
    try:
        return _render(template, context, field)
    except SecurityError as exc:
        line = _template_line(exc)
        raise RenderError(name, f"{f'line {line}: ' if line else ''}refused by the sandbox: {exc}") from None
    except Exception as exc:  # any failure inside a user template is that template's error
        raise RenderError(name, f"{type(exc).__name__}: {exc}") from None


def render_step(step_like: Any, contact_like: Any, campaign_like: Any, unsubscribe_url: str,
                field_prefix: str = "") -> RenderedEmail:
    """Render an email step for one contact. ``step_like`` has ``subject``, ``html`` and an
    optional ``text`` (a Step row or a dict). Without a text template the text part is derived
    from the rendered HTML. Raises ``RenderError``."""
    context = template_context(contact_like, campaign_like, unsubscribe_url)
    subject_src = get(step_like, "subject") or ""
    html_src = get(step_like, "html") or ""
    text_src = get(step_like, "text")
    # A subject is one header line: newlines from a contact's fields must not break it.
    subject = " ".join(_render_one("subject", subject_src, context, field_prefix).split())
    html = _render_one("html", html_src, context, field_prefix)
    if text_src:
        plain = _render_one("text", text_src, context, field_prefix)
    else:
        try:
            plain = text.html_to_text(html, sandbox.MAX_RENDER_SECONDS)
        except Exception as exc:  # HTML the parser gives up on, or takes too long over
            raise RenderError(_field_name(field_prefix, "text"),
                              f"the text part cannot be derived from the HTML ({exc}); give the step a text "
                              "version") from None
    return RenderedEmail(subject, html, plain)


def preview(step_like: Any, contact_like: Any = None, campaign_like: Any = None,
            unsubscribe_url: str = "https://example.invalid/u/preview") -> dict:
    """For the UI's live preview: ``{"subject", "html", "text", "errors"}``. Never raises for
    a template problem: the rendered parts are ``None`` and ``errors`` maps each field to its
    problems (``"line N: message"``)."""
    subject, html, text_ = (get(step_like, f) for f in TEMPLATE_FIELDS)
    errors = template_errors(subject, html, text_)
    if not errors:
        try:
            rendered = render_step(step_like, contact_like or SAMPLE_CONTACT, campaign_like, unsubscribe_url)
        except RenderError as exc:
            errors = {exc.field: exc.details[exc.field]}
        else:
            return {"subject": rendered.subject, "html": rendered.html, "text": rendered.text, "errors": {}}
    return {"subject": None, "html": None, "text": None, "errors": errors}
