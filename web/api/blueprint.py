"""The API's blueprint: authentication (Bearer key or the UI session, CSRF for the latter) and
reading a JSON body. The route modules import ``bp`` from here; ``web.api`` imports them."""

from __future__ import annotations

from flask import Blueprint, current_app, g, request
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import RequestURITooLarge

from campaigns.errors import BadRequest, HeraldError

from ..auth import api_workspace
from ..errors import error_response

bp = Blueprint("api", __name__, url_prefix="/api/v1")

PUBLIC_ENDPOINTS = {"api.openapi"}
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}
# The longest URL (path and query string, as sent) the API reads. gunicorn's limit_request_line
# is above it (gunicorn.conf.py), so a longer URL gets this JSON 414, not gunicorn's HTML page.
MAX_URL_BYTES = 4096


class UnsupportedMediaType(HeraldError):
    code = "unsupported_media_type"
    status = 415


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


@bp.before_request
def _url_length():  # first: before authentication
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI") or request.full_path
    if len(raw) > MAX_URL_BYTES:
        raise RequestURITooLarge(f"the URL is {len(raw):,} bytes long; the API reads URLs of up to "
                                 f"{MAX_URL_BYTES:,} bytes (path and query string)")


@bp.before_request
def _authenticate():
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    workspace_id, how = api_workspace()
    if workspace_id is None:
        return error_response(401, "unauthorized", "sign in, or send Authorization: Bearer <api key>")
    if how == "session" and request.method in UNSAFE:
        try:
            current_app.extensions["csrf"].protect()  # the app's CSRFProtect (web.csrf)
        except CSRFError as exc:
            return error_response(400, "csrf_failed", exc.description)
    g.workspace_id = workspace_id
    return None


def json_body() -> dict:
    """The request's JSON object, or a 400 that says what is wrong with it (a 415 when the body
    came as another media type: text/plain, XML...)."""
    if not request.data:
        if request.mimetype and request.mimetype != "application/json":
            # curl -d without a Content-Type sends a form: Werkzeug parses it as one, no body is left
            raise BadRequest(f"the request needs a JSON body sent as Content-Type: application/json "
                             f"(this one came as {request.mimetype[:100]})")
        raise BadRequest("the request needs a JSON body")
    if request.mimetype and not _is_json(request.mimetype):
        raise UnsupportedMediaType(f"send the body as JSON with Content-Type: application/json "
                                   f"(this one came as {request.mimetype[:100]})")
    try:
        data = request.get_json(silent=True, force=True)
    except RecursionError:  # absurdly nested JSON
        raise BadRequest("the request body is nested too deeply") from None
    if data is None:
        raise BadRequest("the request body is not valid JSON")
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return data
