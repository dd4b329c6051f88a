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
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from r3jax.errors import InputError, UnreadableFileError


ORBAX_SOURCE = f"{os.sep}orbax{os.sep}"  # in the path of each of orbax's source files


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, asynchronous: bool = True):
        if not getattr(sys.unraisablehook, "drops_checkpoint_echoes", False):
            sys.unraisablehook = _dropping_checkpoint_echoes(sys.unraisablehook)
        logging.getLogger("absl").addFilter(_without_failed_write_traceback)  # a filter already there is not added twice
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
        well as its own. On the storage's failure the manager is closed and CheckpointWriteError
        names the last checkpoint that is whole; any other error is raised as it is."""
        try:
            write()
        except Exception as error:
            if not _is_storage_error(error):  # a state orbax cannot save, say: no disk to make room on
                raise
            _quiet_the_echoes()
            try:
                self.manager.close()
            except Exception:  # the same failure, raised again by the wait for the background save
                pass
            self.manager.reload()
            last = self.manager.latest_step()
            cause = _first_line(error)
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
            raise self._unreadable(step, f"{self.manager.directory}/{step}/meta/metadata", str(error)) from None
        except Exception as error:  # orbax and tensorstore raise ValueError, FileNotFoundError and bare Exception
            _quiet_the_echoes()
            cause = _first_line(error)
            if self._stored_shapes(step) in (None, _shapes(abstract)):
                raise self._unreadable(step, f"checkpoint {self.manager.directory}/{step}", cause) from None
            raise InputError(f"checkpoint {self.manager.directory}/{step} does not match this run's "
                             f"model or optimizer (was the config changed? use a new --workdir): {cause}") from None
        return restored.state, restored.meta

    def _stored_shapes(self, step: int) -> dict[tuple, tuple] | None:
        """The shape of each array in checkpoint `step`'s state by its key path; None when its
        metadata cannot be read."""
        try:
            return _shapes(ocp.StandardCheckpointHandler().metadata(self.manager.directory / str(step) / "state"))
        except Exception:
            return None

    def _unreadable(self, step: int, what: str, cause: str) -> UnreadableFileError:
        """A checkpoint whose files are damaged or cut short (a crash mid-write, a lost file):
        its arrays match this run's, so the way out is the checkpoint before it."""
        earlier = [s for s in self.manager.all_steps() if s < step]
        after = f"resume from step {max(earlier)}" if earlier else "start this phase afresh"
        return UnreadableFileError(f"{what} cannot be read ({cause}), perhaps damaged or cut short by a crash: "
                                   f"delete {self.manager.directory}/{step} to {after}")

    def close(self) -> None:
        self._writing(self.manager.wait_until_finished)
        self.manager.close()


def _root_cause(error: BaseException) -> BaseException:
    """What first went wrong behind an orbax or tensorstore error."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _first_line(error: BaseException) -> str:
    """The first line of `error`'s root cause, without the spec tensorstore appends to it."""
    text = str(root := _root_cause(error)).strip()
    return text.splitlines()[0].split(" [tensorstore_spec=")[0] if text else type(root).__name__


def _is_storage_error(error: BaseException) -> bool:
    """Whether `error`'s root cause is the storage's (a full disk, a file-size limit, a folder made
    read-only): an OSError, or a tensorstore error carrying the OS's error code."""
    root = _root_cause(error)
    return isinstance(root, OSError) or "[os_error_code=" in str(root)


def _shapes(tree: Any) -> dict[tuple, tuple]:
    """The shape of each array leaf in `tree` by its key path, with dict keys, attribute names and
    indices alike, so that a state and orbax's metadata of it (dicts and lists) compare equal."""
    def name(key) -> Any:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                return getattr(key, attribute)
        return str(key)
    return {tuple(map(name, path)): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(leaf, "shape")}


def _dropping_checkpoint_echoes(previous_hook):
    """`previous_hook` without the echoes of a failed save or restore, which the run reports in one
    line: the "Event loop is closed" errors that tensorstore's threads raise after a failed save, one
    per write still in flight, calling back into orbax's closed loop (printed piece by piece from
    those threads, into the middle of the run's closing line), and the errors of orbax's abandoned
    read and write coroutines, one per array, as they are collected."""
    def hook(unraisable) -> None:
        closed_loop = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
        code = getattr(unraisable.object, "cr_code", None)
        if not (closed_loop or ORBAX_SOURCE in getattr(code, "co_filename", "")):
            previous_hook(unraisable)
    hook.drops_checkpoint_echoes = True
    return hook


def _without_failed_write_traceback(record: logging.LogRecord) -> bool:
    """Keeps an orbax log record, without its traceback when it reports a write that failed (a
    full disk): orbax logs one from each of its threads, hundreds of lines of its internals before
    the run's closing line, which names the cause."""
    if record.exc_info and ORBAX_SOURCE in record.pathname and "Error writing" in _first_line(record.exc_info[1]):
        record.exc_info, record.exc_text = None, None
    return True


def _drop_unretrieved_task_errors(record: logging.LogRecord) -> bool:
    """Whether an asyncio log record is not a task's "exception was never retrieved"."""
    return "exception was never retrieved" not in record.getMessage()


def _quiet_the_echoes() -> None:
    """After a failed save or restore, which the run reports in one line: asyncio's report of each
    of orbax's failed tasks, and Python's of each of its read coroutines never awaited, both printed
    as they are collected, after that line."""
    logging.getLogger("asyncio").addFilter(_drop_unretrieved_task_errors)
    warnings.filterwarnings("ignore", message="coroutine '.*' was never awaited", category=RuntimeWarning)


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
