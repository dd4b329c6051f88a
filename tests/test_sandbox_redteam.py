"""Hostile programs against the bubblewrap sandbox. Each one tries a specific harm; the checks
look at the host side: a canary file outside untouched, a secret file and a secret in the
trainer's environment not read, a listening loopback socket never connected, no process left
behind, this (parent) process and a bystander process alive, time bounded. Several go around the
audit hook first (a subinterpreter has none), so the namespaces alone must hold."""
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from r3jax.tasks import sandbox
from r3jax.tasks.sandbox import Limits

LIMITS = Limits(cpu_seconds=1, wall_seconds=3.0, memory_bytes=512 << 20, output_bytes=1 << 16)
SECRET_FILE_VALUE, SECRET_ENV_VALUE = "31337", "4242"
MARKER = f"r3jax-redteam-{uuid.uuid4().hex}"

# Runs `code` in a subinterpreter, where the runner's audit hook does not exist.
UNHOOKED = "import _xxsubinterpreters as _si\n_i = _si.create()\n_si.run_string(_i, {code!r})\n"

PROGRAMS = {
    # writes, renames and deletes outside
    "write_canary": "def solution():\n    open({canary!r}, 'w').write('pwned')\n    return 1\n",
    "append_canary": "def solution():\n    open({canary!r}, 'a').write('pwned')\n    return 1\n",
    "rename_canary": "import os\ndef solution():\n    os.rename({canary!r}, {canary!r} + '.moved')\n    return 1\n",
    "delete_canary": "import os\ndef solution():\n    os.remove({canary!r})\n    return 1\n",
    "chmod_canary": "import os\ndef solution():\n    os.chmod({canary!r}, 0o777)\n    return 1\n",
    "os_open_canary": "import os\ndef solution():\n    fd = os.open({canary!r}, os.O_WRONLY | os.O_TRUNC)\n"
                      "    os.write(fd, b'pwned')\n    return 1\n",
    "unhooked_write_canary": UNHOOKED.format(code="open({canary!r}, 'w').write('pwned')")
                             + "def solution():\n    return 1\n",
    "unhooked_delete_canary": UNHOOKED.format(code="import os; os.remove({canary!r})") + "def solution():\n    return 1\n",
    # reads outside
    "read_secret": "def solution():\n    return float(open({secret!r}).read())\n",
    "unhooked_read_secret": UNHOOKED.format(code="open('/tmp/leak', 'w').write(open({secret!r}).read())")
                            + "def solution():\n    return float(open('/tmp/leak').read())\n",
    "list_project": "import os\ndef solution():\n    return ' '.join(os.listdir({project!r}))\n",
    "read_home": "import os\ndef solution():\n    return ' '.join(os.listdir(os.path.expanduser('~')) + os.listdir('/root'))\n",
    # environment and /proc
    "read_environment": "import os\ndef solution():\n    return float(os.environ['R3JAX_SECRET'])\n",
    "read_parent_environ": "import os\ndef solution():\n    data = open(f'/proc/{{os.getppid()}}/environ').read()\n"
                           "    return float(data.split('R3JAX_SECRET=')[1].split('\\0')[0])\n",
    "scan_proc_environ": "import os\ndef solution():\n    for pid in os.listdir('/proc'):\n        try:\n"
                         "            data = open(f'/proc/{{pid}}/environ').read()\n        except Exception:\n"
                         "            continue\n        if 'R3JAX_SECRET=' in data:\n"
                         "            return float(data.split('R3JAX_SECRET=')[1].split('\\0')[0])\n",
    "proc_root_escape": "import os\ndef solution():\n    for pid in os.listdir('/proc'):\n        try:\n"
                        "            return float(open(f'/proc/{{pid}}/root{secret}').read())\n"
                        "        except Exception:\n            pass\n",
    "proc_cmdline_scan": "import os\ndef solution():\n    return ' '.join(open(f'/proc/{{p}}/cmdline').read() "
                         "for p in os.listdir('/proc') if p.isdigit())\n",
    # network
    "tcp_connect": "import socket\ndef solution():\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                   "    return 1\n",
    "unhooked_tcp_connect": UNHOOKED.format(
        code="import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)") + "def solution():\n    return 1\n",
    "unhooked_udp": UNHOOKED.format(
        code="import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {port}))")
                    + "def solution():\n    return 1\n",
    # processes by every route
    "os_system": "import os\ndef solution():\n    return os.system('touch {canary}')\n",
    "subprocess_popen": "import subprocess\ndef solution():\n    subprocess.Popen(['/bin/sh', '-c', 'echo x > {canary}'])\n"
                        "    return 1\n",
    "posix_spawn": "import os, sys\ndef solution():\n    os.posix_spawn(sys.executable, [sys.executable, '-c', "
                   "'import time; time.sleep(30)', {marker!r}], {{}})\n    return 1\n",
    "unhooked_fork_daemon": UNHOOKED.format(
        code="import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
             "        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}])\n"
             "    os._exit(0)\ntime.sleep(0.3)") + "def solution():\n    return 1\n",
    "unhooked_fork_bomb": UNHOOKED.format(code="import os\nwhile True:\n    os.fork()") + "def solution():\n    return 1\n",
    "unhooked_exec_shell": UNHOOKED.format(
        code="import os; os.execv('/bin/sh', ['/bin/sh', '-c', 'echo pwned > {canary}'])") + "def solution():\n    return 1\n",
    # signals and ptrace to the parent
    "kill_parent": "import os\ndef solution():\n    os.kill(os.getppid(), 9)\n    return 1\n",
    "unhooked_kill_everything": UNHOOKED.format(code="import os; os.kill(-1, 9)") + "def solution():\n    return 1\n",
    "unhooked_kill_bystander": UNHOOKED.format(code="import os, signal; os.kill({bystander}, signal.SIGKILL)")
                               + "def solution():\n    return 1\n",
    "unhooked_ptrace_parent": UNHOOKED.format(
        code="import ctypes, os; ctypes.CDLL(None).ptrace(16, os.getppid(), 0, 0); os.kill(os.getppid(), 9)")
                              + "def solution():\n    return 1\n",
    # native code
    "ctypes_import": "import ctypes\ndef solution():\n    ctypes.CDLL(None).system(b'touch {canary}')\n    return 1\n",
    "importlib_ctypes": "import importlib.util, glob, sys\ndef solution():\n"
                        "    path = glob.glob(sys.base_prefix + '/lib/python3*/lib-dynload/_ctypes*.so')[0]\n"
                        "    spec = importlib.util.spec_from_file_location('_ctypes', path)\n"
                        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
                        "    open({canary!r}, 'w').write('pwned')\n    return 1\n",
    # forging the result line
    "forge_guessed_nonce": "def solution():\n    print('\\n' + '0' * 32 + ' {{\"value\": 31337}}')\n    raise ValueError\n",
    "forge_stolen_nonce_non_number": "import gc, os\ndef solution():\n"
                                     "    nonce = [v for v in gc.get_referrers(solution)] and None\n"
                                     "    os.write(1, b'\\nnot-json-at-all\\n')\n    raise ValueError\n",
    # resources
    "memory_bomb": "def solution():\n    x = bytearray(8 << 30)\n    return 1\n",
    "cpu_bomb": "def solution():\n    while True:\n        pass\n",
    "huge_output": "import os\ndef solution():\n    while True:\n        os.write(1, b'x' * 65536)\n",
    "thread_bomb": "import threading, time\ndef solution():\n    for _ in range(100000):\n"
                   "        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n    return 1\n",
    "daemon_thread_outlives": "import threading, time\ndef solution():\n"
                              "    threading.Thread(target=lambda: [time.sleep(0.1) for _ in range(300)]).start()\n"
                              "    return 1\n",
}


@pytest.fixture(scope="module")
def bwrap():
    binary, reason = sandbox.probe_bwrap()
    assert binary, f"bubblewrap must isolate programs on this machine: {reason}"
    return binary


@pytest.fixture
def host(tmp_path, monkeypatch):
    """The host side: canary and secret files, a secret env var, a listening socket, a bystander."""
    canary, secret = tmp_path / "canary.txt", tmp_path / "secret.txt"
    canary.write_text("untouched")
    secret.write_text(SECRET_FILE_VALUE)
    monkeypatch.setenv("R3JAX_SECRET", SECRET_ENV_VALUE)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield {"canary": canary, "secret": secret, "listener": listener, "bystander": bystander}
    bystander.kill()
    listener.close()


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def _leaks(value) -> bool:
    return value is not None and any(s in str(value) for s in (SECRET_FILE_VALUE, SECRET_ENV_VALUE, "secret.txt"))


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_hostile_program_does_no_harm(name, host, bwrap):
    canary, listener = host["canary"], host["listener"]
    before = canary.stat()
    code = PROGRAMS[name].format(canary=str(canary), secret=str(host["secret"]), port=listener.getsockname()[1],
                                 marker=MARKER, project=os.getcwd(), bystander=host["bystander"].pid)
    start = time.monotonic()
    value = sandbox.run_program(code, LIMITS)
    elapsed = time.monotonic() - start

    assert elapsed < LIMITS.wall_seconds + 3, "time not bounded"
    assert canary.read_text() == "untouched" and canary.stat().st_mode == before.st_mode, "canary changed"
    assert sorted(p.name for p in canary.parent.iterdir()) == ["canary.txt", "secret.txt"], "files appeared"
    assert not _leaks(value), f"a secret came back: {value!r}"
    assert value != 31337.0, "a forged result was accepted"
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody connected
    time.sleep(0.2)
    assert _processes_with(MARKER) == [], "a process was left behind"
    assert host["bystander"].poll() is None, "the bystander process was killed"
    assert sandbox.run_program("def solution():\n    return 42\n", LIMITS) == 42.0  # the host still works


def test_suite_covers_at_least_thirty_programs():
    assert len(PROGRAMS) >= 30


def test_isolation_hides_host_and_runs_unprivileged(bwrap):
    code = ("import os, socket\ndef solution():\n"
            "    s = socket.socket()\n    s.settimeout(1)\n"
            "    try:\n        s.connect(('1.1.1.1', 53))\n        net = 'up'\n    except OSError:\n        net = 'down'\n"
            "    return f\"{os.getuid()} {sum(p.isdigit() for p in os.listdir('/proc'))} {net} {sorted(os.listdir('/'))}\"\n")
    # the audit hook refuses sockets, so ask a subinterpreter
    unhooked = UNHOOKED.format(code=code + "open('/work/out', 'w').write(solution())") + \
        "def solution():\n    return open('/work/out').read()\n"
    uid, visible_processes, net, root = sandbox.run_program(unhooked, LIMITS).split(" ", 3)
    assert uid == str(sandbox.NOBODY) and net == "down"
    assert int(visible_processes) <= 3  # bwrap's init, the runner: none of the host's processes
    assert "home" not in root and "work" in root and "etc" not in root


def test_missing_bwrap_falls_back_with_one_warning_or_refuses(monkeypatch, capsys):
    monkeypatch.setattr(sandbox, "bwrap_binary", lambda: None)
    sandbox.probe_bwrap.cache_clear()
    try:
        pool = sandbox.Sandbox(workers=1, limits=LIMITS)
        warning = capsys.readouterr().err.strip().splitlines()
        assert len(warning) == 1 and warning[0].startswith("warning: sandbox: programs run without OS isolation: no bwrap")
        assert pool.isolation.startswith("process (no bwrap binary") and pool.run(["def solution():\n    return 3\n"]) == [3.0]
        pool.close()
        with pytest.raises(sandbox.IsolationError, match="require_isolation"):
            sandbox.Sandbox(workers=1, limits=LIMITS, require_isolation=True)
        with pytest.raises(sandbox.IsolationError, match="cannot isolate the program: no bwrap binary"):
            sandbox.run_program("def solution():\n    return 3\n", LIMITS)  # isolated unless told otherwise
    finally:
        sandbox.probe_bwrap.cache_clear()


def test_the_audit_hook_alone_is_not_a_boundary(host):
    """The same checks catch real harm: without bubblewrap (the fallback executor), programs
    that go around the audit hook write the canary and reach the listening socket."""
    canary, listener = host["canary"], host["listener"]
    fill = dict(canary=str(canary), port=listener.getsockname()[1])
    sandbox.run_program(PROGRAMS["unhooked_write_canary"].format(**fill), LIMITS, isolated=False)
    assert canary.read_text() == "pwned"
    sandbox.run_program(PROGRAMS["unhooked_tcp_connect"].format(**fill), LIMITS, isolated=False)
    listener.setblocking(True)
    listener.settimeout(2)
    listener.accept()[0].close()
