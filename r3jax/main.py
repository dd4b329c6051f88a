"""CLI: python -m r3jax.main --config=configs/arith.py [--config.a.b=value ...] [--workdir=DIR] [--mode=M]

Bad input (unknown key, wrong type, missing model or data file) prints one line naming it and
exits with status 2.
"""
from __future__ import annotations

import difflib
import json
import os
import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, logs and results go "
                               "(default: runs/<config name>)")
_MODE = flags.DEFINE_string("mode", None, "overrides config.mode: train, sft, rl, eval, compare")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "multi-host: join the other processes (TPU pods "
                                 "and SLURM discover the rest; elsewhere give the three flags below)")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "multi-host: coordinator host:port")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _config_file(argv: list[str]) -> str | None:
    """The --config flag's value as given, `path[:argument]`."""
    value = None
    for i, arg in enumerate(argv):  # the last one counts, as in absl
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _config_keys(config, prefix: str = "") -> list[str]:
    keys = []
    for name, value in config.items():
        keys.append(prefix + name)
        if hasattr(value, "items"):
            keys += _config_keys(value, f"{prefix}{name}.")
    return keys


def _explain_override_failure(argv: list[str]) -> str | None:
    """One line for the commonest failures to load: a missing config file, an unknown key."""
    value = _config_file(argv)
    if value is None:
        return None
    path, _, argument = value.partition(":")
    if not os.path.exists(path):
        return f"--config: config file {path} not found"
    import importlib.util

    spec = importlib.util.spec_from_file_location("r3jax_user_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        config = module.get_config(argument) if argument else module.get_config()
    except Exception:  # the config file itself is broken: absl's own message says how
        return None
    known = _config_keys(config)
    for arg in argv:
        if arg.startswith("--config.") and "=" in arg:
            key = arg[len("--config."):].split("=", 1)[0]
            if key not in known:
                close = difflib.get_close_matches(key, known, n=3, cutoff=0.0)
                return f"--config.{key}: unknown config key in {path} (closest known: {', '.join(close)})"
    return None


def parse(argv: list[str]):
    try:
        flags.FLAGS(argv)
        config = _CONFIG.value
        if config is None:
            fail("--config is required (e.g. --config=configs/arith.py)")
        config.to_dict()  # a config file that failed to load raises here
    except flags.Error as error:
        explained = _explain_override_failure(argv)
        if explained:
            fail(explained)
        lines = [line for line in str(error).splitlines() if line.strip()]
        # an exception inside a config file comes wrapped with its traceback: keep the flag and the cause
        fail(f"{lines[0]} {lines[-1]}" if "Traceback" in str(error) else " ".join(lines))
    except (AttributeError, KeyError, OSError, TypeError, ValueError) as error:
        fail(_explain_override_failure(argv) or str(error).strip("'\"").replace("\\n", " ").replace("\n", " "))
    if _MODE.value:
        config.mode = _MODE.value
    return config


def main(argv: list[str]) -> None:
    config = parse(argv)
    import jax

    from r3jax import config as config_lib, sharding, tasks
    from r3jax.tasks.sandbox import IsolationError

    sharding.initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                    _PROCESS_ID.value)
    config_name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = _WORKDIR.value or os.path.join("runs", config_name)
    try:
        config_lib.validate(config, jax.device_count())
        task = tasks.get(config.task.name, **config.task.options.to_dict())
        task.demonstrations("train")  # reads the data now: a bad file or split fails here, in one line
        runtime = task.runtime_info()
    except (config_lib.ConfigError, ValueError, FileNotFoundError, IsolationError) as error:
        fail(str(error))
    for key, value in runtime.items():
        print(f"{key}: {value}")
    os.makedirs(workdir, exist_ok=True)
    if sharding.is_primary():
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump({**json.loads(config.to_json_best_effort()), "runtime": runtime}, f, indent=2)
    mesh = sharding.make_mesh(config.mesh)
    try:
        if config.mode == "compare":
            from r3jax.train import compare
            result = compare.run(config, workdir, task, mesh)
        else:
            from r3jax.train import job
            result = job.run(config, workdir, task, mesh)
    finally:
        task.close()
    if result is None:
        print(f"stopped by a signal; rerun with --workdir={workdir} to resume")


if __name__ == "__main__":
    main(sys.argv)
