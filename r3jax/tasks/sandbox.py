"""Executes generated programs (program-of-thought) outside the trainer.

Every program runs in a fresh `python -I -S` process of its own: empty environment, a throwaway
working directory, CPU-time / address-space / file-size / process-count limits, a wall-clock
kill of its whole process group, and an audit hook (see
_sandbox_runner.py) that refuses fork/exec, signals, sockets, ctypes and writes outside its
directory. A thread pool keeps `workers` such processes running at once.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
from typing import Sequence

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_runner.py")


@dataclasses.dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 2
    wall_seconds: float = 5.0
    memory_bytes: int = 1 << 30
    output_bytes: int = 1 << 16
    processes: int = 64


def _limit_child(limits: Limits):
    def preexec():
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.output_bytes, limits.output_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        # Binds non-root users; root ignores it, where the audit hook's fork ban is what holds.
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
    return preexec


def run_program(code: str, limits: Limits = Limits()) -> float | str | bool | None:
    """Returns `solution()`'s value (numbers as float), or None if the program failed or broke a limit."""
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="r3jax-sandbox-") as workdir:
        with open(os.path.join(workdir, "program.py"), "w") as f:
            f.write(code)
        out_path = os.path.join(workdir, "stdout")
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", RUNNER, workdir], stdin=subprocess.PIPE, stdout=out,
                stderr=subprocess.DEVNULL, cwd=workdir, env={}, start_new_session=True,
                preexec_fn=_limit_child(limits))
            try:
                proc.communicate(f"{nonce}\n".encode(), timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
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
            return json.loads(line[len(nonce) + 1:]).get("value")
    return None


class Sandbox:
    """A pool running up to `workers` programs at once, each in its own limited process."""

    def __init__(self, workers: int = 4, limits: Limits = Limits()):
        self.limits = limits
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)

    def run(self, programs: Sequence[str]) -> list:
        return list(self.pool.map(lambda code: run_program(code, self.limits), programs))

    def close(self):
        self.pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
