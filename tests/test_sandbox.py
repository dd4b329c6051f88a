"""Adversarial programs score 0 within their limits; the trainer process and machine stay unharmed."""
import dataclasses
import json
import os
import time
import warnings

import jax
import pytest

from r3jax import tasks
from r3jax.tasks.sandbox import Limits, Sandbox, run_program

LIMITS = Limits(cpu_seconds=1, wall_seconds=3.0, memory_bytes=512 << 20, output_bytes=1 << 16)
OUTSIDE = "/tmp/r3jax-sandbox-escape.txt"

ADVERSARIAL = {
    "infinite_loop": "def solution():\n    while True:\n        pass\n",
    "sleep_forever": "import time\ndef solution():\n    time.sleep(60)\n    return 42\n",
    "fork_bomb": "import os\ndef solution():\n    while True:\n        os.fork()\n",
    "subprocess": "import subprocess\ndef solution():\n    return subprocess.call(['true'])\n",
    "memory_bomb": "def solution():\n    x = [0] * (1 << 34)\n    return 42\n",
    "deep_recursion": "def f(n):\n    return f(n + 1)\ndef solution():\n    return f(0)\n",
    "recursion_limit": "import sys\ndef f(n):\n    return f(n + 1)\ndef solution():\n"
                       "    sys.setrecursionlimit(10**8)\n    return f(0)\n",
    "write_outside": f"def solution():\n    open({OUTSIDE!r}, 'w').write('x')\n    return 42\n",
    "read_environment": "import os\ndef solution():\n    return float(os.environ['R3JAX_SECRET'])\n",
    "kill_parent": "import os\ndef solution():\n    os.kill(os.getppid(), 9)\n    return 42\n",
    "output_flood": "import os\ndef solution():\n    while True:\n        os.write(1, b'x' * 65536)\n",
    "print_flood": "def solution():\n    while True:\n        print('y' * 10000)\n",
    "ctypes_segfault": "import ctypes\ndef solution():\n    ctypes.string_at(0)\n    return 42\n",
    "sys_exit": "import sys\ndef solution():\n    sys.exit(0)\n",
    "os_exit": "import os\ndef solution():\n    os._exit(0)\n",
    "missing_module": "import numpy_does_not_exist\ndef solution():\n    return 42\n",
    "socket": "import socket\ndef solution():\n    socket.create_connection(('127.0.0.1', 22))\n    return 42\n",
    "forge_result": "def solution():\n    print('\\n0000 {\"value\": 42}')\n    raise ValueError\n",
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_program_scores_zero(name, monkeypatch):
    monkeypatch.setenv("R3JAX_SECRET", "42")
    task = tasks.get("gsm8k_pot", sandbox_workers=1, sandbox_limits=LIMITS)
    start = time.monotonic()
    assert task.score_batch([ADVERSARIAL[name]], ["42"])[0].reward == 0.0
    assert time.monotonic() - start < LIMITS.wall_seconds + 2
    assert not os.path.exists(OUTSIDE)
    assert run_program("def solution():\n    return 42\n", LIMITS) == 42.0  # still works after
    task.close()


def test_released_program_scores_one(data_dir):
    path = os.path.join(data_dir, "r3_examples", "gsm8k_pot", "gsm8k_python_train_example.json")
    records = json.load(open(path))[:8]
    task = tasks.get("gsm8k_pot", sandbox_workers=4)
    demos = task.demonstrations("train")[:8]
    scores = task.score_batch([d.response for d in demos], [d.answer for d in demos])
    assert [s.reward for s in scores] == [1.0] * 8
    wrong = task.score_batch([demos[0].response.replace("return result", "return result + 1")], [demos[0].answer])[0]
    assert wrong.reward == 0.2 and records[0]["answer_value"] == demos[0].answer
    task.close()


def test_pool_runs_programs_in_parallel():
    """Each of four two-second programs returns when it started: the last started before the first
    ended, so they ran at once (overlap, not a total time, which a loaded machine would stretch).
    Two seconds, because under the suite's load the four workers' starts spread by half a second."""
    limits = dataclasses.replace(LIMITS, wall_seconds=6.0)
    with Sandbox(workers=4, limits=limits) as sandbox:
        starts = sandbox.run(["import time\ndef solution():\n    start = time.time()\n    time.sleep(2.0)\n"
                              "    return start\n"] * 4)
    assert all(isinstance(s, float) for s in starts)
    assert max(starts) - min(starts) < 2.0


def test_the_program_runs_under_its_limits_and_the_trainer_runs_no_python_between_fork_and_exec():
    """The runner sets its limits on itself (read back from /proc/self/limits inside the sandbox),
    so the trainer starts it without a preexec_fn, which would run Python in the forked child of a
    multithreaded process (JAX warns at such a fork, once its backend exists)."""
    jax.devices()
    code = ("def solution():\n    rows = {line[:26].strip(): line[26:68].split() for line in "
            "open('/proc/self/limits').read().splitlines()[1:]}\n"
            "    return ' '.join('/'.join(rows[name]) for name in ('Max cpu time', 'Max address space', "
            "'Max file size', 'Max core file size', 'Max processes'))\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        limits_inside = run_program(code, LIMITS)
    assert not [w for w in caught if "fork" in str(w.message)]
    assert limits_inside == f"1/1 {512 << 20}/{512 << 20} {1 << 16}/{1 << 16} 0/0 64/64"
    over_memory = "def solution():\n    return len(bytes(1 << 30))  # calloc: address space, no pages touched\n"
    assert run_program(over_memory, LIMITS) is None
    assert run_program(over_memory, dataclasses.replace(LIMITS, memory_bytes=2 << 30)) == float(1 << 30)
