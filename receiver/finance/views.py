"""The finance pages: runs, a run's report, an exception with its order's story.

- ``/finance/``: the reconciliation runs, newest first (connection, period, trigger,
  state, how many exceptions each found);
- ``/finance/runs/<id>``: a run's totals per currency and category with their chart, the
  exceptions it saw (filtered by category, state, aging bucket, currency, and a reference
  search) and those it closed, and the report's downloads (every format of
  :data:`reconciler.report_formats.REPORT_FORMATS`, at ``/finance/runs/<id>/report.<format>``);
- ``/finance/exceptions/<id>``: one exception, its history (who did what, when, with
  which note), the sale's ledger line and the venue order's full story
  (:func:`orders.story.order_story`: lines, wallets, every status change and where it
  came from), and the forms to resolve or accept it with a note, recorded under the
  signed-in user's name.

Pages read through the app's read-only sessions; resolving writes in a transaction of
its own. Customer names and e-mails are never shown: references identify an order.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from flask import (
    Blueprint,
    Response,
    abort,
    flash,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.typing import ResponseReturnValue
from markupsafe import Markup
from sqlalchemy.orm import Session
from werkzeug.datastructures import MultiDict

from orders.story import order_story
from receiver.context import current_receiver
from reconciler import report_formats
from reconciler.categories import Category
from reconciler.exceptions import (
    ExceptionNotFound,
    ExceptionNotOpen,
    NoteRequired,
    TextRefused,
    accept,
    list_runs,
    resolve,
)
from reconciler.report import (
    AGING_BUCKETS,
    ExceptionRow,
    RunNotFound,
    RunReport,
    TotalRow,
    aging_bucket,
    load_run_report,
)
from reconciler.report_formats import REPORT_FORMATS, money_text, render_report
from storage.models import LedgerLine, VenueConnection, VenueOrder
from storage.records import ReconException, ReconTotal
from storage.types import ID_MAX, utcnow

bp = Blueprint("views", __name__)


@bp.app_template_filter("money")
def _money(amount: Decimal | None, currency: str | None = None) -> str:
    """An amount with its currency's decimals and thousands separators; "" for none."""
    if amount is None:
        return ""
    text = money_text(amount, currency)
    places = len(text.partition(".")[2])
    return f"{Decimal(text):,.{places}f}"


@bp.app_template_filter("category_label")
def _category_label(value: str) -> str:
    """A category's label, from its value."""
    return _category(value).label


@bp.app_template_filter("utc")
def _utc(value: dt.datetime | None) -> str:
    """A time as finance reads it, in UTC."""
    return "" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


REVIEW_ACTIONS = {"resolve": resolve, "accept": accept}
"""What a person can do with an exception from its page, by the form's ``action``."""
EXCEPTION_CATEGORIES = [category.value for category in Category if category.is_exception]


@dataclass(frozen=True)
class ExceptionFilter:
    """The filters of a run's exception list, as the query string gives them.

    An empty field does not filter. ``search`` matches any part of the shop reference,
    the venue's orderId or document number, or the subject key, in any case.
    """

    category: str = ""
    state: str = ""
    aging: str = ""
    currency: str = ""
    search: str = ""

    @classmethod
    def from_args(cls, args: MultiDict[str, str]) -> ExceptionFilter:
        """The filter the query string ``args`` asks for."""
        return cls(
            category=args.get("category", "").strip(),
            state=args.get("state", "").strip(),
            aging=args.get("aging", "").strip(),
            currency=args.get("currency", "").strip().upper(),
            search=args.get("q", "").strip(),
        )

    @property
    def active(self) -> bool:
        """Whether any filter is set."""
        return any((self.category, self.state, self.aging, self.currency, self.search))

    def matches(self, row: ExceptionRow) -> bool:
        """Whether ``row`` passes every filter set."""
        if self.category and row.category.value != self.category:
            return False
        if self.state and row.state != self.state:
            return False
        if self.aging and row.aging_bucket != self.aging:
            return False
        if self.currency and (row.currency or "") != self.currency:
            return False
        if self.search:
            wanted = self.search.casefold()
            haystack = (
                row.shop_reference,
                row.order_id,
                row.buy_from_order_reference,
                row.subject_key,
            )
            if not any(wanted in value.casefold() for value in haystack if value):
                return False
        return True


@bp.route("/")
def runs() -> ResponseReturnValue:
    """The reconciliation runs, newest first; ``?connection=`` keeps one connection's."""
    receiver = current_receiver()
    wanted = request.args.get("connection", "").strip()
    with receiver.read_sessions.begin() as session:
        names = dict(session.execute(sa.select(VenueConnection.id, VenueConnection.name)).all())
        connection_id = next((id_ for id_, name in names.items() if name == wanted), None)
        if wanted and connection_id is None:
            found = []
        else:
            found = list_runs(session, connection_id=connection_id, limit=100)
        counts = _exception_counts(session, [run.id for run in found])
        rows = [
            {
                "run": run,
                "connection": names.get(run.connection_id, "?"),
                "exceptions": counts.get(run.id, 0),
            }
            for run in found
        ]
    return render_template(
        "finance/runs.html", rows=rows, connections=sorted(names.values()), connection=wanted
    )


@bp.route("/runs/<int:run_id>")
def run(run_id: int) -> ResponseReturnValue:
    """A run's summary, its exceptions (filtered) and the ones it closed."""
    report = _run_report(run_id)
    chosen = ExceptionFilter.from_args(request.args)
    shown = [row for row in report.exceptions if chosen.matches(row)]
    return render_template(
        "finance/run.html",
        report=report,
        totals=_totals_by_currency(report.totals),
        chart=_chart(report),
        filter=chosen,
        shown=shown,
        options=_filter_options(report.exceptions),
        formats=list(REPORT_FORMATS),
    )


@bp.route("/runs/<int:run_id>/report.<fmt>")
def download(run_id: int, fmt: str) -> Response:
    """The run's report as a file, in one of :data:`REPORT_FORMATS`."""
    if fmt not in REPORT_FORMATS:
        abort(404, description=f"Reports come as {', '.join(REPORT_FORMATS)}.")
    report = _run_report(run_id)
    body = render_report(report, fmt)
    response = Response(body, mimetype=REPORT_FORMATS[fmt])
    response.headers["Content-Disposition"] = (
        f'attachment; filename="reconciliation-run-{run_id}.{fmt}"'
    )
    return response


@bp.route("/exceptions/<int:exception_id>")
def exception(exception_id: int) -> ResponseReturnValue:
    """One exception: what differs, its history, and the order's full story."""
    return _exception_page(exception_id)


@bp.route("/exceptions/<int:exception_id>/review", methods=["POST"])
def review(exception_id: int) -> ResponseReturnValue:
    """Resolve or accept an exception with a note, as the signed-in user."""
    action = request.form.get("action", "")
    act = REVIEW_ACTIONS.get(action)
    if act is None:
        abort(400, description="Choose to resolve or to accept the exception.")
    note = request.form.get("note", "")
    try:
        with current_receiver().sessions.begin() as session:
            act(session, exception_id, actor=g.user, note=note, now=utcnow())
    except ExceptionNotFound:
        abort(404, description=f"There is no exception {exception_id}.")
    except NoteRequired:
        return _exception_page(
            exception_id,
            error="Write a note saying why: it is kept with the exception.",
            status=400,
        )
    except TextRefused as exc:
        message = str(exc)
        return _exception_page(
            exception_id, error=f"{message[:1].upper()}{message[1:]}.", status=400
        )
    except ExceptionNotOpen as exc:
        # Reviewed (or closed by a run) since the page was shown: say so.
        return _exception_page(exception_id, error=str(exc), status=409)
    flash(f"Exception {exception_id} {'resolved' if action == 'resolve' else 'accepted'}.")
    back = _safe_back(request.form.get("back"))
    target = url_for("finance.views.exception", exception_id=exception_id, back=back)
    return redirect(target, code=303)


def _exception_page(
    exception_id: int, *, error: str | None = None, status: int = 200
) -> tuple[str, int]:
    _refuse_beyond_range(exception_id, f"There is no exception {exception_id}.")
    receiver = current_receiver()
    now = utcnow()
    with receiver.read_sessions.begin() as session:
        found = session.get(ReconException, exception_id)
        if found is None:
            abort(404, description=f"There is no exception {exception_id}.")
        connection = session.get_one(VenueConnection, found.connection_id).name
        ledger = (
            None if found.ledger_line_id is None else session.get(LedgerLine, found.ledger_line_id)
        )
        order = (
            None if found.venue_order_id is None else session.get(VenueOrder, found.venue_order_id)
        )
        story = None if order is None else order_story(session, order)
        age_days = max((now - found.first_seen_at).days, 0)
        page = render_template(
            "finance/exception.html",
            exc=found,
            category=_category(found.category),
            connection=connection,
            events=list(found.events),
            ledger=ledger,
            story=story,
            difference=_difference(found),
            age_days=age_days,
            aging_bucket=aging_bucket(age_days),
            details=_flat_details(found.details or {}),
            error=error,
            note=request.form.get("note", "") if error else "",
            back=_safe_back(request.values.get("back")),
        )
    return page, status


def _run_report(run_id: int) -> RunReport:
    """The report of run ``run_id``, or a 404 page."""
    _refuse_beyond_range(run_id, f"There is no reconciliation run {run_id}.")
    with current_receiver().read_sessions.begin() as session:
        try:
            return load_run_report(session, run_id, now=utcnow())
        except RunNotFound:
            abort(404, description=f"There is no reconciliation run {run_id}.")


def _refuse_beyond_range(row_id: int, description: str) -> None:
    """A 404 page for an id no row can have (beyond a ``BIGINT``), before any query.

    The URL's ``int`` takes any number of digits; sent to the database, one past the
    range is an error on both databases rather than "not found".
    """
    if row_id > ID_MAX:
        abort(404, description=description)


def _exception_counts(session: Session, run_ids: list[int]) -> dict[int, int]:
    """How many exceptions each run found, from its totals, in one query."""
    if not run_ids:
        return {}
    query = (
        sa.select(ReconTotal.recon_run_id, sa.func.sum(ReconTotal.count))
        .where(
            ReconTotal.recon_run_id.in_(run_ids),
            ReconTotal.category.in_(EXCEPTION_CATEGORIES),
        )
        .group_by(ReconTotal.recon_run_id)
    )
    return {run_id: int(count or 0) for run_id, count in session.execute(query).all()}


def _totals_by_currency(totals: Iterable[TotalRow]) -> list[dict[str, Any]]:
    """The totals grouped per currency, categories in their defined order, with sums."""
    order = {category: index for index, category in enumerate(Category)}
    grouped: dict[str, list[TotalRow]] = {}
    for total in totals:
        grouped.setdefault(total.currency, []).append(total)
    return [
        {
            "currency": currency,
            "rows": sorted(rows, key=lambda row: order.get(row.category, len(order))),
            "count": sum(row.count for row in rows),
            "ledger": sum((row.ledger_amount for row in rows), Decimal(0)),
            "venue": sum((row.venue_amount for row in rows), Decimal(0)),
            "exceptions": sum(row.count for row in rows if _category(row.category).is_exception),
        }
        for currency, rows in sorted(grouped.items())
    ]


def _filter_options(rows: Iterable[ExceptionRow]) -> dict[str, list[str]]:
    listed = list(rows)
    return {
        "category": sorted({row.category.value for row in listed}),
        "state": sorted({row.state for row in listed}),
        "aging": [
            bucket for bucket in AGING_BUCKETS if any(r.aging_bucket == bucket for r in listed)
        ],
        "currency": sorted({row.currency for row in listed if row.currency}),
    }


def _category(value: str) -> Category:
    return value if isinstance(value, Category) else Category(value)


def _difference(found: ReconException) -> Decimal | None:
    """Venue minus ledger amount; none when either is missing or they are in two currencies."""
    ledger, venue = found.ledger_amount, found.venue_amount
    if ledger is None or venue is None or found.category == Category.CURRENCY_MISMATCH:
        return None
    return venue - ledger


def _flat_details(details: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The exception's details as (label, text) pairs for a table."""
    pairs = []
    for key, value in details.items():
        if isinstance(value, list | tuple):
            text = ", ".join(str(item) for item in value) or "-"
        elif value is None:
            text = "-"
        else:
            text = str(value)
        pairs.append((key, text))
    return pairs


def _safe_back(target: str | None) -> str | None:
    if target and target.startswith("/finance/") and not target.startswith("//"):
        return target
    return None


def _chart(report: RunReport) -> Markup | None:
    """The run's chart (exceptions per category, stacked by age), as the report draws it."""
    return report_formats.chart_svg(report.exceptions)
