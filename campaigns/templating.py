"""Step templates: Jinja2 in a sandbox, checked when saved, compiled once and rendered many times.

A step has three templates: ``subject`` and ``text`` (plain text, never HTML-escaped) and
``html`` (autoescaped, so a contact's ``<script>`` first name arrives as text). They see three
names and nothing else:

- ``contact``: ``email``, ``first_name``, ``last_name``, ``timezone`` and ``fields`` (the
  custom fields; ``contact.fields.x`` or ``contact.fields["x y"]``; a field the contact lacks
  renders empty, as does any attribute under it);
- ``campaign``: ``id``, ``name``, ``from_email``, ``from_name``, ``reply_to``;
- ``unsubscribe_url``.

Two lines of defence against template injection:

1. When a template is saved (``validate_step_templates``) its AST is walked: a syntax error,
   a name outside the three above, an attribute of ``contact``/``campaign`` outside the lists
   above, any attribute or constant key starting with ``_`` (``''.__class__``,
   ``self._TemplateReference__context``...), an unknown filter or test, and
   ``extends``/``include``/``import`` are refused, each with its line.
2. Rendering happens in an ``ImmutableSandboxedEnvironment`` with no globals (no ``range``,
   ``lipsum``, ``cycler``, ``namespace``...) and a ``StrictUndefined``: whatever got past (1)
   is inert or raises ``SecurityError``/``UndefinedError``, which ``render_step`` turns into a
   ``RenderError`` (a permanent failure for that message, not a crash).

Compiled templates are cached by source (``_compiled``), so the engine compiles each
template once per process and renders it for every contact. Nothing here imports Flask.
"""

from __future__ import annotations

import functools
import re
from html.parser import HTMLParser
from typing import Any, NamedTuple

from jinja2 import ChainableUndefined, StrictUndefined, TemplateSyntaxError, UndefinedError, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from .errors import InvalidInput

ALLOWED_NAMES = frozenset({"contact", "campaign", "unsubscribe_url"})
CONTACT_ATTRS = ("email", "first_name", "last_name", "timezone", "fields")
CAMPAIGN_ATTRS = ("id", "name", "from_email", "from_name", "reply_to")
TEMPLATE_FIELDS = ("subject", "html", "text")

SAMPLE_CONTACT = {
    "email": "jane.doe@example.com",
    "first_name": "Jane",
    "last_name": "Doe",
    "timezone": "UTC",
    "fields": {},
}

SAMPLE_CAMPAIGN = {"id": 1, "name": "Sample campaign", "from_email": "team@example.com", "from_name": "Team",
                   "reply_to": None}

# Guards against the cheapest ways to make a template eat memory ('x' * 10**9, 9 ** 9 ** 9).
MAX_SEQUENCE_PRODUCT = 1_000_000
MAX_POWER_BITS = 100_000


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


# --------------------------------------------------------------------------- environments


def _finalize(value):
    # None (a contact without a first name) prints as nothing, not "None".
    return "" if value is None else value


class UnknownAttribute(UndefinedError):
    """A contact or campaign attribute that does not exist, reached where the check on save cannot
    see it (through an alias: ``{% set c = contact %}{{ c.phone }}``, ``contact|attr('phone')``)."""


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def getattr(self, obj, attribute):
        if isinstance(obj, _View) and attribute not in obj._attrs:
            raise UnknownAttribute(obj._unknown(attribute))
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        if isinstance(obj, _View) and argument not in obj._attrs:
            raise UnknownAttribute(obj._unknown(argument))
        return super().getitem(obj, argument)

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_SEQUENCE_PRODUCT:
                    raise SecurityError("the result of this multiplication would be too large")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and max(left.bit_length(), 1) * right > MAX_POWER_BITS:
                raise SecurityError("the result of this power would be too large")
        return super().call_binop(context, operator, left, right)


def _make_env(autoescape: bool) -> _Sandbox:
    env = _Sandbox(
        autoescape=autoescape,
        undefined=StrictUndefined,
        finalize=_finalize,
        keep_trailing_newline=True,
        auto_reload=False,
    )
    env.globals.clear()  # range, lipsum, cycler, joiner, namespace, dict: none of them is needed
    return env


_ENVS = {"html": _make_env(True), "plain": _make_env(False)}


def _kind(field: str) -> str:
    return "html" if field == "html" else "plain"


@functools.lru_cache(maxsize=512)  # bounded: a template may be up to 1 MB
def _compiled(kind: str, source: str):
    """The compiled template for this source (compile once, render many)."""
    return _ENVS[kind].from_string(source)


def template_cache_info():
    """Hits and misses of the compiled-template cache (``functools`` ``CacheInfo``)."""
    return _compiled.cache_info()


def clear_template_cache() -> None:
    _compiled.cache_clear()


# --------------------------------------------------------------------------- what templates see


class FieldUndefined(ChainableUndefined):
    """A custom field the contact lacks, or a contact's or campaign's attribute that is empty
    (no first name): renders empty, and so does anything under it; ``|default('there')``
    replaces it, and ``|int``/``|float`` give their default (0) as for any value that is no
    number."""

    __slots__ = ()

    def __int__(self):
        raise TypeError("no value")

    __float__ = __int__


class _Fields:
    """``contact.fields``: attribute or item access to the custom fields, missing ones empty."""

    __slots__ = ("_data",)

    def __init__(self, data: dict | None):
        self._data = data if isinstance(data, dict) else {}

    def _lookup(self, key):
        if key in self._data:
            value = self._data[key]
            return _Fields(value) if isinstance(value, dict) else value
        return FieldUndefined(name=str(key))

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._lookup(name)

    def __getitem__(self, key):
        return self._lookup(key)

    def __contains__(self, key) -> bool:
        return key in self._data

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __bool__(self) -> bool:
        return bool(self._data)

    def __str__(self) -> str:
        return str(self._data)


class _View:
    """A read-only object exposing exactly ``_attrs`` to templates."""

    @classmethod
    def _unknown(cls, name) -> str:
        return f"unknown variable {name!r}"

    __slots__ = ("_values",)
    _attrs: tuple[str, ...] = ()
    _str_attr = ""

    def __init__(self, values: dict):
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str):
        if name in self._attrs:
            value = self._values.get(name)
            # Missing (None, or an empty cell of an import): undefined, so that it prints as
            # nothing and ``|default(...)`` and ``|upper`` behave ("NONE" was printed).
            return FieldUndefined(name=name) if value is None or value == "" else value
        if name.startswith("_"):  # __html__ and the like: Python's protocols, not a template's names
            raise AttributeError(name)
        raise UnknownAttribute(self._unknown(name))  # also through |attr(), which calls getattr itself

    def __str__(self) -> str:
        return str(self._values.get(self._str_attr) or "")


class _ContactView(_View):
    __slots__ = ()
    _attrs = CONTACT_ATTRS
    _str_attr = "email"

    @classmethod
    def _unknown(cls, name) -> str:
        return (f"unknown variable 'contact.{name}' (a contact has {', '.join(CONTACT_ATTRS)}; "
                f"custom fields are contact.fields.{name})")


class _CampaignView(_View):
    __slots__ = ()
    _attrs = CAMPAIGN_ATTRS
    _str_attr = "name"

    @classmethod
    def _unknown(cls, name) -> str:
        return f"unknown variable 'campaign.{name}' (a campaign has {', '.join(CAMPAIGN_ATTRS)})"


def _get(obj: Any, name: str, default=None):
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def template_context(contact_like: Any, campaign_like: Any, unsubscribe_url: str) -> dict:
    """The context a template sees, built from a Contact/Campaign row or a plain dict."""
    contact = {name: _get(contact_like, name) for name in CONTACT_ATTRS if name != "fields"}
    contact["fields"] = _Fields(_get(contact_like, "fields") or {})
    campaign = {name: _get(campaign_like, name) for name in CAMPAIGN_ATTRS}
    return {
        "contact": _ContactView(contact),
        "campaign": _CampaignView(campaign),
        "unsubscribe_url": unsubscribe_url or "",
    }


# --------------------------------------------------------------------------- checking on save


def _underscore(value: Any) -> bool:
    """A constant used as an attribute name or path (``attr('__class__')``, ``map(attribute='a._b')``)."""
    return isinstance(value, str) and (value.startswith("_") or "._" in value)


UNDERSCORE_MESSAGE = "names starting with an underscore are not allowed"
ALLOWED_HINT = "templates can use contact, campaign and unsubscribe_url"


def _static_problems(env, ast: nodes.Template) -> list[tuple[int, str]]:
    problems: list[tuple[int, str]] = []

    def check_member(node, name, lineno):
        if _underscore(name):
            problems.append((lineno, f"'{name}': {UNDERSCORE_MESSAGE}"))
            return
        target = node.node
        if isinstance(target, nodes.Name) and target.ctx == "load" and isinstance(name, str):
            if target.name == "contact" and name not in CONTACT_ATTRS:
                problems.append(
                    (lineno, f"unknown variable 'contact.{name}' (a contact has {', '.join(CONTACT_ATTRS)}; "
                             f"custom fields are contact.fields.{name})")
                )
            elif target.name == "campaign" and name not in CAMPAIGN_ATTRS:
                problems.append(
                    (lineno, f"unknown variable 'campaign.{name}' (a campaign has {', '.join(CAMPAIGN_ATTRS)})")
                )

    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        if isinstance(node, nodes.Getattr):
            check_member(node, node.attr, node.lineno)
        elif isinstance(node.arg, nodes.Const):
            check_member(node, node.arg.value, node.lineno)

    for node in ast.find_all((nodes.Filter, nodes.Test)):
        registry, what = (env.filters, "filter") if isinstance(node, nodes.Filter) else (env.tests, "test")
        if node.name not in registry:
            problems.append((node.lineno, f"unknown {what} '{node.name}'"))
        args = list(node.args) + [kw.value for kw in node.kwargs]
        for arg in args:
            if isinstance(arg, nodes.Const) and _underscore(arg.value):
                problems.append((node.lineno, f"'{arg.value}': {UNDERSCORE_MESSAGE}"))

    for node in ast.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        problems.append((node.lineno, "extends, include and import are not available in step templates"))

    try:
        undeclared = set(meta.find_undeclared_variables(ast)) - ALLOWED_NAMES
    except TemplateSyntaxError as exc:  # the compiler's own assertions (unknown filter...)
        if not problems:
            problems.append((exc.lineno, exc.message or "invalid template"))
        undeclared = set()
    for node in ast.find_all(nodes.Name):
        if node.ctx == "load" and node.name in undeclared:
            undeclared.discard(node.name)
            problems.append((node.lineno, f"unknown variable '{node.name}' ({ALLOWED_HINT})"))

    return sorted(problems, key=lambda p: p[0])


def check_template(source: str | None, kind: str = "plain") -> list[str]:
    """Problems with one template, each as ``"line N: message"``; empty when it is fine."""
    if not source:
        return []
    env = _ENVS[kind]
    try:
        ast = env.parse(source)
        problems = [f"line {line}: {message}" for line, message in _static_problems(env, ast)]
        if problems:
            return problems
        template = _compiled(kind, source)  # warms the cache for the renders to come
        trial = _trial_render(template)
        if trial:
            return [trial]
    except TemplateSyntaxError as exc:  # includes TemplateAssertionError, raised when compiling
        return [f"line {exc.lineno}: {exc.message}"]
    except RecursionError:
        return ["line 1: the template is nested too deeply"]
    except Exception as exc:  # noqa: BLE001 - e.g. Python refusing the generated code: refuse the template
        return [f"line 1: the template cannot be compiled ({type(exc).__name__})"]
    return []


def _trial_render(template) -> str | None:
    """Render once for the sample contact: an unknown contact or campaign attribute reached
    through an alias fails here (``"line N: ..."``), not at every send. Other failures depend on
    a contact's data (a custom field the sample lacks) and are not the template's fault here."""
    try:
        template.render(template_context(SAMPLE_CONTACT, SAMPLE_CAMPAIGN, "https://example.invalid/u/check"))
    except UnknownAttribute as exc:
        line, tb = 1, exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == "<template>":
                line = tb.tb_lineno
            tb = tb.tb_next
        return f"line {line}: {exc}"
    except Exception:  # noqa: BLE001 - data-dependent failures are reported per message at send time
        return None
    return None


def _field_name(prefix: str, field: str) -> str:
    return f"{prefix}.{field}" if prefix else field


def template_errors(subject: str | None, html: str | None, text: str | None, field_prefix: str = "") -> dict:
    """``{field: ["line N: message", ...]}`` for each template that would be refused."""
    errors = {}
    for field, source in zip(TEMPLATE_FIELDS, (subject, html, text), strict=True):
        problems = check_template(source, _kind(field))
        if problems:
            errors[_field_name(field_prefix, field)] = problems
    return errors


def errors_message(errors: dict) -> str:
    field, problems = next(iter(errors.items()))
    more = sum(len(p) for p in errors.values()) - 1
    tail = f" (and {more} more)" if more else ""
    return f"{field}: {problems[0]}{tail}"


def validate_step_templates(subject: str | None, html: str | None, text: str | None, field_prefix: str = "") -> None:
    """Raise ``InvalidInput`` (422) naming the field and line of every problem, e.g.
    ``details={"steps[1].html": ["line 3: unknown variable 'contact.phone' ..."]}``."""
    errors = template_errors(subject, html, text, field_prefix)
    if errors:
        raise InvalidInput(f"template error in {errors_message(errors)}", details=errors, code="invalid_template")


# --------------------------------------------------------------------------- rendering


def _render_one(field: str, source: str, context: dict, field_prefix: str) -> str:
    name = _field_name(field_prefix, field)
    try:
        template = _compiled(_kind(field), source)
    except TemplateSyntaxError as exc:
        raise RenderError(name, f"line {exc.lineno}: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001 - too deep to parse, or Python refusing the generated code
        raise RenderError(name, f"the template cannot be compiled ({type(exc).__name__})") from None
    try:
        return template.render(context)
    except SecurityError as exc:
        raise RenderError(name, f"refused by the sandbox: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any failure inside a user template is that template's error
        raise RenderError(name, f"{type(exc).__name__}: {exc}") from None


def render_step(step_like: Any, contact_like: Any, campaign_like: Any, unsubscribe_url: str,
                field_prefix: str = "") -> RenderedEmail:
    """Render an email step for one contact. ``step_like`` has ``subject``, ``html`` and an
    optional ``text`` (a Step row or a dict). Without a text template the text part is derived
    from the rendered HTML. Raises ``RenderError``."""
    context = template_context(contact_like, campaign_like, unsubscribe_url)
    subject_src = _get(step_like, "subject") or ""
    html_src = _get(step_like, "html") or ""
    text_src = _get(step_like, "text")
    # A subject is one header line: newlines from a contact's fields must not break it.
    subject = " ".join(_render_one("subject", subject_src, context, field_prefix).split())
    html = _render_one("html", html_src, context, field_prefix)
    text = _render_one("text", text_src, context, field_prefix) if text_src else html_to_text(html)
    return RenderedEmail(subject, html, text)


def preview(step_like: Any, contact_like: Any = None, campaign_like: Any = None,
            unsubscribe_url: str = "https://example.invalid/u/preview") -> dict:
    """For the UI's live preview: ``{"subject", "html", "text", "errors"}``. Never raises for
    a template problem: the rendered parts are ``None`` and ``errors`` maps each field to its
    problems (``"line N: message"``)."""
    subject, html, text = (_get(step_like, f) for f in TEMPLATE_FIELDS)
    errors = template_errors(subject, html, text)
    if not errors:
        try:
            rendered = render_step(step_like, contact_like or SAMPLE_CONTACT, campaign_like, unsubscribe_url)
        except RenderError as exc:
            errors = {exc.field: exc.details[exc.field]}
        else:
            return {"subject": rendered.subject, "html": rendered.html, "text": rendered.text, "errors": {}}
    return {"subject": None, "html": None, "text": None, "errors": errors}


# --------------------------------------------------------------------------- HTML to text

_BLOCK = {
    "address", "article", "aside", "blockquote", "center", "dd", "div", "dl", "dt", "fieldset", "figcaption",
    "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "main", "nav", "ol", "p",
    "pre", "section", "table", "tbody", "tfoot", "thead", "ul",
}
_PARAGRAPH = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "ul", "ol", "table", "pre", "dl", "hr"}
_LINE = {"tr", "li", "dt", "dd", "div"}
_SKIP = {"script", "style", "head", "title", "template", "noscript"}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
_BREAK = "\x00"  # a hard line break, kept through whitespace collapsing
_PARA = "\x01"  # a paragraph break
_PRE_SPACE = "\x02"  # a space inside <pre>, kept through whitespace collapsing
_PRE_TAB = "\x03"
_WHITESPACE = re.compile(r"\s+")
_MARKERS = dict.fromkeys(map(ord, _BREAK + _PARA + _PRE_SPACE + _PRE_TAB))  # removed from the input


class _TextExtractor(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0
        self.pre = 0
        self.links: list[tuple[str | None, int]] = []

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP:
            if tag not in _VOID:
                self.skip += 1
            return
        if self.skip:
            return
        if tag == "br":
            self.out.append(_BREAK)
        elif tag == "hr":
            self.out.append(_PARA + "----" + _PARA)
        elif tag in _PARAGRAPH:
            self.out.append(_PARA)
        elif tag in _LINE or tag in _BLOCK:
            self.out.append(_BREAK)
        if tag == "li":
            self.out.append("- ")
        elif tag in ("td", "th"):
            self.out.append(" ")
        elif tag == "pre":
            self.pre += 1
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt:
                self.out.append(alt)
        elif tag == "a":
            self.links.append((dict(attrs).get("href"), len(self.out)))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
            return
        if self.skip:
            return
        if tag == "a" and self.links:
            href, start = self.links.pop()
            label = " ".join("".join(self.out[start:]).replace(_BREAK, " ").replace(_PARA, " ").split())
            href = (href or "").strip()
            shown = href[7:] if href.lower().startswith("mailto:") else href
            if href and not href.startswith("#") and shown != label:
                self.out.append(f" ({href})" if label else href)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
            self.out.append(_PARA)
        elif tag in _PARAGRAPH:
            self.out.append(_PARA)
        elif tag in _LINE or tag in _BLOCK:
            self.out.append(_BREAK)

    def handle_data(self, data):
        if self.skip:
            return
        data = data.translate(_MARKERS)
        if self.pre:
            self.out.append(data.replace("\n", _BREAK).replace(" ", _PRE_SPACE).replace("\t", _PRE_TAB))
        else:
            self.out.append(_WHITESPACE.sub(" ", data))


@functools.lru_cache(maxsize=64)
def html_to_text(html: str) -> str:
    """A plain-text version of an HTML email: paragraphs and ``<br>`` become line breaks, links
    become ``text (url)``, scripts and styles are dropped, entities decoded, whitespace collapsed.
    Cached: a step whose HTML is the same for many contacts is converted once."""
    if not html:
        return ""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    raw = "".join(parser.out)
    lines: list[str] = []
    for para in raw.split(_PARA):
        para_lines = [" ".join(line.split()) for line in para.split(_BREAK)]
        para_lines = [line for line in para_lines if line]
        if para_lines:
            lines.append("\n".join(para_lines))
    return "\n\n".join(lines).replace(_PRE_SPACE, " ").replace(_PRE_TAB, "\t")
