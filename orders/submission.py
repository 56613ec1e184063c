"""What the shop sends: a sale, read and checked before anything is recorded.

A submission is the venue's order request plus the sale's own terms (``amount``,
``currency``, ``amountIncludesVat``) and, when otacm sells for several venues, the
``connection`` it is for. :func:`parse_submission` reads one into a :class:`Submission`
(refusals are :class:`SubmissionError`, naming the field by its dotted path);
:func:`read_submissions` reads a file of them (one object, an array, or JSON lines),
every entry checked before any is returned; :func:`choose_connection` and
:func:`check_connection` match a submission to a configured venue connection. Numbers
are read exactly (:func:`storage.types.decode_json`), and text no column takes is
refused here, not by the database.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from storage.flush import INTEGER_MAX
from storage.types import MONEY_MAX, JsonRefused, decode_json
from venue.connection import VenueConnection
from venue.models import OrderRequest
from venue.text import UNSTORABLE_TEXT, unstorable_text_path
from venue.values import canonical_guid

NO_CURRENCY = "XXX"
"""The ledger currency of a sale submitted without an amount: ISO 4217's "no currency"
(the amount is then 0), so finance sees that the shop did not say what it charged."""


# The top-level fields of a submission that are the sale's, not the venue's request.
_TERMS_KEYS = frozenset({"amount", "currency", "amountIncludesVat", "connection"})


class SubmissionError(ValueError):
    """A submission the shop sent cannot be accepted; nothing was recorded.

    Attributes:
        field: the path of the problem (``items[0].quantity``), ``""`` for the body.
        problem: what is wrong with it.
        code: a stable snake_case code: ``invalid_order`` or ``unknown_connection``.
    """

    def __init__(self, field: str, problem: str, *, code: str = "invalid_order") -> None:
        self.field = field
        self.problem = problem
        self.code = code
        super().__init__(f"{field or 'body'}: {problem}")


class SubmissionsRefused(SubmissionError):
    """Several entries of one file cannot be accepted; nothing was recorded.

    Attributes:
        refusals: one error per refused entry, in the file's order.
    """

    def __init__(self, refusals: list[SubmissionError]) -> None:
        first = refusals[0]
        super().__init__(first.field, first.problem, code=first.code)
        self.refusals = refusals


class _SaleTerms(BaseModel):
    """The shop's own fields of a submission, beside the venue's order request."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    amount: Decimal | None = Field(default=None, ge=0, le=MONEY_MAX, allow_inf_nan=False)
    currency: str | None = Field(default=None, pattern=r"^[A-Za-z]{3}$")
    amount_includes_vat: bool = True
    connection: str | None = Field(default=None, min_length=1)

    @field_validator("currency")
    @classmethod
    def _upper(cls, value: str | None) -> str | None:
        return None if value is None else value.upper()


class SubmissionBody(_SaleTerms, OrderRequest):
    """A submission's JSON body as one model: the venue's order request and the sale's own
    fields, for the API's document. :func:`parse_submission` reads the two parts with
    their own models (:class:`~venue.models.OrderRequest`, ``_SaleTerms``), so that the
    request is kept exactly as it will be sent."""

    model_config = ConfigDict(title="Submission")


@dataclass(frozen=True)
class Submission:
    """One order the shop submits: the venue's request and what the shop charged.

    Attributes:
        request: the createOrder body, exactly as it will be sent.
        amount: what the shop charged for the sale, if it said.
        currency: the currency of ``amount`` (ISO 4217, upper case).
        amount_includes_vat: whether ``amount`` includes VAT.
        connection: the venue connection's name, if the shop named one.
    """

    request: OrderRequest
    amount: Decimal | None = None
    currency: str | None = None
    amount_includes_vat: bool = True
    connection: str | None = None

    @property
    def reference(self) -> str:
        """The shop's order number (``sellToOrderReference``)."""
        return self.request.sell_to_order_reference


def parse_submission(raw: Any) -> Submission:
    """A submission from decoded JSON: an OrderRequest plus the sale's own fields.

    The venue's request is validated as :class:`~venue.models.OrderRequest`; beside it the
    object may carry ``amount`` (a number or a numeric string; decode JSON with
    ``parse_float=Decimal`` to keep it exact), ``currency`` (required with ``amount``),
    ``amountIncludesVat`` (default true) and ``connection`` (a connection name).

    Args:
        raw: the decoded JSON object.

    Returns:
        The submission.

    Raises:
        SubmissionError: naming the first invalid field.
    """
    if not isinstance(raw, dict):
        raise SubmissionError("", "an order must be a JSON object")
    unstorable = unstorable_text_path(raw)
    if unstorable is not None:
        raise SubmissionError(dotted_path(tuple(_path_parts(unstorable))), UNSTORABLE_TEXT)
    terms_raw = {key: value for key, value in raw.items() if key in _TERMS_KEYS}
    request_raw = {key: value for key, value in raw.items() if key not in _TERMS_KEYS}
    try:
        terms = _SaleTerms.model_validate(terms_raw)
        request = OrderRequest.model_validate(request_raw)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        raise SubmissionError(dotted_path(error["loc"]), error["msg"]) from None
    if (terms.amount is None) != (terms.currency is None):
        missing = "currency" if terms.currency is None else "amount"
        other = "amount" if missing == "currency" else "currency"
        raise SubmissionError(missing, f"required when {other} is given")
    if not request.sell_to_order_reference.strip():
        raise SubmissionError("sellToOrderReference", "must not be blank")
    if sum(item.quantity for item in request.items) > INTEGER_MAX:
        raise SubmissionError("items", f"the quantities add up to more than {INTEGER_MAX}")
    return Submission(
        request=request,
        amount=terms.amount,
        currency=terms.currency,
        amount_includes_vat=terms.amount_includes_vat,
        connection=terms.connection,
    )


def choose_connection(connections: Sequence[VenueConnection], name: str | None) -> VenueConnection:
    """The venue connection a submission names, or the only one when it names none.

    Raises:
        SubmissionError: code ``unknown_connection``: no such connection, none
            configured, or several and the submission named none.
    """
    names = [venue.name for venue in connections]
    if name is None:
        if len(names) == 1:
            return connections[0]
        problem = (
            "no venue connection is configured"
            if not names
            else f"required when several venue connections are configured ({', '.join(names)})"
        )
        raise SubmissionError("connection", problem, code="unknown_connection")
    for venue in connections:
        if venue.name == name:
            return venue
    known = ", ".join(names) or "none configured"
    raise SubmissionError(
        "connection",
        f"no venue connection named {name!r} (known: {known})",
        code="unknown_connection",
    )


def check_connection(venue: VenueConnection, request: OrderRequest) -> None:
    """Refuse a sale ``venue`` would take but otacm cannot follow, or would cut.

    The venue takes any partner of the company (ChannelMgrOrderAgent ``CreateOrder``
    checks only that the partner is set up), but otacm mirrors and reconciles only the
    configured partners' orders: a sale of another would be sent and then never followed.
    A ``paymentReference`` longer than the venue's field (the connection's
    ``payment_reference_max_chars``: 20 on the older synchronous version) would be cut.

    Raises:
        SubmissionError: naming ``partnerId`` or ``paymentReference``.
    """
    if canonical_guid(request.partner_id) not in venue.partner_ids:
        raise SubmissionError(
            "partnerId",
            f"partner {request.partner_id!r} is not configured for venue connection {venue.name!r}",
        )
    problem = payment_reference_problem(request.payment_reference, venue)
    if problem is not None:
        raise SubmissionError("paymentReference", problem)


def payment_reference_problem(reference: str | None, venue: VenueConnection) -> str | None:
    """Why ``venue`` would cut ``reference`` (its Code field trims trailing blanks), or None."""
    limit = venue.payment_reference_max_chars
    if reference is None or len(reference.rstrip()) <= limit:
        return None
    return (
        f"at most {limit} characters at venue connection {venue.name!r}: "
        "the venue would cut the rest"
    )


def replacement_body(replacement: Submission) -> dict[str, Any]:
    """The stored body of a replace: the order request, plus the sale's amount if given.

    The amount travels as a string (JSON has no decimals); :func:`parse_submission`
    reads it back exactly when the row is sent.
    """
    body = replacement.request.to_wire()
    if replacement.amount is not None and replacement.currency is not None:
        body["amount"] = str(replacement.amount)
        body["currency"] = replacement.currency
        body["amountIncludesVat"] = replacement.amount_includes_vat
    return body


def read_submissions(text: str) -> list[Submission]:
    """The submissions in a file's text: one JSON object, a JSON array, or JSON lines.

    Every entry is validated before any is returned, so a bad file records nothing.
    Numbers are decoded as ``Decimal``, so amounts stay exact.

    Raises:
        SubmissionError: the text is not JSON, or an entry is invalid; the field names
            the entry (``[2].items[0].quantity``, ``line 3: amount``); when several
            entries are invalid, :class:`SubmissionsRefused` lists each one.
    """
    try:
        decoded: Any = decode_json(text, exact_numbers=True)
    except (JsonRefused, RecursionError) as refused:
        raise SubmissionError("", f"not valid JSON: {_refusal(refused)}") from None
    except json.JSONDecodeError as whole:
        if whole.msg != "Extra data":
            raise SubmissionError(
                "", f"not valid JSON: {whole.msg} at line {whole.lineno} column {whole.colno}"
            ) from None
        # Several values one after the other: JSON lines, one object per line.
        entries: list[tuple[str, Any]] = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append((f"line {number}: ", decode_json(line, exact_numbers=True)))
            except json.JSONDecodeError as exc:
                raise SubmissionError(
                    f"line {number}", f"not valid JSON: {exc.msg} at column {exc.colno}"
                ) from None
            except (JsonRefused, RecursionError) as refused:
                raise SubmissionError(
                    f"line {number}", f"not valid JSON: {_refusal(refused)}"
                ) from None
    else:
        if isinstance(decoded, list):
            entries = [(f"[{index}].", entry) for index, entry in enumerate(decoded)]
        else:
            entries = [("", decoded)]
    if not entries:
        raise SubmissionError("", "no orders in the file")
    submissions = []
    refusals = []
    for where, entry in entries:
        try:
            submissions.append(parse_submission(entry))
        except SubmissionError as exc:
            field = f"{where}{exc.field}".rstrip(". :")
            refusals.append(SubmissionError(field, exc.problem, code=exc.code))
    if len(refusals) == 1:
        raise refusals[0]
    if refusals:
        raise SubmissionsRefused(refusals)
    return submissions


def _refusal(exc: JsonRefused | RecursionError) -> str:
    return "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def _path_parts(dotted: str) -> Iterator[int | str]:
    """The parts of a dotted path (``items.0.itemNumber``), list indexes as numbers."""
    for part in dotted.split("."):
        yield int(part) if part.isdigit() else part


def dotted_path(loc: tuple[int | str, ...]) -> str:
    """A field's path as the partner wrote it: ``items[0].visitTime``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f"{'.' if path else ''}{part}"
    return path
