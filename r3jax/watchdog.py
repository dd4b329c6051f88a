"""Ends a run whose steps stopped finishing (`config.stall_timeout_s`): a reward function or a
service it calls that hangs, or a process waiting in a collective for a peer that is alive but
stuck, which no heartbeat catches (jax#38503). The training loops and the evaluator say when they
start, finish each step or batch, and end; a thread checks that, once a loop has finished its first
step (which compiles), no more than the timeout passes before its next step or its end, and
otherwise ends the process in one line, so that an orchestrator can restart the run from its last
checkpoint."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Callable, Iterator

EXIT_STALLED = 124  # as timeout(1)


class Watchdog:
    """The time of the last progress (monotonic seconds), what it was, and the open loops, innermost
    last, each with whether it has finished a step; `stalled()` says whether the timeout has passed
    since, in a loop that has."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self.timeout_s, self.clock = timeout_s, clock
        self.loops_stepped: list[bool] = []
        self.last, self.what = clock(), "start-up"
        self.lock = threading.Lock()

    def opened(self, what: str) -> None:
        with self.lock:
            self.loops_stepped.append(False)
            self.last, self.what = self.clock(), f"{what} started"

    def progress(self, what: str) -> None:
        with self.lock:
            if self.loops_stepped:
                self.loops_stepped[-1] = True
            self.last, self.what = self.clock(), what

    def closed(self, what: str) -> None:
        with self.lock:
            self.loops_stepped.pop()
            self.last, self.what = self.clock(), f"{what} ended"

    def stalled(self) -> str | None:
        """What the run last finished, if that was longer than the timeout ago in a loop past its first step."""
        with self.lock:
            late = self.loops_stepped and self.loops_stepped[-1] and self.clock() - self.last > self.timeout_s
            return self.what if late else None


_active: Watchdog | None = None


def start(timeout_s: float) -> None:
    """Watches this process from now on, in place of an earlier run's watch (`main.run` in-process):
    past `timeout_s` seconds without progress in an open loop, prints one line and exits with
    EXIT_STALLED. 0: no watch."""
    import jax

    global _active
    _active = None
    if timeout_s <= 0:
        return
    watchdog = _active = Watchdog(timeout_s)
    prefix = f"process {jax.process_index()} of {jax.process_count()}: " if jax.process_count() > 1 else ""

    def watch() -> None:
        while (last := watchdog.stalled()) is None:
            time.sleep(min(5.0, timeout_s / 4))
            if _active is not watchdog:  # a later run's watch replaced it
                return
        print(f"\nerror: {prefix}nothing finished for {timeout_s:g} s since {last} (stall_timeout_s): a reward function "
              "or a service that hangs, or a stuck process of the run; ended so that a rerun of the same command "
              f"resumes from the last checkpoint (exit status {EXIT_STALLED})", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_STALLED)  # the main thread is what is stuck

    threading.Thread(target=watch, name="r3jax-watchdog", daemon=True).start()


@contextlib.contextmanager
def watching(what: str) -> Iterator[None]:
    """A loop (`what`: its name) whose steps `progress` marks: from its first step's mark to its
    end, the time between two marks is what the watchdog bounds."""
    if _active is None:
        yield
        return
    _active.opened(what)
    try:
        yield
    finally:
        _active.closed(what)


def progress(what: str) -> None:
    """Marks a finished step or batch (`what`, e.g. "RL mixed step 12")."""
    if _active is not None:
        _active.progress(what)
