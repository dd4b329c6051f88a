"""Orbax checkpoints: asynchronous, keep-N, atomic; state pytree plus a JSON of host-side facts
(step, tokens sampled, data position). RNG keys are derived from (seed, step), so the step is
all a resumed run needs to draw the same data and samples."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from r3jax.errors import InputError, UnreadableFileError


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, asynchronous: bool = True):
        if not getattr(sys.unraisablehook, "drops_closed_loop_echoes", False):
            sys.unraisablehook = _dropping_closed_loop_echoes(sys.unraisablehook)
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory), item_names=("state", "meta"),  # orbax needs absolute paths
            options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                 enable_async_checkpointing=asynchronous))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        self._writing(lambda: self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True))

    def check(self) -> None:
        """Raises CheckpointWriteError if a save that ran in the background failed."""
        if not self.manager.is_saving_in_progress():  # then the wait returns at once, or raises the failure
            self._writing(self.manager.wait_until_finished)

    def _writing(self, write) -> None:
        """Runs `write`, where orbax raises a background save's failure (a full disk, say) as
        well as its own. On failure the manager is closed and CheckpointWriteError names the
        last checkpoint that is whole."""
        try:
            write()
        except Exception as error:
            logging.getLogger("asyncio").addFilter(_drop_unretrieved_task_errors)
            try:
                self.manager.close()
            except Exception:  # the same failure, raised again by the wait for the background save
                pass
            self.manager.reload()
            last = self.manager.latest_step()
            cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointWriteError(
                f"{self.manager.directory}: a checkpoint could not be written ({cause}); "
                + (f"the last whole one is step {last}" if last is not None else "none is whole yet")
                + ": make room (or fix the folder) and rerun the same command to resume") from error

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """Restores onto the shardings and dtypes of `like` (arrays or ShapeDtypeStructs)."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except json.JSONDecodeError as error:
            raise UnreadableFileError(
                f"{self.manager.directory}/{step}/meta/metadata cannot be read ({error}), perhaps cut short by a "
                f"crash: delete {self.manager.directory}/{step} to resume from the checkpoint before it") from None
        except ValueError as error:
            raise InputError(f"checkpoint {self.manager.directory}/{step} does not match this run's "
                             f"model or optimizer (was the config changed? use a new --workdir): "
                             f"{str(error).splitlines()[0]}") from None
        return restored.state, restored.meta

    def close(self) -> None:
        self._writing(self.manager.wait_until_finished)
        self.manager.close()


def _dropping_closed_loop_echoes(previous_hook):
    """`previous_hook` without the "Event loop is closed" errors that tensorstore's threads raise
    after a failed save, one per write still in flight, calling back into orbax's closed loop. They
    are printed piece by piece from those threads, into the middle of the run's closing line."""
    def hook(unraisable) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous_hook(unraisable)
    hook.drops_closed_loop_echoes = True
    return hook


def _drop_unretrieved_task_errors(record: logging.LogRecord) -> bool:
    """A logging filter for after a failed save: asyncio reports each of orbax's failed write
    tasks again as it is collected, hundreds of tracebacks after the run's closing line."""
    return "exception was never retrieved" not in record.getMessage()


def latest_step(directory: str) -> int | None:
    """The step of the newest finished checkpoint in `directory`, None if there is none."""
    checkpointer = Checkpointer(directory, asynchronous=False)
    step = checkpointer.latest_step()
    checkpointer.close()
    return step


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the run stops rather than train on unsaved."""


class NonFiniteError(RuntimeError):
    """A loss or reward went NaN or infinite; the step's state was not saved."""


def check_finite(record: dict, keys: tuple[str, ...], phase: str, step: int, checkpointer: Checkpointer) -> None:
    """Stops the run at the first non-finite value of `keys` in a step's record, before that
    step's state is saved, naming the step and the checkpoint a rerun resumes from."""
    bad = [key for key in keys if key in record and not math.isfinite(record[key])]
    if bad:
        checkpointer.close()
        last = checkpointer.latest_step()
        raise NonFiniteError(f"{phase} step {step}: {', '.join(f'{k} = {record[k]}' for k in bad)}; stopped "
                             + (f"with the last good checkpoint at step {last}" if last is not None
                                else "before any checkpoint was written"))


class StopSignal:
    """Set by SIGTERM (preemption) or SIGINT; loops save a checkpoint and return when set. A second
    signal stops the process at once, as without this handler (an evaluation or a long step
    would otherwise hold it for minutes)."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.requested:
            self.restore()
            signal.raise_signal(signum)
            return
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step, which is then saved; "
              "signal again to stop at once", file=sys.stderr)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
