"""The finance pages under ``/finance/``: reconciliation runs, exceptions and reports.

:data:`bp` is the blueprint; :func:`init_app` sets up what it needs on the app: the
signed session cookie (HttpOnly, SameSite=Lax, Secure when ``finance_cookie_secure``),
which carries a sign-in's token and the CSRF token, never who is signed in (the
database does: :mod:`receiver.finance.signins`), CSRF protection of every POST of the
app (flask-wtf's ``CSRFProtect``; only the blueprints given as ``exempt`` — the webhook
and the JSON API, which authenticate each request themselves — are left out), and the
headers that keep the pages out of caches and frames, with a content policy that lets
them load nothing but this site's own stylesheet (no inline style or script). Sign-in
and the guard that sends every signed-out request to it live in
:mod:`receiver.finance.auth`; the pages in :mod:`receiver.finance.views`.

Finance users come from the settings (``finance_users``: names with scrypt password
hashes, never plain passwords). The cookie's key is ``settings.session_secret()``; with no
finance user configured nobody can sign in, so a throwaway key is used and no key file
is written.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterable

from flask import Blueprint, Flask, Request, Response, render_template
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from flask.typing import ResponseReturnValue
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException

from otacm.settings import Settings
from receiver.finance import auth, views

SESSION_COOKIE = "otacm_finance"

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
"""The pages' content policy: this site's stylesheet, nothing inline, never framed."""

PREFIX = "/finance"

bp = Blueprint(
    "finance",
    __name__,
    url_prefix=PREFIX,
    template_folder="templates",
    static_folder="static",
)
bp.register_blueprint(auth.bp)
bp.register_blueprint(views.bp)
bp.before_request(auth.require_user)

csrf = CSRFProtect()


@bp.after_request
def _protect_pages(response: Response) -> Response:
    # Every page but the stylesheet shows finance data or a form: never cached, never
    # framed (receiver.headers adds the headers every answer carries).
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    if not response.headers.get("Cache-Control"):
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.errorhandler(HTTPException)
def _error_page(error: HTTPException) -> ResponseReturnValue:
    # Finance reads pages, not the JSON errors the webhook and the API answer with.
    if isinstance(error, CSRFError):
        title = "The form expired"
        message = (
            "This form is no longer valid (or was not sent from this site)."
            " Reload the page and try again."
        )
    else:
        title = error.name
        message = error.description or ""
    status = error.code or 500
    return render_template("finance/error.html", title=title, message=message), status


class FinanceSessions(SecureCookieSessionInterface):
    """The signed session cookie, opened only for the finance pages.

    Nothing else (the webhook, the API, health, metrics) uses a session, and opening
    one builds the cookie's signer: work the webhook, the receiver's busiest path,
    does not need on every POST.
    """

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        """The session of a finance page; ``None`` (Flask's null session) elsewhere."""
        if request.path != PREFIX and not request.path.startswith(f"{PREFIX}/"):
            return None
        return super().open_session(app, request)


def init_app(app: Flask, settings: Settings, *, exempt: Iterable[Blueprint] = ()) -> None:
    """Register the finance pages on ``app``, with their session cookie and CSRF protection.

    Args:
        app: the receiver app.
        settings: its settings: ``finance_users``, ``session_key`` (or ``secrets_dir``,
            where a generated key is kept), ``finance_cookie_secure``,
            ``finance_session_lifetime``.
        exempt: blueprints whose POSTs carry their own authentication (a client state,
            a bearer token) and so no CSRF token.

    Raises:
        OSError: the generated session key file cannot be read or written.
    """
    if settings.finance_users or settings.session_key is not None:
        key = settings.session_secret().get_secret_value()
    else:
        key = secrets.token_urlsafe(48)
    app.config.update(
        SECRET_KEY=key,
        SESSION_COOKIE_NAME=SESSION_COOKIE,
        SESSION_COOKIE_PATH=PREFIX,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.finance_cookie_secure,
        # The database decides how long a sign-in lasts; the cookie is not renewed on
        # each request, and its signature expires with the longest sign-in anyway.
        PERMANENT_SESSION_LIFETIME=dt.timedelta(seconds=settings.finance_session_lifetime),
        SESSION_REFRESH_EACH_REQUEST=False,
        # A token lives as long as the sign-in it belongs to.
        WTF_CSRF_TIME_LIMIT=None,
    )
    app.session_interface = FinanceSessions()
    csrf.init_app(app)
    for blueprint in exempt:
        csrf.exempt(blueprint)
    app.register_blueprint(bp)
