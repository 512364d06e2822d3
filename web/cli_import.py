"""The import-contacts admin command."""


def register(app):
    pass
