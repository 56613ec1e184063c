"""The finance lists at thousands of rows, on SQLite and PostgreSQL: a run's exceptions and
the runs page by keyset, filtered in SQL, with "n of N"; walking the pages meets every
row once, even while states change under it; bad paging arguments are a 400 page."""

from __future__ import annotations

import datetime as dt
import html
import re

import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from reconciler.report import AGING_BUCKETS, aging_bucket
from storage.records import ReconException, ReconRun
from tests.finance.conftest import Many, seed_many

COUNT = 2500
ROW_ID = re.compile(r'<tr data-category="[^"]+">\s*<td><a href="[^"]+">(\d+)</a>')
COUNTER = re.compile(
    r'<span class="count" data-first="(\d+)" data-last="(\d+)" data-total="(\d+)">'
)
LINK = re.compile(r'<a class="button" rel="(prev|next)" href="([^"]+)">')


@pytest.fixture
def many(sessions: sessionmaker[Session]) -> Many:
    return seed_many(sessions, COUNT, closed=30)


def _read(client: FlaskClient, path: str) -> tuple[list[int], tuple[int, int, int], dict[str, str]]:
    """The ids a list page shows, its counter (first, last, total) and its links."""
    response = client.get(path)
    assert response.status_code == 200, (path, response.status_code)
    page = response.get_data(as_text=True)
    ids = [int(found) for found in ROW_ID.findall(page)]
    counter = COUNTER.search(page)
    assert counter is not None, path
    links = {rel: html.unescape(href) for rel, href in LINK.findall(page)}
    first, last, total = (int(value) for value in counter.groups())
    return ids, (first, last, total), links


def _walk(client: FlaskClient, path: str, rel: str = "next", between=None) -> list[list[int]]:
    """Every page from ``path`` following the ``rel`` links; ``between()`` runs before
    each page after the first."""
    pages = []
    while True:
        ids, (first, last, _), links = _read(client, path)
        if ids:
            assert last - first + 1 == len(ids)
        pages.append(ids)
        if rel not in links:
            return pages
        path = links[rel]
        if between is not None:
            between()


def test_pages_walk_every_exception_once_both_ways(signed_in: FlaskClient, many: Many):
    """2,500 exceptions at 200 a page: forwards, every one once in id order, each page
    labelled with its rows "of 2,500"; backwards from the last page, the same pages."""
    base = f"/finance/runs/{many.run_id}?size=200"
    _, counter, links = _read(signed_in, base)
    assert counter == (1, 200, COUNT) and "prev" not in links
    forwards = _walk(signed_in, base)
    flat = [exception_id for page in forwards for exception_id in page]
    assert flat == sorted(many.seen) and len(forwards) == 13
    _, counter, _ = _read(signed_in, _link_of(signed_in, base, pages=12))
    assert counter == (2401, 2500, COUNT)
    last_page = _link_of(signed_in, base, pages=12)
    backwards = _walk(signed_in, last_page, rel="prev")
    assert list(reversed(backwards)) == forwards

    newest = [i for page in _walk(signed_in, f"{base}&order=newest") for i in page]
    assert newest == sorted(many.seen, reverse=True)


def _link_of(client: FlaskClient, path: str, *, pages: int) -> str:
    """The URL ``pages`` "next" links away from ``path``."""
    for _ in range(pages):
        path = _read(client, path)[2]["next"]
    return path


def test_pages_stay_whole_while_states_change(
    signed_in: FlaskClient, many: Many, sessions: sessionmaker[Session]
):
    """Finance resolves exceptions while someone pages: the unfiltered list still shows
    every exception once; the list of open ones shows none twice, each one that stayed
    open throughout, and only ones that were open when their page was read."""
    ordered = sorted(many.seen)
    changed: set[int] = set()
    step = iter(range(0, COUNT, 97))

    def resolve_some() -> None:
        # A few ahead of the reader and a few behind, every page.
        start = next(step, 0)
        chosen = [ordered[(start + offset) % COUNT] for offset in (5, 600, 1900)]
        with sessions.begin() as session:
            session.execute(
                sa.update(ReconException)
                .where(ReconException.id.in_(chosen))
                .values(state="accepted")
            )
        changed.update(chosen)

    pages = _walk(signed_in, f"/finance/runs/{many.run_id}?size=150", between=resolve_some)
    flat = [i for page in pages for i in page]
    assert flat == ordered

    open_before = {i for i, value in many.seen.items() if value["state"] == "open"}
    pages = _walk(
        signed_in, f"/finance/runs/{many.run_id}?state=open&size=150", between=resolve_some
    )
    flat = [i for page in pages for i in page]
    assert len(flat) == len(set(flat)), "no exception twice"
    assert set(flat) <= open_before
    assert open_before - changed <= set(flat), "every one that stayed open"
    with sessions.begin() as session:
        still_open = set(
            session.scalars(
                sa.select(ReconException.id).where(
                    ReconException.id.in_(ordered), ReconException.state == "open"
                )
            )
        )
    _, (_, _, total), _ = _read(signed_in, f"/finance/runs/{many.run_id}?state=open")
    assert total == len(still_open)


def _expected(many: Many, **wanted: str) -> list[int]:
    now = dt.datetime.now(dt.UTC)
    found = []
    for exception_id, value in many.seen.items():
        age = max((now - value["first_seen_at"]).days, 0)
        facts = {
            "category": value["category"],
            "state": value["state"],
            "currency": value["currency"],
            "aging": aging_bucket(age),
        }
        searched = "q" not in wanted or wanted["q"].casefold() in value["subject_key"].casefold()
        if searched and all(facts[key] == wanted[key] for key in wanted if key != "q"):
            found.append(exception_id)
    return sorted(found)


@pytest.mark.parametrize(
    "wanted",
    [
        {"category": "orphan"},
        {"state": "resolved"},
        {"currency": "USD"},
        {"aging": AGING_BUCKETS[1]},
        {"aging": AGING_BUCKETS[3]},
        {"q": "ref-0012"},
        {"category": "amount_mismatch", "state": "open", "currency": "EUR"},
    ],
    ids=lambda wanted: "+".join(wanted),
)
def test_filters_narrow_in_sql_and_count_what_they_show(
    signed_in: FlaskClient, many: Many, wanted: dict[str, str]
):
    """Each filter's pages hold exactly the exceptions it matches, and "of N" counts them
    (with the run's whole count beside it)."""
    query = "&".join(f"{key}={value}" for key, value in wanted.items())
    expected = _expected(many, **wanted)
    assert expected, "the filter matches something"
    path = f"/finance/runs/{many.run_id}?{query}&size=200"
    _, (first, _, total), _ = _read(signed_in, path)
    assert (first, total) == (1, len(expected))
    assert [i for page in _walk(signed_in, path) for i in page] == expected
    page = signed_in.get(path).get_data(as_text=True)
    assert f"matching ({COUNT:,} in all)" in page


def test_unknown_filter_values_match_nothing(signed_in: FlaskClient, many: Many):
    """A state, age group or category no exception has is an empty list, not an error."""
    for query in ("state=bogus", "aging=ancient", "category=nothing", "q=%25_%25"):
        ids, (_, _, total), _ = _read(signed_in, f"/finance/runs/{many.run_id}?{query}")
        assert ids == [] and total == 0, query


def test_closed_list_pages_too(signed_in: FlaskClient, many: Many):
    """The exceptions the run closed are a list of their own, paged and counted."""
    path = f"/finance/runs/{many.run_id}?list=closed&size=25"
    assert [i for page in _walk(signed_in, path) for i in page] == many.closed
    _, counter, _ = _read(signed_in, path)
    assert counter == (1, 25, 30)
    page = signed_in.get(f"/finance/runs/{many.run_id}").get_data(as_text=True)
    assert f"Seen by this run ({COUNT:,})" in page and "Closed by this run<" in page
    closed = signed_in.get(f"/finance/runs/{many.run_id}?list=closed").get_data(as_text=True)
    assert "Closed by this run (30)" in closed


@pytest.mark.parametrize(
    "query, named",
    [
        ("after=abc", "after"),
        ("after=-1", "after"),
        ("before=1e5", "before"),
        ("after=99999999999999999999", "after"),
        ("size=0", "size"),
        ("size=201", "size"),
        ("start=0", "start"),
        ("list=everything", "list"),
        ("order=sideways", "order"),
    ],
)
def test_bad_paging_arguments_are_a_400_naming_them(
    signed_in: FlaskClient, many: Many, query: str, named: str
):
    """A cursor, size, list or order the page cannot take is a 400 page saying which."""
    response = signed_in.get(f"/finance/runs/{many.run_id}?{query}")
    assert response.status_code == 400
    assert f"{named} " in response.get_data(as_text=True)
    assert signed_in.get(f"/finance/?{query}").status_code in (200, 400)


def test_runs_list_pages_newest_first(signed_in: FlaskClient, sessions: sessionmaker[Session]):
    """120 runs at 50 a page: each once, newest first, "of 122 runs" (the seeded run and
    its earlier one included), and the way back gives the same pages."""
    many = seed_many(sessions, 10, runs=120)
    forwards = _walk_runs(signed_in, "/finance/")
    flat = [i for page in forwards for i in page]
    assert len(flat) == 122 and len(set(flat)) == 122
    assert flat[0] == many.run_id
    with sessions.begin() as session:
        newest = list(
            session.scalars(
                sa.select(ReconRun.id).order_by(ReconRun.started_at.desc(), ReconRun.id.desc())
            )
        )
    assert flat == newest
    page = signed_in.get("/finance/").get_data(as_text=True)
    assert COUNTER.search(page).groups() == ("1", "50", "122")  # type: ignore[union-attr]
    assert "of 122 runs" in page
    assert signed_in.get("/finance/?connection=elsewhere").status_code == 200


RUN_ID = re.compile(r'<td><a href="/finance/runs/(\d+)">#')


def _walk_runs(client: FlaskClient, path: str) -> list[list[int]]:
    pages = []
    while True:
        page = client.get(path).get_data(as_text=True)
        pages.append([int(found) for found in RUN_ID.findall(page)])
        links = {rel: html.unescape(href) for rel, href in LINK.findall(page)}
        if "next" not in links:
            return pages
        path = links["next"]
