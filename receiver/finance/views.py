"""The finance pages: runs, a run's report, an exception with its order's story.

- ``/finance/``: the reconciliation runs, newest first, a page at a time (connection,
  period, trigger, state, how many exceptions each found);
- ``/finance/runs/<id>``: a run's totals per currency and category, its chart (an image
  of its own, ``/finance/runs/<id>/chart.svg``: it counts every exception, the page only
  one page of them), the exceptions it saw (filtered by category, state, aging bucket,
  currency, and a reference search) or those it closed, a page at a time, and the
  report's downloads (every format of :data:`reconciler.report_formats.REPORT_FORMATS`,
  at ``/finance/runs/<id>/report.<format>``, streamed);
- ``/finance/exceptions/<id>``: one exception, its history (who did what, when, with
  which note), the sale's ledger line and the venue order's full story
  (:func:`orders.story.order_story`: lines, wallets, every status change and where it
  came from), and the forms to resolve or accept it with a note, recorded under the
  signed-in user's name.

Lists page in SQL by keyset (:mod:`receiver.finance.paging`): a page after or before an
id in the URL, never an offset, so the millionth row's page costs what the first's does,
and each says "n of N", counted in SQL. Pages read through the app's read-only sessions;
downloads read a batch per short transaction as they stream; resolving writes in a
transaction of its own. Customer names and e-mails are never shown: references identify
an order.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
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
from sqlalchemy.orm import Session

from orders.story import order_story
from receiver.context import current_receiver
from receiver.finance.paging import Cursor
from receiver.finance.streaming import at_batch_priority
from reconciler import report_formats
from reconciler.categories import Category
from reconciler.exceptions import (
    ExceptionNotFound,
    ExceptionNotOpen,
    NoteRequired,
    RunsPage,
    TextRefused,
    accept,
    count_runs,
    resolve,
    runs_page,
)
from reconciler.report import (
    AGING_BUCKETS,
    DEFAULT_PAGE_SIZE,
    PAGE_SIZES,
    ExceptionFilter,
    Listing,
    RunNotFound,
    TotalRow,
    aging_bucket,
    aging_counts,
    count_exceptions,
    exception_page,
    load_run,
    load_totals,
    open_run_report,
)
from reconciler.report_formats import REPORT_FORMATS, money_text, stream_report
from storage.models import LedgerLine, VenueConnection, VenueOrder
from storage.records import ExceptionState, ReconException, ReconTotal
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
RUNS_PAGE_SIZE = 50


@bp.route("/")
def runs() -> ResponseReturnValue:
    """The reconciliation runs, newest first, a page at a time; ``?connection=`` keeps one
    connection's."""
    receiver = current_receiver()
    wanted = request.args.get("connection", "").strip()
    cursor = Cursor.from_args(request.args, default_size=RUNS_PAGE_SIZE, ids="a run number")
    with receiver.read_sessions.begin() as session:
        names = dict(session.execute(sa.select(VenueConnection.id, VenueConnection.name)).all())
        connection_id = next((id_ for id_, name in names.items() if name == wanted), None)
        if wanted and connection_id is None:
            found, total = RunsPage([], more_before=False, more_after=False), 0
        else:
            found = runs_page(
                session,
                connection_id=connection_id,
                after=cursor.after,
                before=cursor.before,
                size=cursor.size,
            )
            total = count_runs(session, connection_id=connection_id)
        counts = _exception_counts(session, [run.id for run in found.runs])
        rows = [
            {
                "run": run,
                "connection": names.get(run.connection_id, "?"),
                "exceptions": counts.get(run.id, 0),
            }
            for run in found.runs
        ]
    shown = cursor.shown(found.runs, more_before=found.more_before)
    keep = {"connection": wanted} if wanted else {}
    return render_template(
        "finance/runs.html",
        rows=rows,
        connections=sorted(names.values()),
        connection=wanted,
        total=total,
        shown=shown,
        previous=shown.previous_args(found.more_before, [run.id for run in found.runs], keep),
        next=shown.next_args(found.more_after, [run.id for run in found.runs], keep),
        first=shown.first_args(keep),
    )


@bp.route("/runs/<int:run_id>")
def run(run_id: int) -> ResponseReturnValue:
    """A run's summary, and a page of the exceptions it saw or closed (filtered)."""
    _refuse_beyond_range(run_id, f"There is no reconciliation run {run_id}.")
    chosen = ExceptionFilter.from_args(request.args)
    listing = _listing(request.args.get("list", ""))
    newest_first = _newest_first(request.args.get("order", ""))
    cursor = Cursor.from_args(
        request.args, default_size=DEFAULT_PAGE_SIZE, ids="an exception number"
    )
    now = utcnow()
    with current_receiver().read_sessions.begin() as session:
        try:
            info = load_run(session, run_id)
        except RunNotFound:
            abort(404, description=f"There is no reconciliation run {run_id}.")
        totals = load_totals(session, run_id)
        page = exception_page(
            session,
            run_id,
            now=now,
            listing=listing,
            chosen=chosen,
            after=cursor.after,
            before=cursor.before,
            newest_first=newest_first,
            size=cursor.size,
        )
        seen = count_exceptions(session, run_id, now=now)
        # Counted only when shown: a count of what a run closed walks its events.
        closed = (
            count_exceptions(session, run_id, now=now, listing=Listing.CLOSED)
            if listing is Listing.CLOSED
            else None
        )
        listed = seen if closed is None else closed
        matching = (
            count_exceptions(session, run_id, now=now, listing=listing, chosen=chosen)
            if chosen.active
            else listed
        )
    shown = cursor.shown(page.rows, more_before=page.more_before)
    ids = [row.id for row in page.rows]
    keep = {
        **chosen.as_args(),
        **({"list": listing.value} if listing is not Listing.SEEN else {}),
        **({"order": "newest"} if newest_first else {}),
    }
    return render_template(
        "finance/run.html",
        info=info,
        totals=_totals_by_currency(totals),
        has_chart=seen > 0,
        filter=chosen,
        listing=listing.value,
        newest_first=newest_first,
        rows=page.rows,
        shown=shown,
        matching=matching,
        seen=seen,
        closed=closed,
        previous=shown.previous_args(page.more_before, ids, keep),
        next=shown.next_args(page.more_after, ids, keep),
        options=_filter_options(totals, chosen),
        formats=list(REPORT_FORMATS),
        sizes=PAGE_SIZES,
        size=cursor.size,
        keep_args=keep,
    )


@bp.route("/runs/<int:run_id>/chart.svg")
def chart(run_id: int) -> ResponseReturnValue:
    """The run's chart: the exceptions it saw per category, stacked by age, as an image.

    Apart from the page because it counts every exception of the run (one pass in
    SQL), where the page reads one page of them: the page shows at once, the chart as
    soon as it is counted.
    """
    _refuse_beyond_range(run_id, f"There is no reconciliation run {run_id}.")
    with current_receiver().read_sessions.begin() as session:
        try:
            load_run(session, run_id)
        except RunNotFound:
            abort(404, description=f"There is no reconciliation run {run_id}.")
        counts = aging_counts(session, run_id, now=utcnow())
    svg = report_formats.chart_svg(counts)
    if svg is None:
        abort(404, description=f"Reconciliation run {run_id} saw no exceptions to chart.")
    return Response(str(svg), mimetype="image/svg+xml")


@bp.route("/runs/<int:run_id>/report.<fmt>")
def download(run_id: int, fmt: str) -> Response:
    """The run's report as a file, in one of :data:`REPORT_FORMATS`, streamed.

    Every format goes out as it is written (chunked: no length is known before the end),
    the XLSX archive too, its rows compressed as they come; the first bytes leave at
    once, so neither the client nor a proxy between waits in silence for a long report.
    The gunicorn worker is told of the progress
    (:func:`receiver.finance.streaming.keep_alive`), so a long report is not killed as a
    stuck request, and the report is computed at the batch priority (``batch_nice``: a
    thread of its own, :func:`receiver.finance.streaming.at_batch_priority`), so the
    webhooks the worker answers do not wait for a CPU behind it.
    """
    if fmt not in REPORT_FORMATS:
        abort(404, description=f"Reports come as {', '.join(REPORT_FORMATS)}.")
    _refuse_beyond_range(run_id, f"There is no reconciliation run {run_id}.")
    receiver = current_receiver()
    try:
        report = open_run_report(receiver.read_sessions, run_id, now=utcnow())
    except RunNotFound:
        abort(404, description=f"There is no reconciliation run {run_id}.")
    headers = {"Content-Disposition": f'attachment; filename="reconciliation-run-{run_id}.{fmt}"'}
    # The report holds no session: each batch of its rows opens its own, in the thread.
    body = at_batch_priority(
        lambda progress: stream_report(report, fmt, progress=progress),
        receiver.settings.batch_nice,
    )
    return Response(body, mimetype=REPORT_FORMATS[fmt], headers=headers)


def _listing(value: str) -> Listing:
    if value in ("", Listing.SEEN.value):
        return Listing.SEEN
    if value == Listing.CLOSED.value:
        return Listing.CLOSED
    abort(400, description=f"list is seen or closed, not {value!r}.")


def _newest_first(value: str) -> bool:
    if value in ("", "oldest"):
        return False
    if value == "newest":
        return True
    abort(400, description=f"order is oldest or newest, not {value!r}.")


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


def _filter_options(totals: Iterable[TotalRow], chosen: ExceptionFilter) -> dict[str, list[str]]:
    """What each filter offers: the exception categories and currencies of the run's
    totals (and the one chosen), every state and every age group."""
    exceptional = [total for total in totals if total.category.is_exception]
    categories = {total.category.value for total in exceptional}
    if chosen.category in EXCEPTION_CATEGORIES:  # one the run has none of stays chosen
        categories.add(chosen.category)
    currencies = {total.currency for total in exceptional} | {chosen.currency} - {""}
    order = {category.value: index for index, category in enumerate(Category)}
    return {
        "category": sorted(categories, key=lambda value: order.get(value, len(order))),
        "state": [state.value for state in ExceptionState],
        "aging": list(AGING_BUCKETS),
        "currency": sorted(currencies),
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
