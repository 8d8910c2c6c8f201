"""Faults: stop signals and fault-injection test hooks (used by engine/trainer.py).

SIGTERM / SIGINT set a flag that the loop checks after each step (``StopSignals``); the loop then
saves a checkpoint and exits cleanly. Non-finite steps are handled in engine/trainer.train_step.

Test hooks, for fault-injection tests only, read from the environment:
``NITP_DEBUG_NAN_STEPS="3,5"`` makes the loss NaN at those (1-based) steps;
``NITP_DEBUG_SIGNAL_AT_STEP="20:KILL"`` (or TERM / INT) makes the process send itself that
signal after step 20 and its checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist


class TrainingDiverged(RuntimeError):
    """--max-bad-steps consecutive steps had a non-finite loss or gradient norm: the run stops.

    Not a ValueError: nothing the user passed is wrong as such. The command line prints it as one line.
    """


class StopSignals:
    """SIGTERM / SIGINT set a flag instead of killing the process; the loop saves and exits.

    A second signal stops at once (KeyboardInterrupt / SystemExit(128 + signal)), so Ctrl-C twice
    still interrupts a step or a save that hangs.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:  # a second signal: stop at once, as without the handler
            self.restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.received = name
        if os.environ.get("RANK", "0") == "0":  # os.write: print() is not reentrant in a handler
            os.write(2, f"received {name}: saving a checkpoint after this step (again: stop now)\n".encode())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self, device: torch.device) -> bool:
        """True on every rank when any rank received a stop signal (one tiny all-reduce)."""
        flag = self.received is not None
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([int(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and self.received is None:
                self.received = "a signal on another rank"
        return flag


def debug_nan_steps() -> set[int]:
    """TEST HOOK: 1-based steps whose loss is made NaN (env NITP_DEBUG_NAN_STEPS="3,5")."""
    text = os.environ.get("NITP_DEBUG_NAN_STEPS", "")
    return {int(s) for s in text.split(",") if s.strip()}


def debug_signal_after(step: int) -> None:
    """TEST HOOK: send this process a signal after ``step`` (env NITP_DEBUG_SIGNAL_AT_STEP="20:KILL")."""
    text = os.environ.get("NITP_DEBUG_SIGNAL_AT_STEP")
    if text:
        at, name = text.split(":")
        if int(at) == step:
            os.kill(os.getpid(), getattr(signal, "SIG" + name))
