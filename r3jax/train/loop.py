"""The training-loop scaffold SFT and RL share: resume from the last checkpoint, the primary
host's progress bar and metrics writer, periodic evaluation, a stop on a non-finite value,
checkpoints at their interval, on a stop signal and before a failing step's error ends the run,
and the phase's curves at the end. A phase supplies only its step, `(state, meta) -> (state, meta,
record)`, where `meta` holds the host-side facts a checkpoint keeps beside the state (at least
`step`)."""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable, NamedTuple

import jax
from tqdm import tqdm

from r3jax import sharding, watchdog
from r3jax.checkpoint import CheckpointWriteError, Checkpointer, NonFiniteError, StopSignal, check_finite
from r3jax.metrics import MetricsWriter, plot_curves, plot_heatmap, read_jsonl
from r3jax.settings import Settings

Meta = dict[str, Any]

UNIT_WORDS = {"step": "steps", "tok": "sampled tokens"}  # a progress bar's unit, in words


@dataclasses.dataclass(frozen=True)
class Phase:
    """How a phase runs: where it writes and how often it evaluates and checkpoints."""
    name: str                         # "SFT", "RL mixed": progress bar, messages and plot title
    workdir: str                      # holds checkpoints/, <log>.jsonl, tensorboard/ and the curves PNG
    log: str                          # the metrics log's name ("sft", "rl")
    checkpoint_every: int
    keep: int                         # checkpoints kept
    eval_every: int = 0               # 0: never
    eval_at_end: bool = False         # with eval_every, also after the last step (a model selection needs it)
    finite_keys: tuple[str, ...] = ()  # a non-finite value of any of these stops the run
    progress_bar: tuple[tuple[str, str], ...] = ()  # (label, record key) shown beside the bar
    plot_keys: tuple[str, ...] | None = None  # curves of these keys (None: the plot's defaults)
    heatmap: str = ""  # a prefix whose `<prefix>/stage_<j>` keys are also drawn as a stage x step heat-map


class Hooks(NamedTuple):
    """What a phase does: its step, when it is done, where its progress bar stands, and its
    periodic evaluation."""
    step: Callable[[Any, Meta], tuple[Any, Meta, dict]]  # (state, meta) -> (state, meta, record)
    done: Callable[[Meta], bool]
    position: Callable[[Meta], tuple[int, int, str]]  # the progress bar's (done, total, unit)
    # (state, meta) -> (the evaluation's record entries, a few evaluated samples, the meta to keep)
    evaluate: Callable[[Any, Meta], tuple[dict, list[dict], Meta]] | None = None


def _save_before_failing(name: str, checkpointer: Checkpointer, state: Any, meta: Meta) -> None:
    """Keeps the last finished step when a step raises (a user's reward function, say): saved, unless
    it is saved already, is step 0, or its arrays went to the failing call (donated). One process
    only: in a multi-host run the other processes would wait in the save's barrier."""
    step = meta["step"]
    donated = any(leaf.is_deleted() for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array))
    if jax.process_count() > 1 or step == 0 or donated or checkpointer.latest_step() == step:
        return
    try:
        checkpointer.save(step, state, meta)
        checkpointer.close()
    except Exception as error:  # the step's own error is the one to raise
        tqdm.write(f"{name}: step {step + 1} failed, and saving step {step} failed too: {error}", file=sys.stderr)
        return
    tqdm.write(f"{name}: step {step + 1} failed; saved step {step}, where a rerun resumes", file=sys.stderr)


def _stop_agreed(stop: StopSignal) -> bool:
    """Whether any process was asked to stop: a preemption notice can reach one host alone, and a
    process that stopped and saved alone would wait in the save for the others' next step."""
    return bool(sharding.processes_where(stop.requested))


def run(phase: Phase, settings: Settings, state: Any, meta: Meta, hooks: Hooks, stop: StopSignal) -> tuple[Any, Meta, bool]:
    """Runs (or resumes) a phase from `state` and `meta` (or from its last checkpoint) until
    `hooks.done(meta)` or a stop signal. Returns (state, meta, finished): finished is False when a
    signal stopped it."""
    step_fn, done, position, evaluate_fn = hooks
    checkpointer = Checkpointer(os.path.join(phase.workdir, "checkpoints"), keep=phase.keep)
    restored = checkpointer.latest_step() is not None
    if restored:
        state, meta = checkpointer.restore(checkpointer.latest_step(), state)
    now, total, unit = position(meta)
    if restored and sharding.is_primary():
        print(f"{phase.name}: " + (f"finished at step {meta['step']}; nothing to add" if done(meta) else
                                   f"resuming at step {meta['step']} ({now:,} of {total:,} {UNIT_WORDS[unit]})"))
    writer = MetricsWriter(phase.workdir, phase.log, meta["step"], settings.metrics, settings.config.to_dict())
    with tqdm(total=total, initial=min(now, total), desc=phase.name, unit=unit,
              disable=not sharding.is_primary()) as bar, watchdog.watching(phase.name):
        stopping = _stop_agreed(stop)
        try:
            while not done(meta) and not stopping:
                checkpointer.check()  # a background save that failed stops the run here, not steps later
                next_state, next_meta, record = step_fn(state, meta)
                step = next_meta["step"]
                due = phase.eval_every and (step % phase.eval_every == 0 or (phase.eval_at_end and done(next_meta)))
                if evaluate_fn and due:
                    evaluated, samples, next_meta = evaluate_fn(next_state, next_meta)
                    record.update(evaluated)
                    writer.write_samples(step, samples)
                check_finite(record, phase.finite_keys, phase.name.split()[0], step, checkpointer)
                writer.write(step, record)
                watchdog.progress(f"{phase.name} step {step}")
                state, meta = next_state, next_meta  # logged: a step a failure may save
                later, _, _ = position(meta)
                bar.update(later - now)
                now = later
                bar.set_postfix({label: f"{record[key]:.3f}" for label, key in phase.progress_bar if key in record})
                stopping = _stop_agreed(stop)
                if step % phase.checkpoint_every == 0 or stopping:
                    checkpointer.save(step, state, meta)
        except Exception as error:
            if not isinstance(error, (NonFiniteError, CheckpointWriteError)):
                _save_before_failing(phase.name, checkpointer, state, meta)
            raise
    finished = not stopping
    if finished and checkpointer.latest_step() != meta["step"]:
        checkpointer.save(meta["step"], state, meta)
    checkpointer.close()
    writer.close()
    if sharding.is_primary():
        records = read_jsonl(writer.path)
        plot_curves(records, os.path.join(phase.workdir, f"{phase.log}_curves.png"),
                    *((phase.plot_keys,) if phase.plot_keys else ()), title=phase.name)
        if phase.heatmap and any(k.startswith(phase.heatmap + "/") for r in records for k in r):
            plot_heatmap(records, os.path.join(phase.workdir, f"{phase.log}_{phase.heatmap}.png"), phase.heatmap,
                         f"{phase.name}: {phase.heatmap} per stage")
    return state, meta, finished
