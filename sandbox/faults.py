"""Fault injection: which faults are on, and the seeded random source that fires them.

Faults are set when the sandbox starts (:class:`sandbox.config.SandboxConfig` ``faults``,
``otacm sandbox`` flags, ``OTACM_SANDBOX_*`` variables) and changed at run time with
``POST /_sandbox/faults``. That endpoint takes a JSON object with any of these fields
(camelCase or snake_case); fields left out keep their current value, and the answer is
the complete set now in force (``GET /_sandbox/faults`` reads it):

- ``dropRate`` (0 to 1): share of webhook notifications never sent (counted ``dropped``).
- ``duplicateRate`` (0 to 1): share of notifications sent a second time, in a separate POST
  right after their batch — an exact repeat, as a retry would be (counted ``duplicated``).
- ``delaySeconds`` (≥ 0): wait before each webhook POST.
- ``reorder`` (bool): shuffle a processing run's notifications before batching them, and
  the order in which the batches are sent.
- ``envelope`` (``"value"`` | ``"values"`` | ``"bare"``): the webhook body shape;
  ``bare`` sends one notification object per POST.
- ``webhookJitterSeconds`` (≥ 0): each notification waits its own random time, up to this
  long (on top of ``delaySeconds``), and is POSTed on its own: notifications of one
  processing run, and of the runs after it, arrive in any order.
- ``webhookConcurrency`` (1 to 32): webhook POSTs in flight at once, as a gateway with
  several delivery workers sends them (1: one after the other).
- ``rate429``, ``rate503`` (0 to 1): share of API calls answered 429 ``too_many_requests``
  or 503 ``service_unavailable`` by the "gateway", before any work is done.
- ``retryAfterSeconds`` (≥ 0, or null): a ``Retry-After`` header of this many seconds on
  those 429 and 503 answers; null sends none.
- ``answerLostRate`` (0 to 1), ``answerLostCount`` (≥ 0): an answer lost after the work
  was done — of a createOrder, confirmOrder, replaceOrder, deleteOrder or getOrder that
  succeeded — as a gateway that times out or resets the connection after the venue
  committed: the call took effect, the client gets no answer. ``answerLostCount`` loses
  the next that many such answers (counting down to 0, shown as it goes), then
  ``answerLostRate`` decides. Counted in the stats' ``gateway.answersLost``. (Served
  without werkzeug's socket, as by a test client, the lost answer is a gateway 504.)
- ``answerLostAfterSeconds`` (≥ 0): how long the connection stays open and silent before
  it is cut; longer than the client's read timeout, the loss is the client's timeout.
- ``latencyMs`` (≥ 0): added to every API call.
- ``stallScheduledRate``, ``stallProcessingRate`` (0 to 1): share of picked-up orders left
  hanging in Scheduled or Processing, for the sweeper to find (advance the clock with
  ``POST /_sandbox/clock``).
- ``errorRate`` (0 to 1): share of processing runs that fail after the ticket import, as
  CMTicketIssuer ConfirmTickets can: the order ends in Error with "Import header for JobId
  <jobId> not found. This is a programming bug." and keeps its job id (a re-processing run
  then does not import, nor price, the tickets again).
- ``holdCommitSeconds`` (≥ 0): a late commit. A background processing run's last change
  (Issued, Draft or Error) takes its row version at once but is committed — seen by
  getOrder, lists and the change feed, and announced by webhook — only at the first
  pickup cycle this many seconds (sandbox time) later. Changes made meanwhile take
  higher row versions and are seen at once, so the held change lands below a mark a
  reader may already have passed.
- ``soldOut`` (list of item numbers): items whose capacity is exceeded (on top of the
  catalog's ``soldOut`` items): a processing run whose line issues one of them — the item,
  or a ticket component of a package — fails as the venue's ticket import does
  (CMTicketIssuer RunTicketImport; TMTicketManagement ``CAPACITY_EXCEEDED``) and the order
  ends in Error with "[-1004] - The capacity for <item> has been exceeded. Entry is not
  allowed.".
- ``missingPermissions`` (bool): the API identity lacks the Channel Manager permission
  set: every ``/channelManager`` call is answered 403 ``generic_error`` "Missing
  permissions: NPR API Channel Mgr" (APIRequestProcessor ProcessRequest).
- ``seed`` (int or null): reseeds the random source that decides every fault, so a run
  is repeatable; null seeds it from the system.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping, MutableSequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

Envelope = Literal["value", "values", "bare"]
Rate = Annotated[float, Field(ge=0.0, le=1.0)]
T = TypeVar("T")


class Faults(BaseModel):
    """The faults in force; all off by default."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, frozen=True, extra="forbid"
    )

    drop_rate: Rate = 0.0
    duplicate_rate: Rate = 0.0
    delay_seconds: float = Field(default=0.0, ge=0.0, le=600.0)
    reorder: bool = False
    envelope: Envelope = "value"
    webhook_jitter_seconds: float = Field(default=0.0, ge=0.0, le=600.0)
    webhook_concurrency: int = Field(default=1, ge=1, le=32)
    rate_429: Rate = 0.0
    rate_503: Rate = 0.0
    retry_after_seconds: int | None = Field(default=None, ge=0, le=86_400)
    answer_lost_rate: Rate = 0.0
    answer_lost_count: int = Field(default=0, ge=0, le=1_000_000)
    answer_lost_after_seconds: float = Field(default=0.0, ge=0.0, le=600.0)
    latency_ms: int = Field(default=0, ge=0, le=600_000)
    stall_scheduled_rate: Rate = 0.0
    stall_processing_rate: Rate = 0.0
    error_rate: Rate = 0.0
    hold_commit_seconds: float = Field(default=0.0, ge=0.0, le=86_400.0)
    sold_out: tuple[Annotated[str, Field(min_length=1, max_length=20)], ...] = ()
    missing_permissions: bool = False
    seed: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The faults as ``GET /_sandbox/faults`` shows them (camelCase)."""
        return self.model_dump(mode="json", by_alias=True)


class FaultInjector:
    """The faults in force and the one seeded random source that decides them.

    Thread-safe: the API threads, the pipeline and the webhook thread all roll dice here.
    """

    def __init__(self, faults: Faults) -> None:
        self._lock = threading.Lock()
        self._faults = faults
        # Not for secrets: a seedable generator so a test run repeats exactly.
        self._random = random.Random(faults.seed)  # noqa: S311

    @property
    def faults(self) -> Faults:
        """The faults in force now."""
        with self._lock:
            return self._faults

    def update(self, changes: Mapping[str, Any]) -> Faults:
        """Change some faults, keep the rest; reseed when ``changes`` names ``seed``.

        Raises:
            pydantic.ValidationError: a field is unknown or out of range; nothing changes.
        """
        with self._lock:
            current = self._faults.model_dump(by_alias=True)
            merged = Faults.model_validate({**current, **_by_alias(changes)})
            self._faults = merged
            if "seed" in changes:
                self._random.seed(merged.seed)
            return merged

    def roll(self, rate: float) -> bool:
        """True with probability ``rate``; never consumes randomness when the rate is 0."""
        if rate <= 0.0:
            return False
        with self._lock:
            return self._random.random() < rate

    def lose_answer(self) -> bool:
        """Whether to lose the answer of a call that took effect: one of the
        ``answerLostCount`` left (taking it), else with probability ``answerLostRate``."""
        with self._lock:
            faults = self._faults
            if faults.answer_lost_count > 0:
                self._faults = faults.model_copy(
                    update={"answer_lost_count": faults.answer_lost_count - 1}
                )
                return True
            return faults.answer_lost_rate > 0.0 and self._random.random() < faults.answer_lost_rate

    def uniform(self, high: float) -> float:
        """A random number of seconds from 0 to ``high``; no randomness used when it is 0."""
        if high <= 0.0:
            return 0.0
        with self._lock:
            return self._random.uniform(0.0, high)

    def shuffle(self, items: MutableSequence[T]) -> None:
        """Shuffle ``items`` in place with the seeded source."""
        with self._lock:
            self._random.shuffle(items)


def _by_alias(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Field names as the camelCase aliases, so a snake_case key replaces its alias."""
    known = {name: field.alias or name for name, field in Faults.model_fields.items()}
    return {known.get(key, key): value for key, value in changes.items()}
