"""The faults gateways in front of the venue cause: answers lost after the work, webhooks
jittered and sent concurrently, ``Retry-After`` on 429/503. Real HTTP throughout."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from click.testing import CliRunner
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from sandbox import Faults
from sandbox.app import create_sandbox_app
from sandbox.cli import build_config, sandbox_command
from sandbox.web import sandbox_runtime
from tests.sandbox.conftest import PARTNER, Receiver, Venue, config_for_tests, order_body

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment


def listed(venue: Venue, reference: str) -> list[dict[str, Any]]:
    """The venue's orders under ``reference``."""
    response = venue.api.get(
        f"/channelManager/orders/{PARTNER}", params={"sellToOrderReference": reference}
    )
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


# --- answers lost after the work -------------------------------------------------------


def test_a_lost_create_answer_leaves_the_order_taken(venue: Venue) -> None:
    """``answerLostCount``: the createOrder is done, its answer never comes (the
    connection is cut), the count goes down, and the next call is answered."""
    venue.faults(answerLostCount=1)

    with pytest.raises(httpx.RemoteProtocolError):
        venue.api.post("/channelManager", json=order_body("LOST-1"))

    [order] = listed(venue, "LOST-1")
    assert venue.get(order["orderId"])["status"] == "Submitted"
    assert venue.admin.get("/faults").json()["answerLostCount"] == 0
    stats = venue.stats()
    assert stats["gateway"]["answersLost"] == 1
    assert stats["calls"]["createOrder"] == {"201": 1}


@pytest.mark.parametrize("call", ["getOrder", "confirmOrder", "replaceOrder", "deleteOrder"])
def test_every_order_call_can_lose_its_answer_after_the_work(venue: Venue, call: str) -> None:
    """getOrder, confirmOrder, replaceOrder and deleteOrder lose their answer as
    createOrder does; the change was made all the same."""
    draft = venue.create(order_body("LOST-2", payment=None))
    order_id = draft["orderId"]
    venue.tick()  # a Draft: confirmable, replaceable and deletable
    requests = {
        "getOrder": ("GET", f"/channelManager/{order_id}", None),
        "confirmOrder": ("POST", f"/channelManager/{order_id}/confirm", {"paymentReference": "P"}),
        "replaceOrder": ("PUT", f"/channelManager/{order_id}", order_body("LOST-2", payment=None)),
        "deleteOrder": ("DELETE", f"/channelManager/{order_id}", None),
    }
    method, path, body = requests[call]
    venue.faults(answerLostRate=1)

    with pytest.raises(httpx.RemoteProtocolError):
        venue.api.request(method, path, json=body)

    venue.faults(answerLostRate=0)
    after = venue.api.get(f"/channelManager/{order_id}")
    expected = {
        "getOrder": (200, "Draft"),
        "confirmOrder": (200, "Issued"),
        "replaceOrder": (200, "Submitted"),
        "deleteOrder": (404, None),
    }[call]
    assert (after.status_code, after.json().get("status")) == expected
    assert venue.stats()["gateway"]["answersLost"] == 1


def test_without_a_socket_to_cut_a_lost_answer_is_a_gateway_504() -> None:
    """Served in-process (no werkzeug socket), the lost answer is a 504 with no order in
    it; the order was taken all the same."""
    config = config_for_tests(faults=Faults(answer_lost_count=1))
    app = create_sandbox_app(config)
    try:
        base = f"/{config.tenant}/{config.environment}/{config.company_path}"
        headers = {"x-np-api-key": config.api_key.get_secret_value()}
        answer = app.test_client().post(
            f"{base}/channelManager", json=order_body("NOSOCK-1"), headers=headers
        )
        assert answer.status_code == 504
        assert answer.get_json()["code"] == "gateway_timeout"
        assert sandbox_runtime(app).store.find(PARTNER, "NOSOCK-1") is not None
    finally:
        sandbox_runtime(app).close()


def test_a_refusal_is_never_lost(venue: Venue) -> None:
    """Only calls that took effect lose their answer: a 400 comes through."""
    venue.create(order_body("TAKEN"))
    venue.faults(answerLostRate=1)

    refused = venue.api.post("/channelManager", json=order_body("TAKEN"))

    assert refused.status_code == 400
    assert venue.stats()["gateway"]["answersLost"] == 0


def test_a_silent_lost_answer_is_the_clients_timeout(venue: Venue) -> None:
    """``answerLostAfterSeconds`` past the client's read timeout: the client times out,
    and the order was taken."""
    venue.faults(answerLostCount=1, answerLostAfterSeconds=1.0)

    with pytest.raises(httpx.ReadTimeout):
        venue.api.post("/channelManager", json=order_body("SLOW-1"), timeout=0.2)

    assert len(listed(venue, "SLOW-1")) == 1


# --- Retry-After on the gateway's 429 and 503 -------------------------------------------


@pytest.mark.parametrize(("fault", "status"), [("rate429", 429), ("rate503", 503)])
def test_gateway_refusals_carry_retry_after_when_set(venue: Venue, fault: str, status: int) -> None:
    """``retryAfterSeconds`` adds ``Retry-After`` to the 429/503 faults; unset, none."""
    venue.faults(**{fault: 1})
    plain = venue.api.get(f"/channelManager/orders/{PARTNER}")
    venue.faults(retryAfterSeconds=7)
    told = venue.api.get(f"/channelManager/orders/{PARTNER}")
    venue.faults(**{fault: 0})
    answered = venue.api.get(f"/channelManager/orders/{PARTNER}")

    assert (plain.status_code, plain.headers.get("Retry-After")) == (status, None)
    assert (told.status_code, told.headers.get("Retry-After")) == (status, "7")
    assert (answered.status_code, answered.headers.get("Retry-After")) == (200, None)


# --- webhooks: per-notification jitter, concurrent POSTs --------------------------------


def test_jittered_notifications_arrive_alone_and_out_of_order_across_runs(
    venue: Venue, receiver: Receiver
) -> None:
    """``webhookJitterSeconds``: each notification is POSTed alone after its own random
    wait, so those of later processing runs overtake earlier ones."""
    venue.subscribe(receiver.url)
    venue.faults(webhookJitterSeconds=1.0, seed=11)
    published = []
    for number in range(8):
        published.append(venue.create(order_body(f"J-{number}"))["orderId"])
        venue.tick()  # one processing run per order

    bodies = receiver.wait_for_posts(8)
    venue.settle_webhooks()

    assert all(len(body["value"]) == 1 for body in bodies)
    arrived = [n.payload["orderId"] for n in receiver.notifications()]
    assert sorted(arrived) == sorted(published)
    assert arrived != published


class Gate:
    """A webhook endpoint whose POSTs wait for each other: it answers only once
    ``parties`` POSTs are in flight together (or fails them after ``timeout``)."""

    def __init__(self, parties: int, timeout: float = 5.0) -> None:
        self.barrier = threading.Barrier(parties, timeout=timeout)
        self.met = 0
        self._lock = threading.Lock()
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        """Where to subscribe."""
        return f"http://127.0.0.1:{self._server.server_port}/hook"

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        Request(environ).get_data()  # read the POST whole before answering
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            status = 400
        else:
            status = 200
            with self._lock:
                self.met += 1
        return Response("{}", status=status, mimetype="application/json")(environ, start_response)

    def __enter__(self) -> Gate:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.barrier.abort()
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()


@pytest.fixture
def gate() -> Iterator[Gate]:
    """An endpoint that answers POSTs three at a time."""
    with Gate(parties=3) as started:
        yield started


def test_concurrent_webhook_posts_are_in_flight_together(venue: Venue, gate: Gate) -> None:
    """``webhookConcurrency``: several POSTs in flight at once (three meet at the gate)."""
    venue.subscribe(gate.url)
    venue.faults(webhookConcurrency=3, envelope="bare")
    for number in range(3):
        venue.create(order_body(f"C-{number}"))
    venue.tick()

    stats = venue.settle_webhooks()

    assert gate.met == 3
    assert (stats["webhooks"]["sent"], stats["webhooks"]["failed"]) == (3, 0)


def test_webhook_posts_go_one_at_a_time_by_default(venue: Venue) -> None:
    """Without the fault, POSTs never meet: the gate fails them, a 400 each."""
    with Gate(parties=2, timeout=0.5) as lonely:
        venue.subscribe(lonely.url)
        venue.faults(envelope="bare")
        for number in range(2):
            venue.create(order_body(f"S-{number}"))
        venue.tick()
        stats = venue.settle_webhooks(timeout=10)

    assert lonely.met == 0
    assert stats["webhooks"]["failed"] == 2


# --- the command's flags ----------------------------------------------------------------


def test_the_gateway_faults_are_command_flags() -> None:
    """``otacm sandbox`` takes each gateway fault as a flag (and an OTACM_SANDBOX_ variable)."""
    result = CliRunner().invoke(sandbox_command, ["--help"])
    for flag in (
        "--answer-lost-rate",
        "--answer-lost-count",
        "--answer-lost-after-seconds",
        "--retry-after-seconds",
        "--webhook-jitter-seconds",
        "--webhook-concurrency",
    ):
        assert flag in result.output
    assert "OTACM_SANDBOX_ANSWER_LOST_RATE" in result.output

    context = sandbox_command.make_context(
        "sandbox",
        [
            "--answer-lost-count",
            "2",
            "--answer-lost-rate",
            "0.1",
            "--retry-after-seconds",
            "3",
            "--webhook-jitter-seconds",
            "0.5",
            "--webhook-concurrency",
            "4",
        ],
    )
    faults = build_config(context.params).faults
    assert (faults.answer_lost_count, faults.answer_lost_rate, faults.retry_after_seconds) == (
        2,
        0.1,
        3,
    )
    assert (faults.webhook_jitter_seconds, faults.webhook_concurrency) == (0.5, 4)
