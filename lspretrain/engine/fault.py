"""Preemption signals and non-finite steps.

``StopRequest``: SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) set a flag (nothing else happens in the
handler); the trainer agrees on it across ranks after each step, so every rank stops after the
same step, saves, and exits with a "preempted" result the launcher can requeue on. A second
Ctrl-C abandons the step at once (KeyboardInterrupt), for a user who will not wait.

``SkipGuard``: counts refused (non-finite) steps and aborts after too many in a row.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
import time

__all__ = ["StopRequest", "SkipGuard", "NonFiniteAbort"]

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class NonFiniteAbort(RuntimeError):
    pass


class StopRequest:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._first_interrupt = float("-inf")
        self._previous: dict = {}

    def request(self, reason: str = "request_stop()") -> None:
        self.requested = True
        self.signal_name = self.signal_name or reason

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            # Under plain torchrun a terminal's Ctrl-C reaches a worker twice (from the terminal
            # and forwarded by torchrun): a repeat within a second is the same keypress.
            if self.requested and time.monotonic() - self._first_interrupt > 1.0:
                raise KeyboardInterrupt
            if not self.requested:
                self._first_interrupt = time.monotonic()
                print("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to abandon it)",
                      file=sys.stderr, flush=True)
        self.request(signal.Signals(signum).name)

    def install(self) -> bool:
        """Install the handlers; only possible from the main thread (a launcher running the
        trainer in a thread installs its own and calls ``Trainer.request_stop()``)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return True

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


class SkipGuard:
    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive = 0

    def update(self, step: int, applied: bool, loss, grad_norm: float) -> None:
        """``loss``: a callable giving the step's loss, read only for a refused step."""
        if applied:
            self.consecutive = 0
            return
        loss = loss()
        self.total += 1
        self.consecutive += 1
        log.warning("step %d skipped: loss=%s grad_norm=%s (%d in a row, %d in total)",
                    step, loss, grad_norm, self.consecutive, self.total)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteAbort(
                f"{self.consecutive} consecutive steps with a non-finite loss or gradient (last at step {step}, "
                f"loss={loss}, grad_norm={grad_norm}); aborting. The last good checkpoint is kept; lower the lr, "
                f"check the data (bad_samples) or raise fault.max_consecutive_skips")

    def state_dict(self) -> dict:
        return {"skipped_total": self.total, "skipped_consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.total = state.get("skipped_total", 0)
        self.consecutive = state.get("skipped_consecutive", 0)
