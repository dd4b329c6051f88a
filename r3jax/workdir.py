"""A workdir belongs to the config that made it (its `config.json`). A rerun under a config that
differs is refused (unless that run made nothing but the config.json), one line per differing key, unless `config.resume` says what to do; a rerun
that only extends a finished phase (more SFT steps, a bigger RL budget, more comparison seeds or
arms) continues it."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from typing import Any

from r3jax.config import base_config, flatten
from r3jax import files
from r3jax.errors import ConfigError, UnreadableFileError

# keys that change only what is evaluated, logged or kept: results are recomputed under them
NOT_DEFINING = ("eval.", "metrics.", "checkpoint.keep", "resume", "compile_cache", "compare.output", "compare.samples",
                "compare.sample_problems", "sft.checkpoint_every", "rl.checkpoint_every", "runtime.",
                "stall_timeout_s")
# keys whose growth extends a finished phase, and the phase each extends
EXTENDING = {"sft.steps": "sft", "sft.data_epochs": "sft", "rl.steps": "rl", "rl.token_budget": "rl",
             "rl.data_epochs": "rl", "compare.seeds": "compare", "compare.arms": "compare",
             "compare.tune_lr": "compare", "compare.tune_kl_coef": "compare", "compare.tune_continued_lr": "compare"}
TRAINING_MODES = ("train", "sft", "rl")  # phases of one workdir: one may follow another


LOCK = ".lock"
_held_locks: list = []  # their open files: a POSIX lock lasts while its process keeps the file open


def lock(workdir: str) -> str | None:
    """Locks `<workdir>/.lock` for the rest of this process; returns who holds it instead, or None
    when this process now does. A POSIX record lock: released when its process ends, however it
    ends (no stale lock after a kill), and seen by other hosts on NFS."""
    handle = open(os.path.join(workdir, LOCK), "a+")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        return holder
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    handle.flush()
    _held_locks.append(handle)
    return None


def _json_form(config) -> dict[str, Any]:
    """The flattened config as config.json stores it (tuples as lists)."""
    as_dict = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else config
    return flatten(as_dict)


def defining_values(config, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keys that define what a run trains, with their values."""
    return {key: value for key, value in _json_form(config).items()
            if not key.startswith(NOT_DEFINING + ignore)}


def _digest(value) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:10]


def unit_key(config, *parts, ignore: tuple[str, ...] = ()) -> str:
    """A short hash of the defining values (without `ignore`) and `parts`: the name of a cached
    trained unit."""
    return _digest([defining_values(config, ignore), parts])


def evaluation_key(config) -> str:
    """A short hash of what an evaluation reads (eval.*, the sampled metrics' settings)."""
    return _digest({key: value for key, value in _json_form(config).items()
                    if key.startswith(("eval.", "compare.samples", "compare.sample_problems"))})


def _extends(key: str, old, new) -> bool:
    if isinstance(old, list) and isinstance(new, list):
        return set(map(str, old)) <= set(map(str, new))
    return isinstance(old, (int, float)) and isinstance(new, (int, float)) and new >= old


def stored_values(stored: dict) -> dict[str, Any]:
    """The defining values of a stored config.json; a key it lacks (written before the key
    existed) counts as its default."""
    return {**defining_values(base_config()), **defining_values(stored)}


def differences(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(conflicting keys, extending keys) between the stored (`stored_values`) and the new
    (`defining_values`) values."""
    conflicts, extending = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key == "mode" and old.get(key) in TRAINING_MODES and new.get(key) in TRAINING_MODES:
            continue
        if key in EXTENDING and key in old and key in new and _extends(key, old[key], new[key]):
            extending.append(key)
        else:
            conflicts.append(key)
    return conflicts, extending


def _aside(path: str, label: str, primary: bool) -> str:
    """Renames `path` to the first free `<path>.<label>-<n>` (on the primary process); returns
    the new name."""
    n = 1
    while os.path.exists(f"{path}.{label}-{n}"):
        n += 1
    if primary:
        shutil.move(path, f"{path}.{label}-{n}")
    return f"{path}.{label}-{n}"


def claim(workdir: str, config, primary: bool = True) -> list[str]:
    """Checks `workdir` against the config stored there and prepares it (the primary process moves
    what is replaced aside); returns what to tell the user. Raises ConfigError listing every
    differing key when the configs conflict and `config.resume` is empty."""
    stored_path = os.path.join(workdir, "config.json")
    if not os.path.exists(stored_path):
        return []
    try:
        stored = files.read_json(stored_path, "rerun with --config.resume=restart to move this workdir aside, "
                                              "or give another --workdir")
    except UnreadableFileError:
        if config.resume != "restart":
            raise
        return [f"resume=restart: {stored_path} was unreadable; moved the old workdir to "
                f"{_aside(workdir, 'old', primary)}"]
    old, new = stored_values(stored), defining_values(config)
    conflicts, extending = differences(old, new)
    # hidden files are a crashed write's temp file or a start-up's shared-folder marker
    if conflicts and [name for name in os.listdir(workdir) if not name.startswith(".")] == ["config.json"]:
        return [f"{stored_path} was all an earlier run left (it stopped before making anything): "
                "running under the new config"]
    described = [f"  {key}: {old.get(key, '(absent)')!r} there, {new.get(key, '(absent)')!r} now"
                 for key in conflicts + extending]
    if conflicts and not config.resume:
        sft_model = os.path.join(workdir, "sft", "best")
        other_rl = ([f"(RL alone differs: --config.mode=rl --config.rl.init={sft_model} in another --workdir "
                     "trains it from this workdir's SFT model)"]
                    if all(key.startswith("rl.") for key in conflicts) and os.path.isdir(sft_model) else [])
        raise ConfigError("\n".join([f"--workdir={workdir} was made by a different config:", *described,
                                     "give another --workdir, or --config.resume=continue (keep its checkpoints, "
                                     "run under the new config) or --config.resume=restart (move it aside)",
                                     *other_rl]))
    if config.resume == "restart" and (conflicts or extending):
        return [f"resume=restart: moved the old workdir to {_aside(workdir, 'old', primary)}"]
    messages = []
    if conflicts:
        messages.append("resume=continue: running under the new config, keeping the workdir's checkpoints:")
        messages += described[:len(conflicts)]
    for key in extending:
        messages.append(f"extending: {key} {old[key]!r} -> {new[key]!r}")
    if any(EXTENDING[key] == "sft" for key in extending) and os.path.exists(os.path.join(workdir, "rl")):
        moved = _aside(os.path.join(workdir, "rl"), "before-sft-extension", primary)
        messages.append(f"the RL phase was trained from the shorter SFT: moved to {moved}")
    return messages
