"""Herald's tasks: thin wrappers that take ids and call ``campaigns``."""

from . import imports  # noqa: F401
