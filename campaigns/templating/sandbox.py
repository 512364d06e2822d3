"""The environment step templates render in, and what one field's render may use.

The check on save (``language``) leaves only operations whose cost is linear in their inputs;
here every one of them that can touch more than a few characters goes through the render's
``Budget``: filters, tests, arithmetic, ``~``, comparisons, list literals, lookups, printed values
and each loop iteration. Each such step first checks its inputs' size (at most
``MAX_VALUE_SIZE``), so no single step is long; the budget counts steps and the characters they
touch, and reads the thread's CPU clock at the first step, every 16th and after every
``CLOCK_EVERY_CHARS`` characters: a render is stopped at most 16 short steps past its limit.
Why it holds and the figures measured: docs/templates.md.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from datetime import date, datetime
from typing import Any

from jinja2 import StrictUndefined, Undefined, pass_context
from jinja2.runtime import LoopContext, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from .views import Fields, View

MAX_VALUE_SIZE = 1_000_000  # characters (or list items) in one value a step reads or builds
MAX_OUTPUT_CHARS = 2_000_000  # one rendered field
MAX_STEPS = 50_000  # loop iterations, filters, operations... while rendering one field
MAX_WORK_CHARS = 10_000_000  # characters those steps read or build, in all
MAX_INT_BITS = 4_096  # one integer a template computes
MAX_DATE_FORMAT = 100  # characters in a |date format
# Seconds of the rendering thread's own CPU time (not wall-clock: a busy machine, or the GIL held
# by the other send threads, must not turn a slow moment into a permanent failure).
MAX_RENDER_SECONDS = 2.0
CLOCK_EVERY_STEPS = 16
CLOCK_EVERY_CHARS = 1_000_000
# Filters far slower per character than the others (|title works word by word in Python: ~0.4 s
# for 1,000,000 characters): their input is at most ``limit`` characters, each counted ``weight``.
SLOW_FILTERS = {"title": (50_000, 40)}

# What loop.<name> may be.
LOOP_ATTRS = frozenset({"index", "index0", "revindex", "revindex0", "first", "last", "length", "previtem",
                        "nextitem", "cycle", "depth", "depth0"})


class TemplateLimitError(SecurityError):
    """A template asked for more than the limits above allow (a size, steps, time)."""


class Budget:
    """What one field's render has used so far: steps, characters, time."""

    __slots__ = ("steps", "chars", "unclocked", "deadline")

    def __init__(self):
        self.steps = 0
        self.chars = 0
        self.unclocked = 0  # characters since the clock was last read
        self.deadline: float | None = None  # set at the first clock read

    def step(self, chars: int = 0) -> None:
        self.steps += 1
        self.chars += chars
        self.unclocked += chars
        if self.steps > MAX_STEPS:
            raise TemplateLimitError(f"the template does too much work (more than {MAX_STEPS:,} loop iterations "
                                     "and operations)")
        if self.chars > MAX_WORK_CHARS:
            raise TemplateLimitError(f"the template does too much work (more than {MAX_WORK_CHARS:,} characters "
                                     "processed)")
        if self.steps % CLOCK_EVERY_STEPS == 1 or self.unclocked > CLOCK_EVERY_CHARS:
            self.unclocked = 0
            now = time.thread_time()
            if self.deadline is None:
                self.deadline = now + MAX_RENDER_SECONDS
            if now > self.deadline:
                raise TemplateLimitError(f"the template takes too long to render (more than "
                                         f"{MAX_RENDER_SECONDS:g} seconds of CPU time)")


BUDGET: ContextVar[Budget | None] = ContextVar("herald_template_budget", default=None)


def _step(chars: int = 0) -> None:
    budget = BUDGET.get()
    if budget is not None:
        budget.step(chars)


def size_of(value: Any, limit: int | None = None) -> int:
    """About how many characters ``str(value)`` takes (a list: its items, each shared item as
    often as it appears). Stops counting past ``limit``, so it costs at most about that."""
    limit = MAX_VALUE_SIZE if limit is None else limit
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, int):  # past MAX_INT_BITS: too large (dividing such numbers is quadratic)
            total += item.bit_length() // 3 + 1 if item.bit_length() <= MAX_INT_BITS else limit + 1
        elif isinstance(item, (list, tuple, dict, Fields)):
            data = item._data if isinstance(item, Fields) else item
            total += len(data) + 2
            stack.extend(data.items() if isinstance(data, dict) else data)
        else:  # a float, None, an undefined, a view...
            total += 24
    return total


def checked(what: str, size: int) -> int:
    if size > MAX_VALUE_SIZE:
        raise TemplateLimitError(f"{what} would be too large (more than {MAX_VALUE_SIZE:,} characters or items)")
    return size


def _numbers_only(*values) -> None:
    for value in values:
        if not isinstance(value, (int, float)):
            raise TemplateLimitError(f"arithmetic works on numbers only, not on {type(value).__name__} values "
                                     "(join text with ~, convert with |int or |float)")
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise TemplateLimitError(f"this number is too large (more than {MAX_INT_BITS:,} bits)")


# --------------------------------------------------------------------------- filters and tests


def _check_replace(value, args, kwargs) -> None:
    old = args[0] if args else kwargs.get("old", "")
    new = args[1] if len(args) > 1 else kwargs.get("new", "")
    if isinstance(value, str) and isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
        found = value.count(old) if old else len(value) + 1
        checked("the result of replace()", len(value) + found * (len(new) - len(old)))


def _check_join(value, args, kwargs) -> None:
    if len(args) > 1 or "attribute" in kwargs:
        raise TemplateLimitError("join() takes only a separator in templates")
    separator = args[0] if args else kwargs.get("d", "")
    items = len(value) if isinstance(value, (str, list, tuple, Fields)) else 0
    checked("the result of join()", size_of(value) + size_of(separator) * items)


def _check_round(value, args, kwargs) -> None:
    precision = args[0] if args else kwargs.get("precision", 0)
    if not isinstance(precision, int) or abs(precision) > 20:
        raise TemplateLimitError(f"round(): precision {precision!r} must be a whole number from -20 to 20")


def do_date(value, format="%Y-%m-%d"):  # the filter's argument as users write it
    """``|date('%d %B %Y')``: a date, datetime or ISO 8601 text formatted with strftime; text that
    is no date is left as it is."""
    if not isinstance(format, str) or len(format) > MAX_DATE_FORMAT:
        raise TemplateLimitError(f"date(): the format must be text of at most {MAX_DATE_FORMAT} characters")
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 40:
            return value
        try:
            value = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return value
    if isinstance(value, (date, datetime)):
        return value.strftime(format)
    return value


_FILTER_CHECKS = {"replace": _check_replace, "join": _check_join, "round": _check_round}


def _first_arg(func, context):
    """What a Jinja filter or test passed the context, eval context or environment expects."""
    kind = getattr(func, "jinja_pass_arg", None)
    if kind is None:
        return ()
    return ({"context": context, "eval_context": context.eval_ctx, "environment": context.environment}[kind.name],)


def guard_filter(name: str, func):
    """``func`` as a step of the render: inputs sized first, the result's size checked after.
    A context filter, so that Jinja never runs it while compiling (constant folding)."""
    check = _FILTER_CHECKS.get(name)
    limit, weight = SLOW_FILTERS.get(name, (None, 1))

    @pass_context
    def guarded(context, value, *args, **kwargs):
        if callable(value) and not isinstance(value, Undefined):  # loop.cycle: str() of it names an object
            raise SecurityError(f"{name}() takes values, not methods")
        size = size_of(value)
        if limit is not None and size > limit:
            raise TemplateLimitError(f"{name}() takes at most {limit:,} characters")
        _step(weight * (checked("this value", size) + checked("an argument", size_of([args, kwargs]))))
        if check is not None:
            check(value, args, kwargs)
        result = func(*_first_arg(func, context), value, *args, **kwargs)
        if isinstance(result, (str, int)):
            checked(f"the result of {name}()", size_of(result))
        return result

    return guarded


def guard_test(func):
    @pass_context
    def guarded(context, value, *args, **kwargs):
        _step(size_of([value, args, kwargs]))
        return func(*_first_arg(func, context), value, *args, **kwargs)

    return guarded


# The filters the rewritten code calls (``language.prepare``): names a template cannot write.


@pass_context
def _concat(context, parts):
    """``a ~ b``."""
    size = 0
    for part in parts:
        size = checked("the result of ~", size + size_of(part, MAX_VALUE_SIZE - size))
    _step(size)
    return markup_join(parts) if context.eval_ctx.autoescape else str_join(parts)


@pass_context
def _literal(context, value):
    """A list or tuple literal: ``[s, s]`` nested forty times would print as a terabyte."""
    _step(checked("this list", size_of(value)))
    return value


@pass_context
def _counted(context, value):
    """A comparison (strings compare in time linear in their length), an ``if``'s test, a value
    ``set``."""
    _step()
    return value


@pass_context
def _loop_items(context, iterable):
    """A ``{% for %}``'s items, each one a step."""
    budget = BUDGET.get()
    if isinstance(iterable, (str, list, tuple)):
        checked("what this loop goes through", size_of(iterable))
    for item in iterable:
        if budget is not None:
            budget.step()
        yield item


INTERNAL_FILTERS = {"herald.concat": _concat, "herald.literal": _literal, "herald.counted": _counted,
                    "herald.loop": _loop_items}


# --------------------------------------------------------------------------- the environment

_PRINTABLE = (str, int, float, list, tuple, Fields, View, Undefined, date)


def _finalize(value):
    if value is None:  # a contact without a first name prints as nothing, not "None"
        return ""
    if not isinstance(value, _PRINTABLE):  # a method, a loop's context, an object's address...
        raise SecurityError(f"a {type(value).__name__} cannot be printed")
    if isinstance(value, (list, tuple)) and any(not isinstance(item, _PRINTABLE) for item in value):
        raise SecurityError("this list holds something that cannot be printed")
    _step(checked("this value", size_of(value)))
    return value


class Sandbox(ImmutableSandboxedEnvironment):
    """Lookups only into the template's views, arithmetic on numbers only, calls only to
    ``loop.cycle``; each a step of the render's budget."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
    intercepted_unops = frozenset({"+", "-"})

    def getattr(self, obj, attribute):
        return self.getitem(obj, attribute)

    def getitem(self, obj, argument):
        _step()
        if isinstance(obj, View):
            return obj.lookup(argument)
        if isinstance(obj, (Fields, dict)):
            fields = obj if isinstance(obj, Fields) else Fields(obj)
            _step(size_of(argument) + len(fields))  # a name not found as written: each field's name matched
            return fields.lookup(argument)
        if isinstance(obj, LoopContext) and argument in LOOP_ATTRS:
            return getattr(obj, argument)
        if isinstance(obj, Undefined):
            return super().getitem(obj, argument)
        if isinstance(obj, (str, list, tuple)) and isinstance(argument, int):
            try:
                return obj[argument]
            except IndexError:
                pass
        return self.undefined(obj=obj, name=argument)  # nothing else has attributes or items here

    def call_binop(self, context, operator, left, right):
        _step()
        if isinstance(left, Undefined) or isinstance(right, Undefined):
            return super().call_binop(context, operator, left, right)  # raises (or renders empty)
        _numbers_only(left, right)
        if isinstance(left, int) and isinstance(right, int):
            bits = left.bit_length() + right.bit_length() if operator == "*" else 0
            if operator == "**" and right > 0:
                bits = max(left.bit_length(), 1) * right
            if bits > MAX_INT_BITS:
                raise TemplateLimitError(f"the result would be too large (more than {MAX_INT_BITS:,} bits)")
        return super().call_binop(context, operator, left, right)

    def call_unop(self, context, operator, arg):
        _step()
        if not isinstance(arg, Undefined):
            _numbers_only(arg)
        return super().call_unop(context, operator, arg)

    def call(self, context, obj, /, *args, **kwargs):
        _step(size_of([args, kwargs]))
        if not (isinstance(getattr(obj, "__self__", None), LoopContext) and getattr(obj, "__name__", "") == "cycle"):
            raise SecurityError("calls are not available in templates")
        return super().call(context, obj, *args, **kwargs)


def make_env(autoescape: bool, filters: dict, tests: dict) -> Sandbox:
    """A sandbox with only these filters and tests (Jinja's own, by name) and no globals."""
    env = Sandbox(autoescape=autoescape, undefined=StrictUndefined, finalize=_finalize, keep_trailing_newline=True,
                  auto_reload=False, optimized=False)
    env.globals.clear()  # range, lipsum, cycler, joiner, namespace, dict: none of them is needed
    own = {"date": do_date}
    env.filters = {name: guard_filter(name, own.get(name) or env.filters[name]) for name in filters}
    env.filters.update(INTERNAL_FILTERS)
    env.tests = {name: guard_test(env.tests[name]) for name in tests}
    return env
