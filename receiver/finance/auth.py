"""Who may see the finance pages: sign-in, sign-out, and the guard in front of every page.

Users and their scrypt password hashes come from the settings
(:meth:`~otacm.settings.Settings.finance_password_hashes`). A sign-in is a row in the
database (:mod:`receiver.finance.signins`); the signed session cookie carries only its
random token (and the form's CSRF token), so signing out ends it for every copy of the
cookie, as do its absolute lifetime, an idle time, a changed password hash and a user
removed from the settings. :func:`require_user` runs before every request to
``/finance/``: anything but the sign-in page and the stylesheet, signed out, is answered
with a redirect to the sign-in page (``?next=`` the page asked for), never with data.

Only a POST signs in (a HEAD, which Flask routes to the same view as a GET, shows the
form like a GET). Wrong passwords are throttled per user name and per address
(:mod:`receiver.finance.throttle`): past the limit, the answer is 429 with
``Retry-After``, whichever the name. The password check takes as long for an unknown
user as for a wrong password (a hash is checked either way), and the message does not
say which it was.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import math

from flask import (
    Blueprint,
    g,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue
from pydantic import SecretStr
from werkzeug.security import check_password_hash, generate_password_hash

from otacm.settings import Settings
from receiver.context import current_receiver
from receiver.finance import signins, throttle
from storage.types import utcnow

logger = logging.getLogger(__name__)

SESSION_SIGN_IN = "finance_sign_in"
"""The session cookie's key for the sign-in's token (:mod:`receiver.finance.signins`)."""
PUBLIC_ENDPOINTS = frozenset({"finance.auth.sign_in", "finance.static"})
"""The only finance endpoints a signed-out request reaches."""
SIGN_IN_FAILED = "Unknown user name or wrong password."
SIGN_IN_THROTTLED = "Too many failed sign-ins. Try again in {wait}."

bp = Blueprint("auth", __name__)


def hash_password(password: str) -> str:
    """A password's hash for the ``finance_users`` setting (scrypt, salted)."""
    return generate_password_hash(password, method="scrypt")


@functools.cache
def _decoy_hash() -> str:
    # Checked against when the user name is unknown, so that case costs a hash check too.
    return hash_password("no user has this password")


def authenticate(users: dict[str, SecretStr], name: str, password: str) -> str | None:
    """The user name, if ``password`` is that user's; ``None`` otherwise.

    Args:
        users: password hashes by user name.
        name: the name typed in.
        password: the password typed in.
    """
    stored = users.get(name)
    password_hash = stored.get_secret_value() if stored is not None else _decoy_hash()
    valid = check_password_hash(password_hash, password)
    return name if valid and stored is not None else None


def lifetimes(settings: Settings) -> signins.Lifetimes:
    """How long a sign-in lasts, from the settings."""
    return signins.Lifetimes(
        absolute=dt.timedelta(seconds=settings.finance_session_lifetime),
        idle=dt.timedelta(seconds=settings.finance_session_idle_timeout),
    )


def limits(settings: Settings) -> throttle.Limits:
    """The sign-in throttle's rule, from the settings."""
    return throttle.Limits(
        window=dt.timedelta(seconds=settings.finance_sign_in_window),
        per_user=settings.finance_sign_in_user_failures,
        per_address=settings.finance_sign_in_address_failures,
    )


def current_user() -> str | None:
    """The signed-in finance user's name, if their sign-in has not ended."""
    token = session.get(SESSION_SIGN_IN)
    if not isinstance(token, str):
        return None
    receiver = current_receiver()
    settings = receiver.settings
    now = utcnow()
    with receiver.read_sessions.begin() as db:
        found = signins.signed_in_user(
            db,
            token,
            settings.finance_password_hashes(),
            now=now,
            idle=lifetimes(settings).idle,
        )
    if found is None:
        return None
    if found.touch:
        with receiver.sessions.begin() as db:
            signins.touch(db, token, now=now)
    return found.user


def require_user() -> ResponseReturnValue | None:
    """Before every finance request: the signed-in user in ``g.user``, or the sign-in page."""
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    user = current_user()
    if user is None:
        return redirect(url_for("finance.auth.sign_in", next=request.full_path.rstrip("?")))
    g.user = user
    return None


def _safe_next(target: str | None) -> str:
    """Where to go after signing in: a finance page of this site, nothing else.

    Printable text only: a CR or LF would split the ``Location`` header, and browsers
    drop tabs and line breaks from a URL before reading it.
    """
    if (
        target
        and target.startswith("/finance/")
        and not target.startswith("//")
        and "\\" not in target
        and target.isprintable()
    ):
        return target
    return url_for("finance.views.runs")


@bp.route("/sign-in", methods=["GET", "POST"])
def sign_in() -> ResponseReturnValue:
    """The sign-in form; on a good password, the page asked for."""
    users = current_receiver().settings.finance_password_hashes()
    target = request.values.get("next")
    # Only a POST signs in, and only a POST carries a checked CSRF token: Flask routes a
    # HEAD here too, and it must show the form as a GET does, whatever body it carries.
    if request.method != "POST":
        if current_user() is not None:
            return redirect(_safe_next(target))
        return render_template("finance/sign_in.html", users=bool(users), next=target)
    return _check_sign_in(users, target)


def _check_sign_in(users: dict[str, SecretStr], target: str | None) -> ResponseReturnValue:
    """A sign-in form's POST: throttled, then checked; a new sign-in when it is right."""
    receiver = current_receiver()
    rule = limits(receiver.settings)
    name = request.form.get("name", "").strip()
    password = request.form.get("password", "")
    address = request.remote_addr
    with receiver.read_sessions.begin() as db:
        wait = throttle.retry_after(db, name=name, address=address, now=utcnow(), limits=rule)
    if wait is not None:
        logger.warning("finance sign-in throttled from %s", address)
        page = render_template(
            "finance/sign_in.html",
            users=bool(users),
            next=target,
            name=name,
            error=SIGN_IN_THROTTLED.format(wait=_duration(wait)),
        )
        response = make_response(page, 429)
        response.headers["Retry-After"] = str(wait)
        return response
    user = authenticate(users, name, password) if users else None
    now = utcnow()
    token = None  # the new sign-in's, when the password is right
    with receiver.sessions.begin() as db:
        throttle.record(
            db, name=name, address=address, ok=user is not None, now=now, window=rule.window
        )
        if user is not None:
            token = signins.start(
                db, user, users[user], now=now, lifetimes=lifetimes(receiver.settings)
            )
    if token is None:
        logger.warning("finance sign-in refused from %s", address)
        return (
            render_template(
                "finance/sign_in.html",
                users=bool(users),
                next=target,
                name=name,
                error=SIGN_IN_FAILED,
            ),
            401,
        )
    # A new session for the new sign-in: nothing from before it carries over.
    session.clear()
    session[SESSION_SIGN_IN] = token
    session.permanent = True
    logger.info("finance user signed in")
    return redirect(_safe_next(target))


def _duration(seconds: int) -> str:
    """A wait for people: seconds under two minutes, whole minutes (rounded up) beyond."""
    if seconds < 120:
        return f"{seconds} seconds"
    return f"{math.ceil(seconds / 60)} minutes"


@bp.route("/sign-out", methods=["POST"])
def sign_out() -> ResponseReturnValue:
    """End the sign-in, for this cookie and every copy of it."""
    token = session.get(SESSION_SIGN_IN)
    if isinstance(token, str):
        with current_receiver().sessions.begin() as db:
            signins.revoke(db, token, now=utcnow())
    session.clear()
    return redirect(url_for("finance.auth.sign_in"))
