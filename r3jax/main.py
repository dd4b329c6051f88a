"""CLI: python -m r3jax.main --config=configs/arith.py [--config.a.b=value ...] [--workdir=DIR] [--mode=M]

Bad input (unknown key, wrong type, missing model or data file) prints one line naming it and
exits with status 2. A run stopped by SIGTERM/SIGINT saves a checkpoint and exits with status 75
(EX_TEMPFAIL: rerun to resume, e.g. a SLURM requeue); a NaN or infinite loss or reward stops the
run with status 3, keeping the last good checkpoint; a checkpoint or file that cannot be written
(a full disk) stops it with status 74 (EX_IOERR), naming the checkpoint a rerun resumes from. A
second signal stops at once (SIGINT: status 130), as does the first in mode=eval.
"""
from __future__ import annotations

import errno
import json
import os
import re
import sys
import warnings

from absl import flags
from ml_collections import config_flags

from r3jax import watchdog

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, logs and results go "
                               "(default: runs/<config name>)")
_MODE = flags.DEFINE_string("mode", None, "overrides config.mode: train, sft, rl, eval, compare")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "multi-host: join the other processes (TPU pods "
                                 "and SLURM discover the rest; elsewhere give the three flags below)")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "multi-host: coordinator host:port")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")


EXIT_CONFIG, EXIT_NON_FINITE, EXIT_WRITE, EXIT_STOPPED, EXIT_PEER_LOST, EXIT_INTERRUPTED = 2, 3, 74, 75, 76, 130


def fail(message: str, status: int = EXIT_CONFIG) -> None:
    sys.stderr.write(f"error: {message}\n")  # one write: other threads may be printing
    sys.exit(status)


def _config_file(argv: list[str]) -> str | None:
    """The --config flag's value as given, `path[:argument]`."""
    value = None
    for i, arg in enumerate(argv):  # the last one counts, as in absl
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _explain_override_failure(argv: list[str]) -> str | None:
    """One line for the commonest failures to load: a missing config file, an unknown key (in the
    file or in an override)."""
    value = _config_file(argv)
    if value is None:
        return None
    path, _, argument = value.partition(":")
    if not os.path.exists(path):
        return f"--config: config file {path} not found"
    from r3jax.config import ConfigError, flatten, load_config_file, unknown_override

    try:
        config = load_config_file(path, argument)
    except ConfigError as error:  # the file sets a key that no config has
        return str(error)
    except Exception:  # the config file itself is broken: absl's own message says how
        return None
    known = flatten(config, sections=True)
    for arg in argv:
        if arg.startswith("--config.") and "=" in arg:
            key = arg[len("--config."):].split("=", 1)[0]
            if key not in known:
                return f"--config.{key}: {unknown_override(key, config, path)}"
    return None


def help_text(argv: list[str]) -> str:
    """Every flag and config key with its default and meaning (config.SCHEMA); with --config
    given, that file's value where it differs from the default."""
    from r3jax.config import documented_keys, flatten, load_config_file

    file_values = {}
    value = _config_file(argv)
    if value and os.path.exists(value.partition(":")[0]):
        file_values = flatten(load_config_file(*value.split(":", 1)))
    lines = [__doc__.strip().splitlines()[0], "", "flags:"]
    for name in ("config", "workdir", "mode", "distributed", "coordinator", "num_processes", "process_id"):
        lines.append(f"  --{name:16s} {flags.FLAGS[name].help}")
    lines += ["", "config keys, as --config.KEY=VALUE (default" + (f"; -> the value in {value}" if file_values else "")
              + "):"]
    for key in documented_keys():
        shown = repr(key.default)
        if key.name in file_values and file_values[key.name] != key.default:
            shown += f" -> {file_values[key.name]!r}"
        choices = f"\n      one of: {', '.join(map(repr, key.choices))}" if key.choices else ""
        lines.append(f"  {key.name} = {shown}\n      {key.meaning}{choices}")
    return "\n".join(lines)


def parse(argv: list[str]):
    from r3jax.config import allow_config_imports

    if any(arg in ("--help", "-h", "--helpfull") for arg in argv[1:]):
        print(help_text(argv))
        sys.exit(0)
    if _config_file(argv):
        allow_config_imports(_config_file(argv).partition(":")[0])
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


def default_workdir(config_file: str, config) -> str:
    """runs/<config name>, with the task and the mode added where the name does not already say
    them: configs/arith.py -> runs/arith, configs/paper.py:svamp -> runs/paper_svamp, the same
    in eval mode -> runs/paper_svamp_eval. Two runs of different tasks or modes never share one."""
    path, _, argument = config_file.partition(":")
    name = os.path.splitext(os.path.basename(path))[0] + (f"_{argument}" if argument else "")
    for part in (config.task.name, config.mode):
        if part not in name and part != "train":
            name += f"_{part}"
    return os.path.join("runs", name)


def main(argv: list[str]) -> None:
    config = parse(argv)
    from r3jax import sharding

    sharding.initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                    _PROCESS_ID.value)
    overrides = [arg[len("--config."):] for arg in argv if arg.startswith("--config.")]
    config_file = _config_file(argv)
    run(config, _WORKDIR.value or default_workdir(config_file, config), overrides, config_file or "")


def use_cached_hub_models(config) -> None:
    """Puts, for each hub id (org/name[@revision]) under config_lib.MODEL_DIR_KEYS, its folder in the local
    Hugging Face cache where one is cached, and says so."""
    from r3jax import config as config_lib, sharding
    from r3jax.models import hf

    for key in config_lib.MODEL_DIR_KEYS:
        section, _, name = key.rpartition(".")
        hub_id = config_lib.value_at(config, key)
        if folder := hf.cached_snapshot(hub_id):
            config_lib.value_at(config, section)[name] = folder
            if sharding.is_primary():
                print(f"{key}: {hub_id} from the local Hugging Face cache, {folder}")


def use_compile_cache(directory: str, max_gb: float = 0.0) -> None:
    """The persistent compilation cache in `directory` ("": none), unless JAX_COMPILATION_CACHE_DIR
    names one; every compile is cached, however short. With `max_gb`, JAX's entries (at start-up)
    and r3jax's kept programs (as each is kept) each keep to half of it, the least recently used
    removed first. JAX's own bound (JAX_COMPILATION_CACHE_MAX_SIZE, which still wins) is not
    used: it needs an access-time file beside every entry, and one entry without it (written
    unbounded, or cut short by a full disk) made every later write fail."""
    import jax

    from r3jax import programs

    if directory and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # JAX caches only compiles over 1 s by default; the ~15 shorter ones of an RL run then
        # recompile on every rerun, 1.4 s of a warm restart (docs/experiments.md, "First step")
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    programs.max_bytes = int(max_gb * 1e9 / 2) if max_gb else -1
    if (cache_dir := jax_cache_dir()) is None:
        return
    if reason := unwritable(cache_dir):  # else every program would warn that it is not kept
        print(f"warning: compile_cache {cache_dir}: cannot write there ({reason}); compiling every program afresh",
              file=sys.stderr)
        jax.config.update("jax_compilation_cache_dir", None)
        return
    if not getattr(warnings.showwarning, "mends_cache", False):
        warnings.showwarning = mending_cache_entries(warnings.showwarning)
        # ahead of the user's filters (-W ignore would drop them before the hook): it mends the cache
        warnings.filterwarnings("always", message=JAX_CACHE_WARNING)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" in os.environ:
        date_unbounded_entries(cache_dir)
    elif max_gb:
        programs.keep_within(cache_dir, programs.max_bytes, "*-cache")


JAX_CACHE_WARNING = r"Error (reading|writing) persistent compilation cache entry for "  # JAX's words
JAX_CACHE_ERROR = re.compile(JAX_CACHE_WARNING + r"'(.+?)': (.*)", re.DOTALL)


def mending_cache_entries(showwarning):
    """`showwarning` but for JAX's warnings that it cannot read or write a compilation cache entry:
    that module's entries that do not decompress (cut short by a crash or a full disk) are removed,
    with one line saying so. JAX writes an entry in place and never overwrites one, so without this
    each later run warned and compiled that program again."""

    def show(message, category, filename, lineno, file=None, line=None):
        cache_error = JAX_CACHE_ERROR.match(str(message))
        if cache_error is None or (cache_dir := jax_cache_dir()) is None:
            return showwarning(message, category, filename, lineno, file, line)
        action, module, reason = cache_error.groups()
        removed, not_removed = remove_damaged_entries(cache_dir, module)
        if action == "writing":
            print(f"warning: compile_cache {cache_dir}: '{module}' could not be cached ({reason}); the next run "
                  "compiles it again", file=sys.stderr)
        elif removed:
            print(f"warning: compile_cache {cache_dir}: {_entries(removed)} of '{module}' could not be read "
                  f"({reason}), perhaps cut short by a crash or a full disk; removed, compiling again", file=sys.stderr)
        elif not_removed:
            print(f"warning: compile_cache {cache_dir}: {_entries(len(not_removed))} of '{module}' could not be read "
                  f"({reason}) nor removed ({not_removed[0]}); compiling it again in every run until that file is "
                  "removed, or set compile_cache to a folder of your own", file=sys.stderr)
        else:  # an entry that decompresses but does not load
            showwarning(message, category, filename, lineno, file, line)

    show.mends_cache = True
    return show


def jax_cache_dir() -> str | None:
    """JAX's compilation cache folder, if it is a local one."""
    import jax

    cache_dir = jax.config.jax_compilation_cache_dir
    return cache_dir if cache_dir and "://" not in cache_dir else None


def _entries(count: int) -> str:
    return "an entry" if count == 1 else f"{count} entries"


def remove_damaged_entries(cache_dir: str, module: str) -> tuple[int, list[str]]:
    """Removes the entries of `module` (a module name, or a whole key) in JAX's cache folder
    `cache_dir` that do not decompress: how many it removed, and why each other one stayed (another
    user's entry in a shared folder, say)."""
    import glob

    from jax._src import compilation_cache  # JAX's own format: zstd or zlib, by what is installed

    removed, not_removed = 0, []
    for path in glob.glob(os.path.join(glob.escape(cache_dir), f"{glob.escape(module)}*-cache")):
        try:
            with open(path, "rb") as entry:
                compilation_cache.decompress_executable(entry.read())
        except FileNotFoundError:  # removed meanwhile by another process
            continue
        except Exception:  # zlib.error, or zstd's
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            except OSError as error:
                not_removed.append(f"{path}: {error.strerror or error}")
                continue
            removed += 1
    return removed, not_removed


def date_unbounded_entries(cache_dir: str) -> None:
    """Gives each entry of JAX's compilation cache in `cache_dir` that has no access-time file one,
    from the entry's modification time, for JAX's own bounded cache: it reads that file for every
    entry at each write, and with one missing every write failed (FileNotFoundError)."""
    names = set(os.listdir(cache_dir))
    for name in names:
        key = name.removesuffix("-cache")
        if key != name and f"{key}-atime" not in names:
            try:
                modified_ns = os.stat(os.path.join(cache_dir, name)).st_mtime_ns
            except FileNotFoundError:  # evicted meanwhile by another process
                continue
            with open(os.path.join(cache_dir, f"{key}-atime"), "wb") as atime:
                atime.write(modified_ns.to_bytes(8, "little"))


EVALUATING_MODES = ("train", "rl", "eval", "compare")  # the modes that read config.eval.split


def run_identity(config, task) -> dict[str, str]:
    """Digests of what every process of a run must share: r3jax's source, the libraries, the
    config and the task's data (its training and evaluation splits)."""
    import hashlib

    from r3jax import programs

    def digest(value) -> str:
        return hashlib.sha256(repr(value).encode()).hexdigest()[:16]

    read = ("train", config.eval.split) if config.mode in EVALUATING_MODES else ("train",)
    splits = [task.demonstrations(split) for split in read]
    return {"r3jax's source": programs.source_digest()[:16], "library versions": digest(programs.library_versions()),
            "config": digest(config.to_json_best_effort()), "the task's data": digest(splits)}


def check_processes_agree(config, task) -> None:
    """On several processes: exits (2) unless every process runs process 0's code, libraries,
    config and data (a host with another checkout would compute another step, or wait forever at
    a collective the others never reach); each process that differs says in what."""
    import jax

    from r3jax import sharding

    if jax.process_count() == 1:
        return
    mine = run_identity(config, task)
    primary = sharding.computed_by_primary(lambda: mine)
    differing = [name for name, value in mine.items() if primary[name] != value]
    if differing:
        print(f"process {jax.process_index()}: not as on process 0: {', '.join(differing)}", file=sys.stderr)
    if others := sharding.processes_where(bool(differing)):
        fail(f"processes {others} differ from process 0 in r3jax's source, library versions, config or the task's "
             "data (each says which); run one checkout, environment, config and data on every host")


def unwritable(folder: str) -> str | None:
    """Makes `folder`; why this process cannot write there (a read-only mount, another user's
    folder), or None if it can."""
    import tempfile

    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as error:
        return error.strerror


def take_workdir(workdir: str) -> None:
    """Makes `workdir` and holds it for this run (process 0 locks it); exits (2) naming it if this
    process cannot write there, or another run holds it."""
    from r3jax import sharding, workdir as workdir_lib

    if reason := unwritable(workdir):
        fail(f"--workdir={workdir}: cannot write there ({reason})")
    if holder := sharding.computed_by_primary(lambda: workdir_lib.lock(workdir)):
        fail(f"--workdir={workdir}: in use by another run ({holder}); wait for it to end, or give another --workdir")


def check_shared_folders(workdir: str) -> None:
    """On several processes: exits (2) unless every process sees the workdir process 0 writes, and
    warns unless they share the compilation cache (JAX writes its entries from process 0 alone)."""
    import jax

    from r3jax import sharding

    cache = jax.config.jax_compilation_cache_dir
    if cache and (blind := sharding.processes_not_seeing(os.path.expanduser(cache))) and sharding.is_primary():
        print(f"warning: compile_cache {cache}: processes {blind} do not see what process 0 writes there, and "
              "JAX writes its cache from process 0 alone, so they compile every program on every run; give a "
              "folder every host mounts", file=sys.stderr)
    if blind := sharding.processes_not_seeing(workdir):
        fail(f"--workdir={workdir}: processes {blind} do not see what process 0 writes there; a run over "
             "several hosts needs a workdir every host mounts (NFS, Filestore, gcsfuse)")


def run(config, workdir: str, overrides: list[str] = (), config_file: str = "") -> None:
    """A parsed config run in `workdir`; exits with the documented status on a user mistake (2), a
    non-finite loss (3), a file it cannot write (74), a stop signal (75), another process of the run
    gone (76) or no progress for stall_timeout_s (124). `config_file` (`path[:argument]`) is where
    `config` came from, for the line that set a bad value."""
    import jax

    from r3jax import config as config_lib, files, settings as settings_lib, sharding, tasks, workdir as workdir_lib
    from r3jax.checkpoint import CheckpointWriteError, NonFiniteError
    from r3jax.errors import InputError
    from r3jax.tasks.sandbox import IsolationError

    if "://" in workdir:
        fail(f"--workdir={workdir}: remote URLs are not supported; mount the bucket (e.g. gcsfuse) on every "
             "host and give the mounted path")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        fail(f"--workdir={workdir}: a file, not a directory")
    try:
        use_cached_hub_models(config)
        config_lib.validate(config, jax.device_count())
        use_compile_cache(config.compile_cache, config.compile_cache_max_gb)
        task = tasks.get(config.task.name, **config.task.options.to_dict())
        task.demonstrations("train")  # reads the data now: a bad file or split fails here, in one line
        if config.mode in EVALUATING_MODES and not task.demonstrations(config.eval.split):
            raise config_lib.ConfigError(f"config.eval.split: the {config.eval.split} split of task {task.name} is empty")
        runtime = task.runtime_info()
        check_processes_agree(config, task)
        take_workdir(workdir)
        claimed = workdir_lib.claim(workdir, config, sharding.is_primary())
    except (ValueError, FileNotFoundError, IsolationError) as error:  # InputError and bad task options
        fail(config_lib.with_setting_line(str(error), config_file, overrides))
    sharding.barrier("workdir claimed")
    say = print if sharding.is_primary() else lambda *_: None  # one process speaks for the run
    for line in [f"{key}: {value}" for key, value in runtime.items()] + claimed:
        say(line)
    if not os.path.isdir(workdir):  # resume=restart moved the old one aside, with its lock
        take_workdir(workdir)
    check_shared_folders(workdir)
    if sharding.is_primary():
        files.write_json(os.path.join(workdir, "config.json"),
                         {**json.loads(config.to_json_best_effort()), "runtime": runtime})
    mesh = sharding.make_mesh(config.mesh)
    settings = settings_lib.of(config)
    watchdog.start(config.stall_timeout_s)
    say(f"r3jax {config.mode}: task {task.name}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"mesh {dict(mesh.shape)}, workdir {workdir}" + (f"; overrides: {' '.join(overrides)}" if overrides else ""))
    try:
        from r3jax.train import compare, job
        result = (compare if config.mode == "compare" else job).run(settings, workdir, task, mesh)
    except (InputError, NonFiniteError, CheckpointWriteError, OSError, jax.errors.JaxRuntimeError) as error:
        exit_for(error)
    finally:
        task.close()
    if result is None:
        say(f"stopped by a signal; rerun with --workdir={workdir} to resume (exit status {EXIT_STOPPED})")
        sys.exit(EXIT_STOPPED)
    say("\n".join(final_summary(workdir, runtime)))


def exit_for(error: Exception) -> None:
    """Ends a run that raised `error` with one line and its status: a user's mistake (2), a
    non-finite loss (3), a checkpoint or file that could not be written (74), another process of
    the run gone (76); re-raises any other."""
    from r3jax.checkpoint import CheckpointWriteError, NonFiniteError
    from r3jax.errors import InputError

    if isinstance(error, InputError):
        fail(str(error))
    if lost_a_process(error):
        import jax
        fail(f"process {jax.process_index()} of {jax.process_count()}: a collective failed, since another process of "
             f"this run is gone ({str(error).strip().splitlines()[0]}); see that process's log, then rerun every "
             "process with the same command to resume from the last checkpoint", EXIT_PEER_LOST)
    full_disk = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    if not full_disk and not isinstance(error, (NonFiniteError, CheckpointWriteError)):
        raise error
    remedy = ": make room and rerun the same command; it resumes from the last checkpoint" if full_disk else ""
    fail(f"{error}{remedy}", EXIT_NON_FINITE if isinstance(error, NonFiniteError) else EXIT_WRITE)


def lost_a_process(error: Exception) -> bool:
    """Whether `error` is a collective of a multi-process run that failed because a peer closed its
    connection: it died or was killed. Gloo's words (CPU collectives); other backends' unverified."""
    import jax

    return (jax.process_count() > 1 and isinstance(error, jax.errors.JaxRuntimeError)
            and re.search(r"Connection (closed|reset) by peer", str(error)) is not None)


def final_summary(workdir: str, runtime: dict[str, str]) -> list[str]:
    """The run's closing lines: how the task executed (a sandbox without OS isolation shows here,
    as it does in config.json's `runtime`), and where the results are."""
    return [f"{key}: {value}" for key, value in runtime.items()] + [f"results written to {workdir}"]


if __name__ == "__main__":
    try:
        main(sys.argv)
    except KeyboardInterrupt:  # a second Ctrl-C (the first one stops after the step, saved)
        print("\ninterrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit as stop:
        if stop.code != EXIT_PEER_LOST:
            raise
        # Not through JAX's shutdown barrier at exit: it would wait out the lost process's heartbeat
        # timeout (100 s), then abort with a C++ stack trace.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_PEER_LOST)
