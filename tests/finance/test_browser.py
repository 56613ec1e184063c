"""The finance pages in a real headless Chromium (Debian's ``chromium``, driven by
Playwright through ``executable_path``) against a real HTTP server: sign in, open a run,
filter, drill down, resolve with a note, download the XLSX and read it back, sign out;
all of it under the pages' content policy, which the browser reports no violation of."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator

import pytest
from flask import Flask
from openpyxl import load_workbook

from receiver.testing import served
from tests.finance.conftest import PASSWORD, USER, seed_run

DASH = "\u2013"  # between the first and last row a page shows
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None, reason="Debian's chromium is not installed (scripts/ensure-chromium)"
    ),
    # One database is enough here: the pages' SQL runs on both in test_pages.
    pytest.mark.parametrize("engine", ["sqlite"], indirect=True),
]


@pytest.fixture
def base_url(app: Flask) -> Iterator[str]:
    """The app served over real HTTP on a free port, in a thread."""
    with served(app) as url:
        yield url


@pytest.fixture
def browser_page(base_url: str):
    """A fresh headless Chromium page."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            context = browser.new_context(accept_downloads=True)
            yield context.new_page()
        finally:
            browser.close()


# Every content-policy violation the browser sees, written to the console where the test
# collects it (added before any of the page's own content runs).
REPORT_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (event) => {
  console.error(`csp-violation: ${event.violatedDirective} ${event.blockedURI}`);
});
"""


def test_finance_review_in_a_browser(browser_page, base_url, sessions):
    """Signed out → sign-in; then run, filter, drill down, resolve, download the XLSX,
    sign out; the content policy is never violated (and a violation would be seen)."""
    seeded = seed_run(sessions)
    page = browser_page
    page.add_init_script(REPORT_VIOLATIONS)
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    page.goto(f"{base_url}/finance/runs/{seeded.run_id}")
    assert "/finance/sign-in" in page.url
    assert page.get_by_role("heading", name="Sign in").is_visible()
    assert "SHOP-100" not in page.content()

    page.fill("#name", USER)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"**/finance/runs/{seeded.run_id}")
    assert page.locator("table.totals").count() == 2

    page.select_option("select[name=category]", "amount_mismatch")
    page.click("text=Filter")
    page.wait_for_url("**category=amount_mismatch**")
    rows = page.locator("table.exceptions tbody tr")
    assert rows.count() == 1 and "SHOP-100" in rows.first.inner_text()

    rows.first.locator("a").first.click()
    page.wait_for_url(f"**/finance/exceptions/{seeded.amount_exception_id}**")
    assert "W-0001" in page.locator("table.wallets").inner_text()
    assert "webhook" in page.locator("table.timeline").inner_text()

    note = "Venue refunded 20.00; credit note CN-7"
    page.fill("#note", note)
    page.click("button[value=resolve]")
    page.wait_for_selector(".flash")
    history = page.locator("table.history").inner_text()
    assert note in history and USER in history and "resolved" in history

    page.click("text=Back to the run")
    page.wait_for_url(f"**/finance/runs/{seeded.run_id}**")
    with page.expect_download() as download_info:
        page.click("a.button:text('XLSX')")
    data = download_info.value.path().read_bytes()
    book = load_workbook(io.BytesIO(data))
    cells = {str(c.value) for sheet in book.worksheets for row in sheet for c in row}
    assert {"SHOP-100", "SHOP-200"} <= cells

    page.click("text=Sign out")
    page.wait_for_url("**/finance/sign-in")
    page.goto(f"{base_url}/finance/")
    assert "/finance/sign-in" in page.url and "SHOP-" not in page.content()

    violations = [
        text for text in console if "csp-violation" in text or "Content Security Policy" in text
    ]
    assert violations == []
    # The check above can fail: an inline style attribute is reported.
    with page.expect_console_message(lambda message: "csp-violation" in message.text):
        page.evaluate("document.body.setAttribute('style', 'color: red')")


def test_paging_thousands_of_exceptions_in_a_browser(browser_page, base_url, sessions):
    """A run of 3,000 exceptions: the page shows 100 of them, "1-100 of 3,000" (with an
    en dash), Next and Previous walk by keyset, a filter narrows and recounts, the chart
    image loads, and the content policy holds throughout."""
    from tests.finance.conftest import seed_many

    many = seed_many(sessions, 3000)
    page = browser_page
    page.add_init_script(REPORT_VIOLATIONS)
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    page.goto(f"{base_url}/finance/sign-in")
    page.fill("#name", USER)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/finance/")
    page.goto(f"{base_url}/finance/runs/{many.run_id}?size=100")

    def shown() -> tuple[str, list[int]]:
        ids = page.locator("table.exceptions tbody tr td:first-child a").all_inner_texts()
        return page.locator(".pager .count").inner_text().strip(), [int(i) for i in ids]

    ordered = sorted(many.seen)
    assert shown() == (f"1{DASH}100 of 3,000", ordered[:100])
    page.click("a[rel=next]")
    page.wait_for_url("**after=**")
    assert shown() == (f"101{DASH}200 of 3,000", ordered[100:200])
    page.click("a[rel=next]")
    page.wait_for_url(f"**after={ordered[199]}**")
    assert shown() == (f"201{DASH}300 of 3,000", ordered[200:300])
    page.click("a[rel=prev]")
    page.wait_for_url("**before=**")
    assert shown() == (f"101{DASH}200 of 3,000", ordered[100:200])

    page.select_option("select[name=state]", "resolved")
    page.click("text=Filter")
    page.wait_for_url("**state=resolved**")
    resolved = sorted(i for i, value in many.seen.items() if value["state"] == "resolved")
    count, ids = shown()
    assert count == f"1{DASH}{min(len(resolved), 100)} of {len(resolved)} matching (3,000 in all)"
    assert ids == resolved[:100]

    chart = page.locator("img.chart")
    chart.scroll_into_view_if_needed()
    page.wait_for_function("document.querySelector('img.chart').complete")
    assert chart.evaluate("image => image.naturalWidth") > 0, "the chart image loaded"
    violations = [
        text for text in console if "csp-violation" in text or "Content Security Policy" in text
    ]
    assert violations == []
