"""What the API's response schemas are built from: ``Out`` (a response object: every field is
always sent, so the document lists every field as required) and the field types they share.

The ``*Out`` schemas are the serializers: handlers answer ``SomeOut().dump(obj)``, and the
OpenAPI document is generated from the same classes, so the two cannot drift apart.
"""

from __future__ import annotations

import copy
from datetime import datetime

from marshmallow import Schema, fields

from ..params import iso


class Out(Schema):
    """A response object. ``dump`` writes every declared field, so each is documented as required
    (and the document's objects are closed: marshmallow's ``unknown`` is RAISE)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for field in self.fields.values():
            field.required = True


class Timestamp(fields.String):
    """A naive UTC datetime as ISO 8601 with a ``Z``: whole seconds, or as stored (``seconds=False``,
    the message log's microseconds)."""

    def __init__(self, *, seconds: bool = True, **kwargs):
        kwargs["metadata"] = {"format": "date-time", **kwargs.get("metadata", {})}
        super().__init__(**kwargs)
        self.timespec = "seconds" if seconds else "auto"

    def _serialize(self, value: datetime | None, attr, obj, **kwargs):
        return iso(value, self.timespec)


class _NoneAs:
    """A column stored as NULL that means a default: it is sent as that default."""

    def __init__(self, *args, none_as, **kwargs):
        super().__init__(*args, **kwargs)
        self.none_as = none_as

    def serialize(self, attr, obj, accessor=None, **kwargs):
        if self.get_value(obj, attr, accessor=accessor) is None:
            return copy.deepcopy(self.none_as)
        return super().serialize(attr, obj, accessor=accessor, **kwargs)


class DictOr(_NoneAs, fields.Dict):
    pass


class NestedOr(_NoneAs, fields.Nested):
    pass


class ListOr(_NoneAs, fields.List):
    pass


def page_of(item: type[Schema], name: str) -> type[Out]:
    """The schema of a keyset page of ``item``: ``{"items": [...], "next_cursor": str | null}``."""
    return type(name, (Out,), {
        "items": fields.List(fields.Nested(item)),
        "next_cursor": fields.String(allow_none=True, metadata={"description": "pass as ?cursor= for the next page"}),
    })


class Rounded(fields.Float):
    """A float sent rounded to ``places`` decimals."""

    def __init__(self, *, places: int, **kwargs):
        super().__init__(**kwargs)
        self.places = places

    def _serialize(self, value, attr, obj, **kwargs):
        return None if value is None else round(float(value), self.places)


class With:
    """``obj`` seen with extra attributes: what a response adds to a row (its stats, a count)."""

    def __init__(self, obj, **extra):
        self._obj = obj
        self.__dict__.update(extra)

    def __getattr__(self, name):
        return getattr(self._obj, name)
