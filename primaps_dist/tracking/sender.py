"""The background thread that delivers the journal to MLflow, so that no log call waits for the server.

The training thread only appends: :meth:`BackgroundSender.submit` puts a record into the in-memory queue
and the on-disk journal under one lock (no network). The ``primaps-mlflow-delivery`` thread sends what is
pending when it is due: at once for run creation, params, tags, artifacts and the end; metrics as one batch
at most every ``flush_interval_s`` (sooner when a full batch waits). While MLflow is unreachable it retries
with exponential backoff and the records stay in the journal. :meth:`BackgroundSender.close` flushes with
a bounded wait; whatever is still undelivered then stays in the journal for the next start or a replay.
"""

from __future__ import annotations

import json
import threading
import time

from primaps_dist.tracking.common import MAX_METRICS_PER_BATCH, REJECTED_NAME, ErrorReporter, logger, short
from primaps_dist.tracking.delivery import Delivery, Unreachable
from primaps_dist.tracking.journal import Spool

# A retry delay of 0 must not turn the thread into a busy loop.
MIN_RETRY_S = 0.01
# While closing, an unreachable server is retried at least this often (the backoff may be a minute).
CLOSING_RETRY_S = 1.0
# close() always waits this long for the attempt it starts, even with a zero timeout (a refused
# connection answers in milliseconds; a server that does not answer at all cannot hold it longer).
CLOSE_MIN_WAIT_S = 5.0


class BackgroundSender:
    """Sends the records of one journal through ``delivery`` on a daemon thread, in logging order."""

    def __init__(self, delivery: Delivery, spool: Spool, errors: ErrorReporter, *, flush_interval_s: float,
                 retry_initial_s: float, retry_max_s: float):
        self.delivery = delivery
        self.spool = spool
        self.errors = errors
        self.flush_interval_s = flush_interval_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self._cond = threading.Condition()
        self._pending: list[dict] = []
        self._urgent = False  # a record other than metrics waits: send without waiting for the interval
        self._forced = False  # send now, ignoring interval and backoff
        self._closing = False
        self._stopped = False
        self._busy = False
        self._attempts_started = 0
        self._attempts_done = 0
        self._journal_incomplete = False  # an append failed: the next rewrite repairs the journal
        self._unreachable = False
        self._offline = False
        self._retry_delay_s = retry_initial_s
        self._next_retry = 0.0
        self._last_flush = time.monotonic()
        self._reported_rejections = 0
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------- state

    @property
    def offline(self) -> bool:
        """True from a failed delivery until every journaled record has been delivered."""
        return self._offline

    # ----------------------------------------------------------------------------------- training thread

    def start(self, backlog: list[dict]) -> None:
        """Take over ``backlog`` (records a previous process left in the journal) and start the thread."""
        with self._cond:
            self._pending = list(backlog) + self._pending
            self._urgent = self._urgent or bool(backlog)
        self._thread = threading.Thread(target=self._run, name="primaps-mlflow-delivery", daemon=True)
        self._thread.start()

    def submit(self, record: dict) -> None:
        """Journal ``record`` and queue it for the thread. Never touches the network."""
        if record["kind"] == "artifact" and self._unreachable:  # copy now: the file may change before a retry
            record = self.errors.run(lambda: self.spool.stashed(record)) or record
        with self._cond:
            was_empty = not self._pending
            # in memory first: a journal that cannot be written must not block delivery
            self._pending.append(record)
            if self.errors.run(lambda: self.spool.append([record]) or True) is None:
                self._journal_incomplete = True
            self._urgent = self._urgent or record["kind"] != "metrics"
            if was_empty or self._urgent or len(self._pending) >= MAX_METRICS_PER_BATCH:
                self._cond.notify_all()

    def wait_until_idle(self, timeout_s: float) -> bool:
        """Wait until what is pending now went through a delivery attempt (sent, or failed and waiting).

        Nothing is forced: batching interval and backoff apply, so this returns as soon as no attempt is in
        flight and none is due within ``timeout_s``. Returns False when ``timeout_s`` passed first.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            need = self._attempts_started + 1
            while self._pending and self._attempts_done < need:
                due_at = self._due_at()
                if not self._busy and (due_at is None or due_at > deadline):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self, timeout_s: float) -> int:
        """Send everything pending, then stop the thread; returns how many records stay in the journal.

        Tries at once (ignoring the backoff), then every ``CLOSING_RETRY_S`` at most, until everything is
        delivered or ``timeout_s`` has passed and at least one attempt has ended. Never waits longer than
        ``max(timeout_s, CLOSE_MIN_WAIT_S)``: an attempt still hanging then is left to the daemon thread,
        and its records stay in the journal.
        """
        begin = time.monotonic()
        deadline, hard_deadline = begin + timeout_s, begin + max(timeout_s, CLOSE_MIN_WAIT_S)
        with self._cond:
            self._closing = True
            self._forced = True
            need = self._attempts_started + 1
            self._cond.notify_all()
            while self._pending and self._thread is not None:
                now = time.monotonic()
                if now >= hard_deadline or (now >= deadline and self._attempts_done >= need):
                    break
                self._cond.wait((deadline if self._attempts_done >= need else hard_deadline) - now)
            self._stopped = True
            self._cond.notify_all()
            return len(self._pending)

    # ----------------------------------------------------------------------------------- delivery thread

    def _due_at(self) -> float | None:
        """When (``time.monotonic()``) the thread should send next; None: nothing to send (lock held)."""
        if self._stopped or not self._pending:
            return None
        if self._forced:
            return 0.0
        if self._unreachable:
            return self._next_retry
        if self._urgent or len(self._pending) >= MAX_METRICS_PER_BATCH:
            return 0.0
        return self._last_flush + self.flush_interval_s

    def _due(self) -> bool:
        due_at = self._due_at()
        return due_at is not None and time.monotonic() >= due_at

    def _sleep_s(self) -> float | None:
        """How long the thread may sleep before something becomes due (None: until notified)."""
        due_at = self._due_at()
        return None if due_at is None else max(0.0, due_at - time.monotonic())

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due():
                    if self._stopped:
                        return
                    self._cond.wait(self._sleep_s())
                batch = list(self._pending)
                self._urgent = self._forced = False
                self._busy = True
                self._attempts_started += 1
                self._last_flush = time.monotonic()
            try:
                self.errors.run(lambda: self._attempt(batch))
            finally:
                with self._cond:
                    self._busy = False
                    self._attempts_done += 1
                    self._cond.notify_all()

    def _attempt(self, batch: list[dict]) -> None:
        """Deliver ``batch`` (the front of the queue) and update queue, journal and outage state."""
        try:
            delivered = self.delivery.deliver(batch)
        except Exception as failure:  # noqa: BLE001 - anything but a refusal counts as an outage
            err = failure if isinstance(failure, Unreachable) else Unreachable(failure, 0)
            # Artifacts may change or vanish before the server is back: keep copies of the waiting ones.
            waiting = [self.errors.run(lambda r=r: self.spool.stashed(r)) or r for r in batch[err.delivered:]]
            copied = any(new is not old for new, old in zip(waiting, batch[err.delivered:]))
            with self._cond:
                self._pending = waiting + self._pending[len(batch):]
                if err.delivered or copied or self._journal_incomplete:
                    self._rewrite_journal()
                self._note_failure(err)
            return
        with self._cond:
            self._pending = self._pending[len(batch):]
            self._rewrite_journal()
            if self._unreachable:
                logger.warning("MLflow at %s is reachable again; sent %d spooled records",
                               self.delivery.tracking_uri, delivered)
            self._unreachable = False
            self._offline = bool(self._pending) and self._offline
            self._retry_delay_s = self.retry_initial_s
        self._report_rejections()

    def _rewrite_journal(self) -> None:
        if self.errors.run(lambda: self.spool.rewrite(self._pending) or True):
            self._journal_incomplete = False

    def _note_failure(self, err: Unreachable) -> None:
        if not self._unreachable:
            self._unreachable = self._offline = True
            self._retry_delay_s = self.retry_initial_s
            logger.warning(
                "MLflow at %s is unreachable (%s); training continues, records are kept in %s and sent "
                "when it is back", self.delivery.tracking_uri, short(err.cause, 160), self.spool.path,
            )
        else:
            self._retry_delay_s = min(self._retry_delay_s * 2, self.retry_max_s)
        delay = max(self._retry_delay_s, MIN_RETRY_S)
        self._next_retry = time.monotonic() + (min(delay, CLOSING_RETRY_S) if self._closing else delay)

    def _report_rejections(self) -> None:
        rejected = self.delivery.rejected
        if len(rejected) <= self._reported_rejections:
            return
        path = self.spool.directory / REJECTED_NAME
        with open(path, "a") as handle:
            for record, reason in rejected[self._reported_rejections:]:
                handle.write(json.dumps({"record": record, "reason": reason}) + "\n")
        if self._reported_rejections == 0:
            logger.warning("MLflow refused a record (%s); refused records are kept in %s", rejected[0][1], path)
        self._reported_rejections = len(rejected)
