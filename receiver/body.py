"""JSON in: request bodies and submission files decoded as standard JSON, one way.

Python's ``json`` module reads more than JSON: ``NaN`` and ``Infinity``, numbers beyond a
double's range (as infinity), and it fails with a bare ``ValueError`` on an integer of
more digits than Python converts. Stored, the first two make a JSON column invalid
(PostgreSQL refuses it); the last would be a 500. :func:`decode_json` refuses all three
as :class:`JsonRefused`; :func:`read_json_body` reads a request's body (Flask's or
werkzeug's) with the size limit and answers with :mod:`receiver.errors`.

Reading the body can fail before any JSON is seen: gunicorn raises its own
``InvalidChunkSize`` (not an ``OSError``) for a chunked body whose chunk size is not a
number, werkzeug's development server an ``OSError``, and either one for a body cut
short. :class:`ReadableBodies`, WSGI middleware around the whole app, turns every such
failure into :class:`~receiver.errors.UnreadableBody` (400 ``unreadable_body``) wherever
the body is read: the webhook, the API, a finance form and its CSRF check alike.

The text inside is another matter: a string may hold a NUL character or an unpaired
surrogate (``"\\ud800"``), which is valid JSON but no text column takes
(:func:`venue.text.storable_text`); the code that puts a field in a column checks it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any

from gunicorn.http.errors import ParseException
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge
from werkzeug.wrappers import Request

from receiver.errors import BodyTooLarge, InvalidJson, UnreadableBody, UnsupportedMediaType
from storage.types import JsonRefused, decode_json

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

# What reading a request's stream raises when the body is broken or cut short: gunicorn's
# chunked-encoding errors are ParseExceptions; sockets and werkzeug's server raise OSError.
_UNREADABLE = (OSError, ParseException)


def read_json_body(request: Request, limit: int, *, exact_numbers: bool = False) -> Any:
    """``request``'s body, no larger than ``limit`` bytes, decoded by :func:`decode_json`.

    Raises:
        BodyTooLarge: the body is over ``limit`` (by its ``Content-Length`` before it is
            read, or while reading a chunked one).
        UnreadableBody: the body cannot be read, or ends before its ``Content-Length``.
        UnsupportedMediaType: the body is not declared as JSON.
        InvalidJson: the body is not UTF-8 standard JSON; the message says where or why.
    """
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    if not request.is_json:
        raise UnsupportedMediaType(request.mimetype)
    # Enforced while reading too: a chunked body has no Content-Length to check first.
    # werkzeug stops reading at the maximum without complaint, so allow one byte more
    # than the limit: a body that reaches it is over the limit, one that stops short is
    # whole.
    request.max_content_length = limit + 1
    try:
        data = request.get_data(cache=False)
    except RequestEntityTooLarge as exc:
        raise BodyTooLarge(limit) from exc
    except ClientDisconnected as exc:  # werkzeug's word for a body shorter than announced
        raise UnreadableBody() from exc
    if len(data) > limit:
        raise BodyTooLarge(limit)
    try:
        # UTF-8 only (RFC 8259), a leading byte order mark ignored.
        return decode_json(data.decode("utf-8-sig"), exact_numbers=exact_numbers)
    except UnicodeDecodeError as exc:
        raise InvalidJson("it is not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise InvalidJson(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise InvalidJson("it is nested too deeply") from exc
    except JsonRefused as exc:
        raise InvalidJson(str(exc)) from exc


class ReadableBodies:
    """WSGI middleware: a request body that cannot be read is a 400, wherever it is read.

    Wraps each request's ``wsgi.input`` so that a failure to read it raises
    :class:`~receiver.errors.UnreadableBody`, an HTTP exception every part of the app
    answers in its own way (JSON, or a finance page), instead of an error that becomes
    a 500. :func:`receiver.create_app` installs it around everything else.
    """

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Serve the request with its input stream guarded."""
        stream = environ.get("wsgi.input")
        if stream is not None:
            environ["wsgi.input"] = _GuardedInput(stream)
        return self.app(environ, start_response)


class _GuardedInput:
    """A WSGI input stream whose read failures are :class:`~receiver.errors.UnreadableBody`."""

    __slots__ = ("_stream",)

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        try:
            return self._stream.read(size)
        except _UNREADABLE as exc:
            raise UnreadableBody() from exc

    def readline(self, size: int = -1) -> bytes:
        try:
            return self._stream.readline(size)
        except _UNREADABLE as exc:
            raise UnreadableBody() from exc

    def readlines(self, hint: int = -1) -> list[bytes]:
        try:
            return self._stream.readlines(hint)
        except _UNREADABLE as exc:
            raise UnreadableBody() from exc

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")
