"""Who may see the finance pages: sign-in, sign-out, and the guard in front of every page.

Users and their scrypt password hashes come from the settings
(:meth:`~otacm.settings.Settings.finance_password_hashes`). A signed-in user's name is
kept in the signed session cookie; a user removed from the settings is signed out at
their next request. :func:`require_user` runs before every request to ``/finance/``:
anything but the sign-in page and the stylesheet, signed out, is answered with a
redirect to the sign-in page (``?next=`` the page asked for), never with data.

The password check takes as long for an unknown user as for a wrong password (a hash
is checked either way), and the message does not say which it was.
"""

from __future__ import annotations

import functools
import logging

from flask import (
    Blueprint,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue
from pydantic import SecretStr
from werkzeug.security import check_password_hash, generate_password_hash

from receiver.context import current_receiver

logger = logging.getLogger(__name__)

SESSION_USER = "finance_user"
PUBLIC_ENDPOINTS = frozenset({"finance.auth.sign_in", "finance.static"})
"""The only finance endpoints a signed-out request reaches."""
SIGN_IN_FAILED = "Unknown user name or wrong password."

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


def current_user() -> str | None:
    """The signed-in finance user's name, if they are still a configured user."""
    name = session.get(SESSION_USER)
    if not isinstance(name, str):
        return None
    if name not in current_receiver().settings.finance_password_hashes():
        return None
    return name


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
    if request.method == "GET":
        if current_user() is not None:
            return redirect(_safe_next(target))
        return render_template("finance/sign_in.html", users=bool(users), next=target)
    name = request.form.get("name", "").strip()
    password = request.form.get("password", "")
    user = authenticate(users, name, password) if users else None
    if user is None:
        logger.warning("finance sign-in refused from %s", request.remote_addr)
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
    session[SESSION_USER] = user
    session.permanent = True
    logger.info("finance user signed in")
    return redirect(_safe_next(target))


@bp.route("/sign-out", methods=["POST"])
def sign_out() -> ResponseReturnValue:
    """Forget the sign-in."""
    session.clear()
    return redirect(url_for("finance.auth.sign_in"))
