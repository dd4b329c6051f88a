"""The stall watchdog's clock arithmetic (a run it ends: test_main.py)."""
import threading

from r3jax import watchdog
from r3jax.watchdog import Watchdog


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_only_a_loop_past_its_first_step_is_bounded_and_each_mark_restarts_the_bound():
    clock = Clock()
    watchdog = Watchdog(10, clock)
    clock.now = 100  # start-up and set-up: no loop open
    assert watchdog.stalled() is None
    watchdog.opened("RL mixed")
    clock.now = 200  # the first step compiles: not bounded
    assert watchdog.stalled() is None
    watchdog.progress("RL mixed step 1")
    clock.now = 210
    assert watchdog.stalled() is None  # at the bound, not past it
    clock.now = 210.5
    assert watchdog.stalled() == "RL mixed step 1"
    watchdog.progress("RL mixed step 2")
    watchdog.opened("eval")  # an evaluation inside the loop: its first batch compiles, unbounded
    clock.now = 300
    assert watchdog.stalled() is None
    watchdog.progress("eval batch 1")
    clock.now = 311
    assert watchdog.stalled() == "eval batch 1"
    watchdog.closed("eval")  # its end is progress of the loop around it
    clock.now = 320
    assert watchdog.stalled() is None
    clock.now = 322
    assert watchdog.stalled() == "eval ended"
    watchdog.closed("RL mixed")
    clock.now = 1000  # export, the next phase's set-up: no loop open
    assert watchdog.stalled() is None


def test_a_later_run_in_the_same_process_replaces_the_watch(monkeypatch):
    """`main.run` called again in-process (a notebook) with another timeout, or none, kept the
    first run's watch, which would then end a process whose steps are slow by design."""
    monkeypatch.setattr(watchdog, "_active", None)
    watchdog.start(60)
    first = watchdog._active
    assert first is not None and first.timeout_s == 60
    watchdog.start(0)
    assert watchdog._active is None
    with watchdog.watching("RL mixed"):
        watchdog.progress("RL mixed step 1")
    assert first.loops_stepped == [] and first.what == "start-up"  # no longer told anything
    watchdog.start(30)
    assert watchdog._active is not first and watchdog._active.timeout_s == 30
    before = set(threading.enumerate())
    watchdog.start(0.4)  # polls every 0.1 s
    [thread] = set(threading.enumerate()) - before
    watchdog.start(0)
    thread.join(timeout=2)
    assert not thread.is_alive()  # a replaced watch's thread ends at its next poll
