"""The outage journal: records queue in memory and one background thread sends them.

Every logging call on the training thread only appends a record to the journal; the thread sends
it through a `Sender`, merging metric records into batches. While the store is unreachable or
slow, records stay queued and the thread retries with exponential backoff, so training neither
blocks nor crashes; `close` hands back what is still unsent, for the fallback file.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from train.tracking.config import TrackingConfig
from train.tracking.fallback import write_fallback

log = logging.getLogger(__name__)


def now_ms() -> int:
    """Wall-clock time in milliseconds, MLflow's metric timestamp."""
    return int(time.time() * 1000)


class Worker:
    """Owns the journal and the thread that drains it through a `Sender`."""

    def __init__(self, cfg: TrackingConfig, uri: str, handle: str, records: list[dict],
                 carried: int, fallback: Path):
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH
        self.cfg = cfg
        self.handle = handle  # the live session's handle; system metrics go to its run
        self.uri = uri
        self.fallback = fallback
        self.batch = MAX_METRICS_PER_BATCH  # records that make a request worth sending early
        self._cond = threading.Condition()
        self._pending = records
        self._carried = carried  # leading records that came from the fallback file
        self._sender = None
        self._stop = False
        self._abandoned = False
        self._busy = False
        self._wake = False
        self._journaled = False  # flush wrote the fallback file during this session
        self.failing: str | None = None  # why the last attempt failed; None while healthy
        self.latest_step: int | None = None
        self._system = None
        if cfg.system_metrics:
            from train.tracking.system import SystemSampler
            self._system = SystemSampler()  # here, on the trainer's thread: it reads its CUDA device
        self._thread = threading.Thread(target=self._loop, name="mlflow-tracker", daemon=True)
        self._thread.start()

    def submit(self, rec: dict) -> None:
        with self._cond:
            self._pending.append(rec)
            # a full batch goes out before the flush interval, unless the store is failing
            if len(self._pending) >= self.batch and self.failing is None:
                self._cond.notify()

    def run_id(self, handle: str) -> str | None:
        return self._sender.run_id(handle) if self._sender else None

    def wait_started(self, handle: str, timeout: float) -> None:
        """Wait until `handle` is attached to a run or an attempt to reach the store failed."""
        deadline = time.monotonic() + timeout
        while self.run_id(handle) is None and self.failing is None and time.monotonic() < deadline:
            time.sleep(0.02)

    def flush(self) -> None:
        """Wait until everything queued is sent, unless the store is failing (then return);
        at most `close_timeout_s`. While it is failing, what is unsent is journaled to the
        fallback file as well, so that a SIGKILL after this point (the trainer flushes before
        each checkpoint) loses no record that the checkpoint's position has passed."""
        with self._cond:
            self._wake = True
            self._cond.notify()
            self._cond.wait_for(lambda: (not self._pending and not self._busy and not self._wake)
                                or self.failing is not None, timeout=self.cfg.close_timeout_s)
            pending, failing = list(self._pending), self.failing
        if pending and failing is not None:
            write_fallback(self.fallback, self._sender.unsent(pending) if self._sender else pending)
            self._journaled = True
        elif not pending and self._journaled:  # the store took it all since: the journal is stale
            self.fallback.unlink(missing_ok=True)
            self._journaled = False

    def close(self) -> int:
        """Stop the thread after a last attempt (at most `close_timeout_s`); save what is still
        unsent to the fallback file (replacing it) and return how many records that is."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(self.cfg.close_timeout_s)
        with self._cond:
            self._abandoned = True  # a thread stuck in a request must not send any more
            remaining = list(self._pending)
            self._pending.clear()
        if not remaining:
            if self._journaled:
                self.fallback.unlink(missing_ok=True)
            return 0
        unsent = self._sender.unsent(remaining) if self._sender else remaining
        write_fallback(self.fallback, unsent)
        return len(unsent)

    def _loop(self) -> None:
        backoff = 1.0
        next_sample = time.monotonic()
        while True:
            with self._cond:
                if self.failing:  # back off; only close or flush cut the wait short
                    self._cond.wait_for(lambda: self._stop or self._wake, timeout=backoff)
                elif not (self._stop or self._wake or len(self._pending) >= self.batch):
                    self._cond.wait(self.cfg.flush_interval_s)
                stopping = self._stop
                self._wake = False
                self._busy = True
            if self._system is not None and time.monotonic() >= next_sample:
                next_sample = time.monotonic() + self.cfg.system_metrics_interval_s
                self._sample_system()
            ok = self._drain()
            with self._cond:
                self._busy = False
                self._cond.notify_all()
            backoff = 1.0 if ok else min(2 * backoff, self.cfg.retry_max_backoff_s)
            if stopping or self._abandoned:
                return

    def _sample_system(self) -> None:
        """Queue one system-metrics sample at the latest training step (none before the first)."""
        if self.latest_step is None:
            return
        try:
            metrics = self._system.sample()
        except Exception as e:  # a sensor failing must not take the logging down
            log.warning("system metrics disabled: %s: %s", type(e).__name__, e)
            self._system = None
            return
        with self._cond:
            self._pending.append({"op": "metrics", "handle": self.handle, "step": self.latest_step,
                                  "ts": now_ms(), "metrics": metrics})

    def _drain(self) -> bool:
        """Send until the journal is empty (True) or the store fails (False)."""
        try:
            if self._sender is None:
                from train.tracking.sender import Sender
                self._sender = Sender(self.uri)
            while True:
                with self._cond:
                    if self._abandoned or not self._pending:
                        break
                    batch = self._pending[:4 * self.batch]
                n = self._sender.send_next(batch)
                with self._cond:
                    del self._pending[:n]
                if self._carried:
                    self._carried = max(0, self._carried - n)
                    if self._carried == 0:  # the previous session's leftovers are all in
                        self.fallback.unlink(missing_ok=True)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            if self.failing is None:
                log.warning("MLflow at %s is not taking records (%s); %d queued, retrying in the "
                            "background", self.uri, reason.splitlines()[0][:300], len(self._pending))
            self.failing = reason
            return False
        if self.failing is not None:
            log.warning("MLflow at %s is back; queued records sent", self.uri)
            self.failing = None
        return True
