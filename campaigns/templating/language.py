"""The template language: the part of Jinja a step template may use, checked on save.

``problems(ast)`` walks Jinja's parsed tree with allow-lists (statements and expressions in
``ALLOWED_NODES``, ``FILTERS``, ``TESTS``, the names and attributes of ``views.VARIABLES``) and
names everything else with its line. ``prepare(ast)`` rewrites an accepted tree so that what
Jinja's generated code would run directly (``~``, comparisons, list literals, ``if`` tests,
``set`` values, loop items) goes through the sandbox's budget (``sandbox.INTERNAL_FILTERS``).
The language for users: docs/templates.md.
"""

from __future__ import annotations

from jinja2 import TemplateSyntaxError, meta, nodes
from jinja2.visitor import NodeTransformer

from .sandbox import LOOP_ATTRS
from .views import ALLOWED_HINT, ANY, VARIABLES, unknown_attribute_message

FILTERS = ("default", "d", "upper", "lower", "title", "capitalize", "trim", "truncate", "replace", "join", "length",
           "count", "first", "last", "round", "int", "float", "abs", "string", "escape", "e", "date")
TESTS = ("defined", "undefined", "none", "true", "false", "boolean", "number", "integer", "float", "string",
         "even", "odd", "divisibleby", "eq", "equalto", "==", "ne", "!=", "lt", "<", "le", "<=", "gt", ">",
         "ge", ">=", "in", "lower", "upper", "iterable", "sequence", "mapping")

ALLOWED_NODES = (
    nodes.Template, nodes.Output, nodes.TemplateData, nodes.If, nodes.For, nodes.Assign, nodes.With,
    nodes.Const, nodes.Name, nodes.Getattr, nodes.Getitem, nodes.Filter, nodes.Test, nodes.Keyword,
    nodes.Compare, nodes.Operand, nodes.Concat, nodes.And, nodes.Or, nodes.Not, nodes.Neg, nodes.Pos,
    nodes.BinExpr, nodes.CondExpr, nodes.List, nodes.Tuple, nodes.Call,
    nodes.Scope,  # only made by the parser around {% autoescape %}, refused itself
)
# What a refused statement is called in its message.
STATEMENTS = {
    nodes.Extends: "{% extends %}", nodes.Include: "{% include %}", nodes.Import: "{% import %}",
    nodes.FromImport: "{% from ... import %}", nodes.Macro: "{% macro %}", nodes.CallBlock: "{% call %}",
    nodes.FilterBlock: "{% filter %} blocks", nodes.AssignBlock: "{% set %} blocks (set x = value instead)",
    nodes.Block: "{% block %}", nodes.ScopedEvalContextModifier: "{% autoescape %}",
    nodes.Slice: "slices ([1:3]; use |truncate, |first or |last)", nodes.Dict: "dict literals",
}
UNDERSCORE_MESSAGE = "names starting with an underscore are not allowed"
TEXT_ARITHMETIC = "arithmetic works on numbers only (join text with ~)"
_RESERVED = (*VARIABLES, "loop")
_TEXT_NODES = (nodes.TemplateData, nodes.Concat, nodes.List, nodes.Tuple)


def _underscore(value) -> bool:
    """A constant used as a name (``contact['__class__']``) or a path (``'a._b'``)."""
    return isinstance(value, str) and (value.startswith("_") or "._" in value)


def _key(node):
    """The constant name a Getattr or Getitem looks up, else None."""
    if isinstance(node, nodes.Getattr):
        return node.attr
    return node.arg.value if isinstance(node.arg, nodes.Const) else None


def _path(node) -> list | None:
    """``contact.fields.x`` as ``["contact", "fields", "x"]``; None if not a constant path."""
    keys = []
    while isinstance(node, (nodes.Getattr, nodes.Getitem)):
        key = _key(node)
        if key is None:
            return None
        keys.append(key)
        node = node.node
    return [node.name, *reversed(keys)] if isinstance(node, nodes.Name) else None


def _member_problem(node, assigned: set) -> str | None:
    key = _key(node)
    if _underscore(key):
        return f"'{key}': {UNDERSCORE_MESSAGE}"
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
        return None  # refused as a slice
    holder = node.node
    if not isinstance(holder, (nodes.Name, nodes.Getattr, nodes.Getitem)) and not (
            isinstance(node, nodes.Getitem) and isinstance(holder, (nodes.List, nodes.Tuple))):
        return "only variables have attributes (use filters: x|upper, not x.upper())"
    path = _path(node)
    if path is None or path[0] in assigned:
        return None  # looked at when rendering
    if path[0] == "loop":
        return None if len(path) == 2 and path[1] in LOOP_ATTRS else f"unknown variable 'loop.{path[1]}'"
    spec = VARIABLES.get(path[0])
    for depth, name in enumerate(path[1:], 1):
        if spec == ANY:
            return None
        if spec is None:
            return f"unknown variable '{'.'.join(map(str, path[:depth + 1]))}' ({'.'.join(path[:depth])} has no " \
                   "attributes)"
        if name not in spec:
            return unknown_attribute_message(path[0], name)
        spec = spec[name]
    return None


def _node_problem(node, assigned: set) -> str | None:
    if type(node) in STATEMENTS:
        what = STATEMENTS[type(node)]
        return f"{what} {'are' if what.split(' (')[0].endswith('s') else 'is'} not available in step templates"
    if not isinstance(node, ALLOWED_NODES):
        return f"this construct ({type(node).__name__}) is not available in step templates"
    if isinstance(node, (nodes.Getattr, nodes.Getitem)):
        return _member_problem(node, assigned)
    if isinstance(node, (nodes.Filter, nodes.Test)):
        names, what = (FILTERS, "filter") if isinstance(node, nodes.Filter) else (TESTS, "test")
        if node.name not in names:
            return f"unknown {what} '{node.name}' ({what}s: {', '.join(n for n in names if n.isalpha())})"
        if node.dyn_args or node.dyn_kwargs:
            return f"*args and **kwargs are not available in a {what}"
        for arg in [*node.args, *(kw.value for kw in node.kwargs)]:
            if isinstance(arg, nodes.Const) and _underscore(arg.value):
                return f"'{arg.value}': {UNDERSCORE_MESSAGE}"
    if isinstance(node, nodes.Call):
        callee = node.node
        if not (isinstance(callee, nodes.Getattr) and callee.attr == "cycle" and isinstance(callee.node, nodes.Name)
                and callee.node.name == "loop") or node.dyn_args or node.dyn_kwargs:
            return "calls are not available in templates (use filters: x|upper, not x.upper()); only loop.cycle(...)"
    if isinstance(node, nodes.BinExpr):
        for side in (node.left, node.right):
            if isinstance(side, _TEXT_NODES) or (isinstance(side, nodes.Const) and isinstance(side.value, str)):
                return TEXT_ARITHMETIC
    if isinstance(node, nodes.For) and node.recursive:
        return "recursive loops are not available in step templates"
    return None


MAX_TOKENS = 10_000  # names, operators, literals... in one template's tags (compiling costs ~0.1 ms each)


def too_complex(env, source: str) -> str | None:
    """Refused before parsing: parsing and compiling cost CPU in proportion to the tags' tokens
    (the text around the tags costs next to nothing). Lexes at most MAX_TOKENS + 1 tokens."""
    count = 0
    for _, kind, _ in env.lex(source):
        if kind not in ("data", "whitespace"):
            count += 1
            if count > MAX_TOKENS:
                return f"the template is too complex (more than {MAX_TOKENS:,} names, operators and values in its tags)"
    return None


def problems(ast: nodes.Template) -> list[tuple[int, str]]:
    """``[(line, message)]`` for what a template may not use, in line order."""
    found: list[tuple[int, str]] = []
    assigned = set()
    for node in ast.find_all(nodes.Name):
        if node.ctx in ("store", "param"):
            if node.name in _RESERVED:
                found.append((node.lineno, f"'{node.name}' cannot be assigned (it is one of the template's names)"))
            assigned.add(node.name)
    try:
        undeclared = set(meta.find_undeclared_variables(ast)) - set(VARIABLES)
    except TemplateSyntaxError:  # Jinja's compiler refusing an unknown filter or test: named below
        loaded = {node.name for node in ast.find_all(nodes.Name) if node.ctx == "load"}
        undeclared = loaded - assigned - set(_RESERVED)
    for node in ast.find_all(nodes.Name):
        if node.ctx == "load" and node.name in undeclared:
            undeclared.discard(node.name)
            found.append((node.lineno, f"unknown variable '{node.name}' ({ALLOWED_HINT})"))
    for node in ast.find_all(nodes.Node):
        problem = _node_problem(node, assigned)
        if problem:
            found.append((node.lineno or 1, problem))
    return sorted(found, key=lambda p: p[0])


class _Prepare(NodeTransformer):
    """Route the steps Jinja's generated code runs directly through the budget: every statement
    a loop can repeat (an output, an ``if``, a ``set``, a ``with``, an item) is at least one step."""

    @staticmethod
    def _through(name: str, node) -> nodes.Filter:
        wrapped = nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)
        return wrapped.set_environment(node.environment) if node.environment else wrapped

    def visit_Concat(self, node):
        parts = [self.visit(part) for part in node.nodes]
        return self._through("herald.concat", nodes.List(parts, lineno=node.lineno))

    def visit_Compare(self, node):
        return self._through("herald.counted", self.generic_visit(node))

    def visit_List(self, node):
        return self._through("herald.literal", self.generic_visit(node))

    def visit_Tuple(self, node):
        node = self.generic_visit(node)
        return self._through("herald.literal", node) if node.ctx == "load" else node

    def visit_If(self, node):
        node = self.generic_visit(node)
        node.test = self._through("herald.counted", node.test)
        return node

    def visit_Assign(self, node):
        node = self.generic_visit(node)
        node.node = self._through("herald.counted", node.node)
        return node

    def visit_With(self, node):
        node = self.generic_visit(node)
        node.values = [self._through("herald.counted", value) for value in node.values]
        return node

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = self._through("herald.loop", node.iter)
        return node


def prepare(ast: nodes.Template) -> nodes.Template:
    """The accepted tree, rewritten for the budget (see ``_Prepare``); changes ``ast``."""
    return _Prepare().visit(ast)
