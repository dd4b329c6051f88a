"""Runs one untrusted program in its own process; started by sandbox.py as `python -I -S`.

Sets its own CPU-time, address-space, file-size and process-count limits (argv after the working
directory), then reads a nonce line and the program from stdin, executes it in its working
directory with an audit hook that refuses processes, signals, sockets, native code and writes
outside that directory, calls `solution()`, and prints `<nonce> <json value>` as the last line of
its stdout.
Under bubblewrap this hook is the second layer; the namespaces are the boundary.
"""
import json
import os
import sys

WORKDIR = os.path.realpath(sys.argv[1])
BLOCKED_EVENTS = {
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.kill",
    "os.killpg", "signal.pthread_kill", "subprocess.Popen", "socket.__new__", "socket.connect",
    "socket.bind", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.putenv", "os.unsetenv",
    "sys.setrecursionlimit", "os.chdir", "os.fchdir", "os.chroot", "os.setuid",
}
BLOCKED_MODULES = {"ctypes", "_ctypes", "socket", "_socket", "subprocess", "_posixsubprocess",
                   "multiprocessing", "_multiprocessing", "signal", "_signal", "resource", "mmap"}
PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
               "os.link", "os.symlink", "os.truncate", "shutil.rmtree", "os.utime"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _limit_self(cpu_seconds, memory_bytes, output_bytes, processes):
    import resource

    for kind, value in ((resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, memory_bytes),
                        (resource.RLIMIT_FSIZE, output_bytes), (resource.RLIMIT_CORE, 0),
                        (resource.RLIMIT_NPROC, processes)):
        resource.setrlimit(kind, (value, value))
    del sys.modules["resource"]  # the program's own `import resource` meets the audit hook


def _inside(path):
    if isinstance(path, int):
        return True
    real = os.path.realpath(os.path.join(WORKDIR, os.fsdecode(path)))
    return real == WORKDIR or real.startswith(WORKDIR + os.sep)


def _audit(event, args):
    if event in BLOCKED_EVENTS:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0].split(".")[0] in BLOCKED_MODULES:
        raise ImportError(f"sandbox: import of {args[0]} is not allowed")
    if event == "open":
        path, mode, flags = args
        writes = (mode and any(c in mode for c in "wax+")) or (flags and flags & WRITE_FLAGS)
        if writes and path is not None and not _inside(path):
            raise PermissionError(f"sandbox: writing {path} is not allowed")
    if event in PATH_EVENTS and not all(_inside(a) for a in args[:2] if isinstance(a, (str, bytes))):
        raise PermissionError(f"sandbox: {event} outside the working directory")


def _jsonable(value):
    if isinstance(value, bool) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return str(value)[:200]


def main():
    _limit_self(*map(int, sys.argv[2:6]))
    nonce = sys.stdin.readline().strip()
    code = sys.stdin.read()
    result_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.addaudithook(_audit)
    try:
        namespace = {"__name__": "__sandbox__"}
        exec(compile(code, "program.py", "exec"), namespace)
        value = {"value": _jsonable(namespace["solution"]())}
    except BaseException as error:  # SystemExit and KeyboardInterrupt included
        value = {"error": type(error).__name__}
    os.write(result_fd, f"\n{nonce} {json.dumps(value)}\n".encode())


main()
