"""How the client reads the venue's answers into :mod:`venue.models`, or refuses them.

:func:`read_answer` parses a body as its model and :func:`read_page` a list body (a page
envelope, ``{"value": [...]}`` or a bare array); a body that does not parse is a
:class:`~venue.errors.VenueProtocolError` naming the fields at fault, never their values
(they may be personal), and so is text no database column takes (:mod:`venue.text`),
found here rather than when the mirror stores it. :func:`read_error_body` takes the
venue's ``code`` and ``message`` from an error answer.
"""

from __future__ import annotations

from typing import Any, TypeVar

import httpx
import pydantic_core
from pydantic import BaseModel, ValidationError

from venue.errors import VenueProtocolError
from venue.models import ErrorBody, Page, describe_validation_problem, parse_page
from venue.text import UNSTORABLE_TEXT, unstorable_text_path

ModelT = TypeVar("ModelT", bound=BaseModel)

_NUL_ESCAPE = b"\\u0000"


def read_error_body(response: httpx.Response) -> tuple[str | None, str | None]:
    """The venue's ``code`` and ``message``, when the error body has them."""
    try:
        body = ErrorBody.model_validate_json(response.content)
    except ValidationError:
        return None, None
    return (
        body.code if "code" in body.model_fields_set else None,
        body.message if "message" in body.model_fields_set else None,
    )


def read_answer(method: str, path: str, response: httpx.Response, model: type[ModelT]) -> ModelT:
    """The body as ``model``, or :class:`VenueProtocolError` naming the bad fields."""
    try:
        parsed = model.model_validate_json(response.content)
    except ValidationError as exc:
        raise _protocol_error(method, path, response, model, exc) from exc
    _refuse_unstorable_text(method, path, response, model)
    return parsed


def read_page(
    path: str, response: httpx.Response, model: type[ModelT], *, skip_unreadable: bool
) -> Page[ModelT]:
    """A list body (page envelope, ``{"value": [...]}`` or bare array) of ``model``.

    With ``skip_unreadable``, a row with text the mirror cannot store is unreadable
    like one that does not parse, rather than failing the whole page.
    """
    row_check = None
    if skip_unreadable and _NUL_ESCAPE in response.content:
        row_check = _unstorable_row_problem
    try:
        page = parse_page(
            response.content, model, skip_unreadable=skip_unreadable, row_check=row_check
        )
    except ValueError as exc:  # bad JSON or a ValidationError
        raise _protocol_error("GET", path, response, model, exc) from exc
    if not skip_unreadable:
        _refuse_unstorable_text("GET", path, response, model)
    return page


def _protocol_error(
    method: str, path: str, response: httpx.Response, model: type[BaseModel], exc: ValueError
) -> VenueProtocolError:
    """Name what was wrong without echoing the body: input values may be personal."""
    detail = describe_validation_problem(exc) if isinstance(exc, ValidationError) else "not JSON"
    return VenueProtocolError(
        method,
        path,
        status=response.status_code,
        reason=f"body does not parse as {model.__name__}: {detail}",
    )


def _refuse_unstorable_text(
    method: str, path: str, response: httpx.Response, model: type[BaseModel]
) -> None:
    """Refuse a body with text the mirror cannot store, naming where, on both databases.

    JSON allows a NUL only as the ``\\u0000`` escape (the parser refuses a raw one, and
    unpaired surrogates), so bodies without that escape, nearly all, skip the walk.
    """
    if _NUL_ESCAPE not in response.content:
        return
    where = unstorable_text_path(pydantic_core.from_json(response.content))
    if where is not None:
        raise VenueProtocolError(
            method,
            path,
            status=response.status_code,
            reason=f"{model.__name__} body: {where or 'body'}: expected {UNSTORABLE_TEXT}",
        )


def _unstorable_row_problem(row: Any) -> str | None:
    """Where one list row holds text the mirror cannot store, or ``None``."""
    where = unstorable_text_path(row)
    return None if where is None else f"{where or 'row'}: expected {UNSTORABLE_TEXT}"
