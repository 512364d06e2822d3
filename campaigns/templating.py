"""Step templates: Jinja2 in a sandbox, checked when saved, compiled once and rendered many times.

A step has three templates: ``subject`` and ``text`` (plain text, never HTML-escaped) and
``html`` (autoescaped, so a contact's ``<script>`` first name arrives as text). They see three
names and nothing else:

- ``contact``: ``email``, ``first_name``, ``last_name``, ``timezone`` and ``fields`` (the
  custom fields; ``contact.fields.x`` or ``contact.fields["x y"]``, the name matched as
  written, else whatever its case, spaces and punctuation; a field the contact lacks renders
  empty, as does any attribute under it);
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

And limits, so that one contact's render can neither eat the worker's memory nor run for ever
(``MAX_*`` below; a ``TemplateLimitError``, refused on save with its line when the sample
contact's trial render hits it, else a ``RenderError`` for that message):

- a width, padding, precision or count given to a filter, a string method or a format
  (``|center``, ``|indent``, ``|batch``, ``|slice``, ``|round``, ``.zfill()``, ``.ljust()``,
  ``.expandtabs()``, ``'%50000000s'``, ``'{:>50000000}'``...) is at most ``MAX_WIDTH``;
- no string or list a template builds (an operator, a filter, a method, ``~``, a literal, a
  slice) exceeds ``MAX_VALUE_SIZE``, checked before building whatever can grow faster than its
  inputs (``*``, ``|join``, ``|replace``, ``|wordwrap``, ``%``, ``.format()``...), and no
  integer ``MAX_POWER_BITS``; ``encode()`` and ``to_bytes()`` are refused;
- one field's render counts its steps (loop items, calls, filters; ``MAX_STEPS``), what it
  builds (``MAX_BUILT_CHARS``, macro and ``{% set %}`` buffers included) and its time
  (``MAX_RENDER_SECONDS`` of its thread's CPU time), and its output is at most ``MAX_OUTPUT_CHARS``.

The generated code reports to the render's budget (``_CodeGenerator``), filters are wrapped
(``_guard_filter``) and never run at compile time, so that all the work happens in a render.

Compiled templates are cached by source (``_compiled``), so the engine compiles each
template once per process and renders it for every contact. Nothing here imports Flask.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import re
import time
import types
from collections import abc
from contextvars import ContextVar
from html.parser import HTMLParser
from typing import Any, NamedTuple

from jinja2 import (
    ChainableUndefined,
    StrictUndefined,
    TemplateSyntaxError,
    UndefinedError,
    meta,
    nodes,
    pass_environment,
)
from jinja2.compiler import CodeGenerator, operators, optimizeconst
from jinja2.filters import make_attrgetter
from jinja2.runtime import BlockReference, LoopContext, Macro, markup_join, str_join
from jinja2.sandbox import (
    ImmutableSandboxedEnvironment,
    SandboxedEscapeFormatter,
    SandboxedFormatter,
    SecurityError,
)
from markupsafe import Markup

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

# What rendering one field for one contact may do (the limits in the docstring).
MAX_VALUE_SIZE = 1_000_000  # characters (or items) in one string or list a template builds
MAX_WIDTH = 10_000  # a width, padding, precision or count given to a filter, a method or a format
MAX_POWER_BITS = 100_000  # bits in one integer a template computes with
MAX_BUILT_CHARS = 10_000_000  # characters and items built while rendering one field, in all
MAX_STEPS = 1_000_000  # loop iterations, calls and filters while rendering one field
# Seconds of the rendering thread's own CPU time (not wall-clock: a busy machine, or the GIL held
# by the other send threads, must not turn a slow moment into a permanent failure).
MAX_RENDER_SECONDS = 2.0  # rendering one field (and deriving the text part from the HTML)
MAX_OUTPUT_CHARS = 2_000_000  # one rendered field


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


# --------------------------------------------------------------------------- limits


class TemplateLimitError(SecurityError):
    """A template asked for more than the limits above allow (a width, a size, time)."""


class _Budget:
    """What one field's render has used so far: steps, characters built, time."""

    __slots__ = ("built", "steps", "ticks", "deadline")

    def __init__(self):
        self.built = 0
        self.steps = 0
        self.ticks = 0
        self.deadline: float | None = None  # set at the first tick: most renders never tick

    def tick(self) -> None:
        # The clock at the first tick and every 16th after it: reading a thread's CPU clock is a
        # system call (~1 µs alone, far more in a busy consumer: it was a sixth of the send path's
        # time when every render read it), and 16 ticks' work between two reads is small.
        self.ticks += 1
        if self.ticks & 15 == 1:
            now = time.thread_time()
            if self.deadline is None:
                self.deadline = now + MAX_RENDER_SECONDS
            if now > self.deadline:
                raise TemplateLimitError(f"the template takes too long to render (more than {MAX_RENDER_SECONDS:g} "
                                         "seconds of CPU time)")

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise TemplateLimitError(f"the template does too much work (more than {MAX_STEPS:,} loop iterations "
                                     "and calls)")
        self.tick()

    def charge(self, size: int) -> None:
        self.built += size
        if self.built > MAX_BUILT_CHARS:
            raise TemplateLimitError(f"the template builds too much text (more than {MAX_BUILT_CHARS:,} characters "
                                     "in all)")


# The budget of the render in progress (None outside renders: the checks on sizes still apply).
_BUDGET: ContextVar[_Budget | None] = ContextVar("herald_template_budget", default=None)
# Set while a template is parsed, checked and compiled: filters are then not run (no constant
# folding), so that all their work happens within a render's budget.
_COMPILING: ContextVar[bool] = ContextVar("herald_template_compiling", default=False)


@contextlib.contextmanager
def _compiling():
    token = _COMPILING.set(True)
    try:
        yield
    finally:
        _COMPILING.reset(token)


def _tick() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.tick()


def _step() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.step()


def _shown(number: int) -> str:
    return str(number) if abs(number) < 10**18 else "a huge number"


def _check_width(what: str, number: Any) -> None:
    if isinstance(number, int) and abs(number) > MAX_WIDTH:
        raise TemplateLimitError(f"{what} {_shown(number)} is too large (at most {MAX_WIDTH:,})")


def _check_size(what: str, size: int, limit: int | None = None) -> None:
    limit = MAX_VALUE_SIZE if limit is None else limit
    if size > limit:
        raise TemplateLimitError(f"{what} would be too large (more than {limit:,} characters or items)")


def _check_bits(number: int) -> None:
    if number.bit_length() > MAX_POWER_BITS:
        raise TemplateLimitError(f"this number is too large (more than {MAX_POWER_BITS:,} bits)")


_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))
_COLLECTIONS = (set, frozenset, *_VIEWS)


def _weight(value: Any, limit: int | None = None, indent: int = 0) -> int:
    """About how many characters ``str(value)`` takes: a string its length, a list one per item
    plus its items' weights, an item shared N times counted N times (``[s, s]`` weighs twice
    ``s``); with ``indent``, each item also its depth times ``indent`` (pretty-printing). Stops
    counting once past ``limit``, so it costs at most about ``limit`` steps."""
    limit = MAX_VALUE_SIZE if limit is None else limit
    total = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        total += depth * indent
        if isinstance(item, str):
            total += len(item)
            if total > limit:
                return total
            continue
        if isinstance(item, int):
            total += item.bit_length() // 3 + 1
            continue
        if isinstance(item, _Fields):
            item = item._data
        if isinstance(item, (list, tuple, *_COLLECTIONS)):
            children = item
        elif isinstance(item, (dict, abc.Mapping)):
            children = itertools.chain(item.keys(), item.values())
        else:  # a float, None, an undefined, a contact or campaign...
            total += 24 if isinstance(item, float) else 1
            continue
        total += len(item) + 2
        if total > limit:
            return total
        stack.extend((child, depth + 1) for child in children)
    return total


def _formatted_size(value: Any) -> int:
    """What formatting ``value`` may print: ``'%f' % 1e300`` prints 301 digits."""
    if isinstance(value, float) and math.isfinite(value):
        return max(24, len(f"{value:.0f}"))
    return _weight(value)


def _as_text(value: Any) -> str:
    """``str(value)`` for a filter that works on text, once its size is known to be sane."""
    if isinstance(value, str):
        return value
    _check_size("this value", _weight(value))
    return str(value)


def _built(value: Any, limit: int | None = None, what: str = "the result") -> Any:
    """Check and count a value a template has just built (a filter's, method's or operator's
    result, a literal)."""
    if isinstance(value, str):
        size = len(value)
    elif isinstance(value, (list, tuple, dict)):
        size = _weight(value, limit)
    elif isinstance(value, int):
        _check_bits(value)
        return value
    else:  # an iterator (counted as it is consumed), a number, an undefined...
        return value
    _check_size(what, size, limit)
    budget = _BUDGET.get()
    if budget is not None:
        budget.charge(size)
    return value


def _check_joined(what: str, items: list, separator: Any) -> None:
    size = len(_as_text(separator)) * max(len(items) - 1, 0)
    for item in items:
        if size > MAX_VALUE_SIZE:
            break
        size += _weight(item, MAX_VALUE_SIZE - size)
    _check_size(f"the result of {what}", size)


def _check_replaced(what: str, text: str, old: str, new: str, count: Any) -> None:
    if len(new) <= len(old):
        return
    found = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    _check_size(f"the result of {what}", len(text) + found * (len(new) - len(old)))


def _printf_number(fmt: str, i: int, take) -> tuple[Any, int]:
    """A width or precision in a ``%`` format at ``fmt[i]``: ``*`` takes it from the values."""
    if i < len(fmt) and fmt[i] == "*":
        return take(), i + 1
    j = i
    while j < len(fmt) and fmt[j] in "0123456789":
        j += 1
    digits = fmt[i:j]
    return (int(digits) if len(digits) < 10 else 10**10) if digits else 0, j


def _check_printf(fmt: str, values: Any) -> None:
    """``fmt % values`` (the ``%`` operator, the ``format`` filter), before it runs: each width
    and precision at most MAX_WIDTH, the result at most MAX_VALUE_SIZE."""
    positional = values if isinstance(values, tuple) else (values,)
    index = 0

    def take():
        nonlocal index
        index += 1
        return positional[index - 1] if index <= len(positional) else None

    size, n = len(fmt), len(fmt)
    i = fmt.find("%")
    while 0 <= i < n - 1:
        i += 1
        value, keyed = None, False
        if fmt[i] == "(":  # %(key)s, the key may hold balanced parentheses
            depth, start = 1, i + 1
            i += 1
            while i < n and depth:
                depth += (fmt[i] == "(") - (fmt[i] == ")")
                i += 1
            keyed = True
            try:
                value = values[fmt[start:i - 1]]
            except Exception:  # noqa: BLE001 - Python will say what is wrong when it formats
                value = None
        while i < n and fmt[i] in "-+ #0":
            i += 1
        width, i = _printf_number(fmt, i, take)
        precision = 0
        if i < n and fmt[i] == ".":
            precision, i = _printf_number(fmt, i + 1, take)
        _check_width("a % format's width", width)
        _check_width("a % format's precision", precision)
        if i < n and fmt[i] in "hlL":
            i += 1
        if i < n and fmt[i] != "%":
            if not keyed:
                value = take()
            size += sum(x for x in (width, precision) if isinstance(x, int) and x > 0)
            size += _formatted_size(value) * (10 if fmt[i] in "ra" else 1)  # repr() escapes
            _check_size("the result of this % format", size)
        i = fmt.find("%", i + 1)


_FORMAT_NUMBER = re.compile(r"[0-9]+")


class _FormatGuard:
    """Mixed into the sandbox's ``str.format`` formatters: each width and precision at most
    MAX_WIDTH and the result at most MAX_VALUE_SIZE, checked field by field before formatting."""

    _size = 0

    def vformat(self, format_string, args, kwargs):
        self._size = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def format_field(self, value, format_spec):
        _tick()
        spec = str(format_spec)
        numbers = [int(x) if len(x) < 10 else 10**10 for x in _FORMAT_NUMBER.findall(spec)]
        for number in numbers:
            _check_width("a format's width or precision", number)
        self._size += sum(numbers) + _formatted_size(value)
        _check_size("the result of format()", self._size)
        return super().format_field(value, format_spec)


class _Formatter(_FormatGuard, SandboxedFormatter):
    pass


class _EscapeFormatter(_FormatGuard, SandboxedEscapeFormatter):
    pass


# --------------------------------------------------------------------------- filters and tests

# Filters whose arguments can ask for a lot: each is checked before the filter runs. ``offset`` is
# 1 when the filter is passed the context or environment first.


def _param(args: tuple, kwargs: dict, offset: int, index: int, name: str, default: Any = None) -> Any:
    """A filter's argument, by position (0 is the filtered value) or by name."""
    index += offset
    return args[index] if len(args) > index else kwargs.get(name, default)


def _check_center_filter(args, kwargs, offset):
    _check_width("center(): width", _param(args, kwargs, offset, 1, "width", 80))


def _check_indent_filter(args, kwargs, offset):
    width = _param(args, kwargs, offset, 1, "width", 4)
    _check_width("indent(): width", width)
    unit = len(width) if isinstance(width, str) else max(width, 0) if isinstance(width, int) else 0
    text = _as_text(_param(args, kwargs, offset, 0, "s", ""))
    _check_size("the result of indent()", len(text) + (len(text.splitlines()) + 1) * unit)


def _check_wordwrap_filter(args, kwargs, offset):
    text = _as_text(_param(args, kwargs, offset, 0, "s", ""))
    width = _param(args, kwargs, offset, 1, "width", 79)
    wrapstring = _param(args, kwargs, offset, 3, "wrapstring", None)
    if not isinstance(width, int) or width < 1:
        return  # textwrap refuses it
    # A wrapped line and the word after it are longer than width together: at most 2/width lines
    # per character, and one more per paragraph.
    lines = 2 * len(text) // width + 2 * (len(text.splitlines()) + 1)
    separator = 1 if wrapstring is None else len(_as_text(wrapstring))
    _check_size("the result of wordwrap()", len(text) + lines * separator)
    # Cutting a long word copies what is left of it for every line: quadratic (10**10 is a
    # fraction of a second).
    longest = max(map(len, text.split()), default=0)
    if _param(args, kwargs, offset, 2, "break_long_words", True) and longest * longest // width > 10**10:
        raise TemplateLimitError(f"wordwrap(): a word of {longest:,} characters is too long to wrap at width {width}")


def _check_format_filter(args, kwargs, offset):
    # what the filter does: soft_str(value) % (kwargs or args)
    _check_printf(_as_text(_param(args, kwargs, offset, 0, "value", "")), kwargs or tuple(args[offset + 1:]))


def _check_join_filter(args, kwargs, offset):
    eval_ctx = args[0]
    items = list(_param(args, kwargs, offset, 0, "value", ()))
    separator = _param(args, kwargs, offset, 1, "d", "")
    attribute = _param(args, kwargs, offset, 2, "attribute", None)
    if attribute is not None:
        getter = make_attrgetter(eval_ctx.environment, attribute)
        items = [getter(item) for item in items]
    _check_joined("join()", items, separator)
    return (eval_ctx, items, separator), {}


def _check_replace_filter(args, kwargs, offset):
    text, old, new = (_as_text(_param(args, kwargs, offset, i, name, "")) for i, name in enumerate(("s", "old", "new")))
    _check_replaced("replace()", text, old, new, _param(args, kwargs, offset, 3, "count", None))


def _check_padded_filter(name: str, count_name: str, what: str):
    """``batch`` and ``slice``: a count (at most MAX_WIDTH), and ``fill_with`` repeated up to that
    many times (the last batch, or each slice, is padded with it)."""

    def check(args, kwargs, offset):
        count = _param(args, kwargs, offset, 1, count_name)
        _check_width(f"{name}(): {what}", count)
        fill = _param(args, kwargs, offset, 2, "fill_with", None)
        if fill is not None and isinstance(count, int):
            _check_size(f"the padding of {name}()", _weight(fill) * count)

    return check


def _check_round_filter(args, kwargs, offset):
    _check_width("round(): precision", _param(args, kwargs, offset, 1, "precision", 0))


def _check_urlize_filter(args, kwargs, offset):
    text = _as_text(_param(args, kwargs, offset, 0, "value", ""))
    attributes = sum(len(_as_text(_param(args, kwargs, offset, i, name) or "")) for i, name in ((3, "target"),
                                                                                                 (4, "rel")))
    size = len(text)
    for word in text.split():  # a link repeats its address, in an <a> with these attributes
        if "." in word or "@" in word or ":" in word:
            size += len(word) + 64 + attributes
            if size > MAX_VALUE_SIZE:
                break
    _check_size("the result of urlize()", size)


def _check_tojson_filter(args, kwargs, offset):
    indent = _param(args, kwargs, offset, 1, "indent", None)
    _check_width("tojson(): indent", indent)
    unit = len(indent) if isinstance(indent, str) else max(indent, 0) + 1 if isinstance(indent, int) else 0
    _check_size("the result of tojson()", _weight(_param(args, kwargs, offset, 0, "value"), indent=unit))


def _check_pprint_filter(args, kwargs, offset):
    _check_size("the result of pprint()", _weight(_param(args, kwargs, offset, 0, "value"), indent=2))


_FILTER_CHECKS = {
    "center": _check_center_filter,
    "indent": _check_indent_filter,
    "wordwrap": _check_wordwrap_filter,
    "format": _check_format_filter,
    "join": _check_join_filter,
    "replace": _check_replace_filter,
    "batch": _check_padded_filter("batch", "linecount", "size"),
    "slice": _check_padded_filter("slice", "slices", "count"),
    "round": _check_round_filter,
    "urlize": _check_urlize_filter,
    "tojson": _check_tojson_filter,
    "pprint": _check_pprint_filter,
}


@pass_environment
def _do_sum(environment, iterable, attribute=None, start=0):
    """The ``sum`` filter, without the quadratic time of adding up lists one at a time
    (``rows|sum(start=[])``)."""
    if attribute is not None:
        iterable = map(make_attrgetter(environment, attribute), iterable)
    if not isinstance(start, (list, tuple)):
        return sum(iterable, start)
    kind = list if isinstance(start, list) else tuple
    items = list(iterable)
    for item in items:
        if not isinstance(item, kind):
            raise TypeError(f'can only concatenate {kind.__name__} (not "{type(item).__name__}") to {kind.__name__}')
    _check_size("the result of sum()", sum(len(item) for item in items) + len(start))
    return kind(itertools.chain(start, *items))


def _guard_filter(name: str, func):
    check = _FILTER_CHECKS.get(name)
    offset = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(func)  # keeps jinja_pass_arg
    def guarded(*args, **kwargs):
        if _COMPILING.get():
            raise nodes.Impossible()  # no constant folding: evaluated when rendering, within its budget
        _step()
        value = args[offset] if len(args) > offset else None
        if not isinstance(value, str):  # most filters start with str(value)
            _check_size("this value", _weight(value))
        if check is not None:
            changed = check(args, kwargs, offset)
            if changed is not None:
                args, kwargs = changed
        return _built(func(*args, **kwargs), what=f"the result of {name}()")

    return guarded


def _guard_test(func):
    @functools.wraps(func)
    def guarded(*args, **kwargs):
        result = func(*args, **kwargs)  # ``is sameas``, ``is in``... compare: look at the clock after
        _tick()
        return result

    return guarded


# --------------------------------------------------------------------------- environments


def _finalize(value):
    # None (a contact without a first name) prints as nothing, not "None".
    if value is None:
        return ""
    if not isinstance(value, (str, int, float)):  # str() of a list repeats its shared items: [s, s]
        _tick()
        _check_size("this value", _weight(value))
    return value


class UnknownAttribute(UndefinedError):
    """A contact or campaign attribute that does not exist, reached where the check on save cannot
    see it (through an alias: ``{% set c = contact %}{{ c.phone }}``, ``contact|attr('phone')``)."""


class _CodeGenerator(CodeGenerator):
    """The sandbox's code, reporting to the render's budget: ``{% for %}`` counts its items,
    output buffers (macros, ``{% set %}`` blocks, filter and call blocks) count what is written
    to them, ``~`` and literals are checked and counted like any built value, comparisons look
    at the clock, and slices go through the sandbox."""

    _counted_iters: frozenset[int] = frozenset()  # the iterables of the {% for %} being written

    def buffer(self, frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.guard_buffer()")

    def visit_For(self, node, frame) -> None:
        outer = self._counted_iters
        self._counted_iters = outer | {id(node.iter)}
        try:
            super().visit_For(node, frame)
        finally:
            self._counted_iters = outer

    def visit(self, node, *args, **kwargs):
        if id(node) not in self._counted_iters:
            return super().visit(node, *args, **kwargs)
        self.write("environment.guard_iter(")
        super().visit(node, *args, **kwargs)
        self.write(")")
        return None

    @optimizeconst
    def visit_Concat(self, node, frame) -> None:
        if frame.eval_ctx.volatile:
            markup = "context.eval_ctx.volatile"  # as CodeGenerator.visit_Concat
        else:
            markup = repr(bool(frame.eval_ctx.autoescape))
        self.write(f"environment.guard_concat({markup}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _write_built(self, visit, node, frame) -> None:
        self.write("environment.guard_built(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node, frame) -> None:
        self._write_built(super().visit_List, node, frame)

    def visit_Dict(self, node, frame) -> None:
        self._write_built(super().visit_Dict, node, frame)

    def visit_Tuple(self, node, frame) -> None:
        if node.ctx == "load":
            self._write_built(super().visit_Tuple, node, frame)
        else:  # an assignment's targets
            super().visit_Tuple(node, frame)

    def visit_Operand(self, node, frame) -> None:
        # a == b == c: look at the clock before each comparison (comparing lists is not cheap)
        self.write(f" {operators[node.op]} environment.guard_tick(")
        self.visit(node.expr, frame)
        self.write(")")

    @optimizeconst
    def visit_Getitem(self, node, frame) -> None:
        if not isinstance(node.arg, nodes.Slice):
            return super().visit_Getitem(node, frame)
        self.write("environment.guard_slice(")  # CodeGenerator slices directly, past the sandbox
        self.visit(node.node, frame)
        for part in (node.arg.start, node.arg.stop, node.arg.step):
            self.write(", ")
            if part is None:
                self.write("None")
            else:
                self.visit(part, frame)
        self.write(")")


class _Buffer(list):
    """An output buffer that counts what is written to it."""

    __slots__ = ("budget",)

    def __init__(self, budget: _Budget):
        super().__init__()
        self.budget = budget

    def append(self, item) -> None:
        self.budget.charge(len(item) if isinstance(item, str) else 1)
        super().append(item)

    def extend(self, items) -> None:
        items = tuple(items)
        self.budget.charge(sum(len(item) if isinstance(item, str) else 1 for item in items))
        super().extend(items)


class _Counted:
    """An iterator counting each item as a step of the render."""

    __slots__ = ("iterator", "budget")

    def __init__(self, iterator, budget: _Budget):
        self.iterator = iterator
        self.budget = budget

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.iterator)
        self.budget.step()
        return item


# What a call returns that is rendered template text (a macro, caller(), a block, a recursive
# loop): limited like a rendered field, not like a built value.
_TEMPLATE_TEXT = (Macro, BlockReference, LoopContext)
_OPERATIONS = {"+": "addition", "-": "subtraction", "*": "multiplication", "/": "division", "//": "division",
               "%": "% operation", "**": "power"}
_STR_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill"})
_BYTES_METHODS = frozenset({"encode", "to_bytes"})


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, plus limits on what one render may ask for (see the limits above)."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
    intercepted_unops = frozenset({"+", "-"})

    def getattr(self, obj, attribute):
        if isinstance(obj, _View) and attribute not in obj._attrs:
            raise UnknownAttribute(obj._unknown(attribute))
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _tick()  # d[key] hashes the key: a long tuple takes time
        if isinstance(obj, _View) and argument not in obj._attrs:
            raise UnknownAttribute(obj._unknown(argument))
        return super().getitem(obj, argument)

    def call_binop(self, context, operator, left, right):
        _tick()
        for number in (left, right):
            if isinstance(number, int):
                _check_bits(number)
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and n > 0:
                    _check_size("the result of this multiplication", _weight(seq) * n)
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > \
                    MAX_POWER_BITS:
                raise TemplateLimitError("the result of this multiplication would be too large (more than "
                                         f"{MAX_POWER_BITS:,} bits)")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and max(left.bit_length(), 1) * right > MAX_POWER_BITS:
                raise TemplateLimitError(f"the result of this power would be too large (more than {MAX_POWER_BITS:,} "
                                         "bits)")
        elif operator == "+" and isinstance(left, (str, list, tuple)):
            _check_size("the result of this addition", _weight(left) + _weight(right))
        elif operator == "%" and isinstance(left, str):
            _check_printf(left, right)
        result = super().call_binop(context, operator, left, right)
        return _built(result, what=f"the result of this {_OPERATIONS[operator]}")

    def call_unop(self, context, operator, arg):
        _tick()
        if isinstance(arg, int):
            _check_bits(arg)
        return super().call_unop(context, operator, arg)

    def call(self, context, obj, /, *args, **kwargs):
        _step()
        limit = None
        if isinstance(obj, _TEMPLATE_TEXT):
            limit = MAX_OUTPUT_CHARS
            if isinstance(obj, LoopContext) and args:  # loop(children) in a recursive loop
                args = (self.guard_iter(args[0]), *args[1:])
        owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", None)
        if isinstance(owner, (str, int)) and name in _BYTES_METHODS:
            raise SecurityError(f"{name}() is not available in templates")
        if isinstance(owner, str):
            args = self._check_str_method(owner, name, args, kwargs)
        what = f"the result of {name}()" if isinstance(name, str) else "the result of this call"
        return _built(super().call(context, obj, *args, **kwargs), limit, what)

    @staticmethod
    def _check_str_method(text: str, name: str, args: tuple, kwargs: dict) -> tuple:
        """The string methods that can make a long string out of a short one."""
        if name in _STR_WIDTH_METHODS:
            _check_width(f"{name}(): width", args[0] if args else None)
        elif name == "expandtabs":
            tabsize = args[0] if args else kwargs.get("tabsize", 8)
            _check_width("expandtabs(): tab size", tabsize)
            if isinstance(tabsize, int):
                _check_size("the result of expandtabs()", len(text) + text.count("\t") * tabsize)
        elif name == "replace" and len(args) >= 2:
            old, new = (_as_text(x) for x in args[:2])
            _check_replaced("replace()", text, old, new, args[2] if len(args) > 2 else kwargs.get("count", -1))
        elif name == "join" and args:
            items = list(args[0])
            _check_joined("join()", items, text)
            args = (items, *args[1:])
        elif name == "translate" and args and isinstance(args[0], (abc.Mapping, list, tuple, str)):
            table = args[0].values() if isinstance(args[0], abc.Mapping) else args[0]
            longest = max((_weight(x) for x in table), default=1)
            _check_size("the result of translate()", len(text) * max(longest, 1))
        return args

    def wrap_str_format(self, value):
        """SandboxedEnvironment.wrap_str_format, with formatters that check widths and sizes."""
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or value.__name__ not in (
                "format", "format_map"):
            return None
        f_self = value.__self__
        if not isinstance(f_self, str):
            return None
        str_type = type(f_self)
        is_format_map = value.__name__ == "format_map"
        if isinstance(f_self, Markup):
            formatter = _EscapeFormatter(self, escape=f_self.escape)
        else:
            formatter = _Formatter(self)

        def wrapper(*args, **kwargs):
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                kwargs, args = args[0], ()
            return str_type(formatter.vformat(f_self, args, kwargs))

        return functools.update_wrapper(wrapper, value)

    # Called by the generated code (see _CodeGenerator).

    def guard_buffer(self):
        budget = _BUDGET.get()
        return [] if budget is None else _Buffer(budget)

    def guard_iter(self, iterable):
        budget = _BUDGET.get()
        return iterable if budget is None else _Counted(iter(iterable), budget)

    def guard_concat(self, markup, parts):
        size = 0
        for part in parts:
            size += _weight(part, MAX_VALUE_SIZE - size)
            _check_size("the result of ~", size)
        return _built(markup_join(parts) if markup else str_join(parts), what="the result of ~")

    def guard_built(self, value):
        _tick()
        return _built(value, what="this literal")

    def guard_tick(self, value):
        _tick()
        return value

    def guard_slice(self, obj, start, stop, step):
        _tick()
        return _built(obj[start:stop:step], what="this slice")


def _make_env(autoescape: bool) -> _Sandbox:
    env = _Sandbox(
        autoescape=autoescape,
        undefined=StrictUndefined,
        finalize=_finalize,
        keep_trailing_newline=True,
        auto_reload=False,
    )
    env.globals.clear()  # range, lipsum, cycler, joiner, namespace, dict: none of them is needed
    env.filters["sum"] = _do_sum
    env.filters.update({name: _guard_filter(name, func) for name, func in env.filters.items()})
    env.tests.update({name: _guard_test(func) for name, func in env.tests.items()})
    return env


_ENVS = {"html": _make_env(True), "plain": _make_env(False)}


def _kind(field: str) -> str:
    return "html" if field == "html" else "plain"


@functools.lru_cache(maxsize=512)  # bounded: a template may be up to 1 MB
def _compiled(kind: str, source: str):
    """The compiled template for this source (compile once, render many)."""
    with _compiling():
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


_NOT_WORD = re.compile(r"[\W_]+")


def field_key(name) -> str:
    """How a custom field's name is matched when it is not found as written: case, spaces and
    punctuation aside (a CSV column "Company Name" is ``contact.fields.company_name``)."""
    return _NOT_WORD.sub("_", str(name)).strip("_").casefold()


class _Fields:
    """``contact.fields``: attribute or item access to the custom fields, missing ones empty. A
    name not found as written matches a field whose name differs only in case, spaces and
    punctuation (``field_key``): the first such field in name order."""

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

    def _lookup(self, key):
        found = self._find(key)
        if found is not None:
            value = self._data[found]
            return _Fields(value) if isinstance(value, dict) else value
        return FieldUndefined(name=str(key))

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._lookup(name)

    def __getitem__(self, key):
        return self._lookup(key)

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
        with _compiling():
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


def _template_line(exc: BaseException) -> int | None:
    """The template's line an exception was raised at (its innermost template frame)."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _render(template, context: dict, label: str) -> str:
    """Render within a fresh budget (see the limits), the output at most MAX_OUTPUT_CHARS."""
    token = _BUDGET.set(_Budget())
    try:
        chunks = template.generate(context)
        parts, size = [], 0
        for chunk in chunks:
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                error = TemplateLimitError(f"the rendered {label} is too large (more than {MAX_OUTPUT_CHARS:,} "
                                           "characters)")
                chunks.throw(error)  # raised where the template is, so that it carries its line
                raise error
            parts.append(chunk)
        return "".join(parts)
    finally:
        _BUDGET.reset(token)


def _trial_render(template) -> str | None:
    """Render once for the sample contact: an unknown contact or campaign attribute reached
    through an alias, or what the sandbox refuses (a limit), fails here (``"line N: ..."``),
    not at every send. Other failures depend on a contact's data (a custom field the sample
    lacks) and are not the template's fault here."""
    try:
        _render(template, template_context(SAMPLE_CONTACT, SAMPLE_CAMPAIGN, "https://example.invalid/u/check"),
                "template")
    except (UnknownAttribute, SecurityError) as exc:  # SecurityError: a limit, an unsafe attribute or call
        return f"line {_template_line(exc) or 1}: {exc}"
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
        return _render(template, context, field)
    except SecurityError as exc:
        line = _template_line(exc)
        raise RenderError(name, f"{f'line {line}: ' if line else ''}refused by the sandbox: {exc}") from None
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
    if text_src:
        text = _render_one("text", text_src, context, field_prefix)
    else:
        try:
            text = html_to_text(html)
        except Exception as exc:  # noqa: BLE001 - HTML the parser gives up on, or takes too long over
            raise RenderError(_field_name(field_prefix, "text"),
                              f"the text part cannot be derived from the HTML ({exc}); give the step a text "
                              "version") from None
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
        # HTMLParser is quadratic on some broken HTML ("<a" * 100000): each piece it reports is
        # found in at most one scan of what is left, so looking at the clock here bounds it.
        # The clock is read at every 16th piece (see _Budget.tick), from the first.
        self.deadline: float | None = None
        self.pieces = 0

    def in_time(self, *_):
        self.pieces += 1
        if self.pieces & 15 != 1:
            return
        now = time.thread_time()
        if self.deadline is None:
            self.deadline = now + MAX_RENDER_SECONDS
        if now > self.deadline:
            raise ValueError(f"the HTML takes too long to parse (more than {MAX_RENDER_SECONDS:g} seconds of CPU time)")

    handle_comment = handle_decl = handle_pi = unknown_decl = in_time

    def handle_starttag(self, tag, attrs):
        self.in_time()
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
        self.in_time()
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
        self.in_time()
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
