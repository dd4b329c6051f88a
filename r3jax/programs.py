"""Compiled programs kept on disk, so that a rerun neither traces nor lowers its big programs.

JAX's persistent compilation cache (`config.compile_cache`) spares a rerun the XLA compile, but
not the tracing and lowering that JAX needs to find a program's key: on the main job's RL update
about 1.2 s for each batch shape's first call, and 0.3 s for the sampler's (docs/experiments.md,
"Kept programs"). A `Cached` program is found on disk by what defines it instead:
- its name and the identity its maker gives (every value the function closes over: model
  config, update settings, the optimizer's knobs);
- the arguments' tree, shapes, dtypes and shardings;
- the r3jax source, the versions of JAX, jaxlib, Flax and Optax, JAX's options, XLA_FLAGS and the
  devices (`environment`).

The programs live beside JAX's cache, in `<jax_compilation_cache_dir>/r3jax-programs`. With that
cache off, or on more than one process (each would need its own copy), every call goes through
`jax.jit` as before. A file that cannot be read back is removed, and its program compiled again.
With `max_bytes` set (half of `config.compile_cache_max_gb`), the kept programs keep to that many
bytes, the least recently used removed first; `keep_within` trims JAX's entries the same way.

A program is traced under the mesh its arguments lie on (`mesh_context`), so that the model can
run a kernel with no sharding rule of its own per device (`transformer.per_device`).

A family's files (one name and identity, in one environment) share a prefix. When a `Cached` is
made, a loader thread starts reading its family's programs back, most recently used first, so
that a rerun's programs are loaded by their first call (`sharding.StateStep.prepare`).
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import hashlib
import os
import pickle
import queue
import sys
import threading
from concurrent.futures import Future
from typing import Any, Callable

import flax
import jax
import jaxlib
import optax
from jax.experimental import serialize_executable
from jax.sharding import NamedSharding

from r3jax import files

FOLDER = "r3jax-programs"


@functools.cache
def source_digest() -> str:
    """sha256 of every r3jax source file: a program compiled from other code is another program."""
    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for folder, subfolders, names in sorted(os.walk(root)):
        subfolders.sort()
        for name in sorted(n for n in names if n.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


max_bytes = -1  # the kept programs' bound, set by main.use_compile_cache; -1: none


def folder() -> str | None:
    """Where programs are kept: None with JAX's persistent cache off, or over several processes."""
    cache = jax.config.jax_compilation_cache_dir
    if not cache or jax.process_count() > 1:
        return None
    return os.path.join(os.path.expanduser(cache), FOLDER)


def on_mesh(mesh):
    """`jax.set_mesh(mesh)`, so that code traced under it reads the mesh from
    `jax.sharding.get_abstract_mesh()`; a null context for no mesh or a one-device one (whose
    programs then stay as they were)."""
    return contextlib.nullcontext() if mesh is None or mesh.size == 1 else jax.set_mesh(mesh)


def mesh_of(tree: Any):
    """The mesh that the first leaf of `tree` laid out by a NamedSharding lies on; None if none is."""
    shardings = (getattr(leaf, "sharding", None) for leaf in jax.tree.leaves(tree))
    return next((s.mesh for s in shardings if isinstance(s, NamedSharding)), None)


def mesh_context(args: tuple):
    """`on_mesh` of `args`' mesh (`mesh_of`)."""
    return on_mesh(mesh_of(args))


def signature(args: tuple) -> tuple:
    """What a jitted call compiles for, as hashable objects (looked up on every call): the
    arguments' tree, and each leaf's type (shape, dtype, weak type) and sharding (None for host
    values)."""
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple((jax.typeof(leaf), getattr(leaf, "sharding", None)) for leaf in leaves)


def signature_text(call_signature: tuple) -> tuple:
    """`signature`'s objects as text, the same in every process (for `program_key`)."""
    tree, leaves = call_signature
    return str(tree), tuple((str(aval), repr(sharding)) for aval, sharding in leaves)


# JAX options that say where and whether things are cached or logged, not what a program computes
NOT_COMPILED = ("jax_compilation_cache", "jax_persistent_cache", "jax_enable_compilation_cache",
                "jax_raise_persistent_cache", "jax_log", "jax_explain_cache_misses")


def library_versions() -> list[tuple[str, str]]:
    """The versions of the libraries that trace r3jax's programs."""
    return [(module.__name__, module.__version__) for module in (jax, jaxlib, flax, optax)]


def environment() -> tuple:
    """What else shapes a compiled program: the libraries that trace it, JAX's options, XLA's flags
    and the devices."""
    options = sorted((k, v) for k, v in jax.config.values.items() if not k.startswith(NOT_COMPILED))
    return (source_digest(), library_versions(), options,
            os.environ.get("XLA_FLAGS", ""), os.environ.get("LIBTPU_INIT_ARGS", ""),
            [(d.platform, d.device_kind) for d in jax.devices()])


def family_key(name: str, identity: Any) -> str:
    """What `name`'s programs of one identity, in this environment, share: their files' prefix."""
    material = repr((name, identity, environment()))
    return f"{name}-{hashlib.sha256(material.encode()).hexdigest()[:16]}"


def program_key(name: str, identity: Any, call_signature: tuple) -> str:
    """`name`'s program's key for one identity and call signature (its file is `<key>.program`):
    its family's prefix, then a digest of everything that defines it."""
    material = repr((name, identity, signature_text(call_signature), environment()))
    return f"{family_key(name, identity)}-{hashlib.sha256(material.encode()).hexdigest()[:32]}"


_jax_cache_hits = [0]


def _count_jax_cache_hits(event: str, **_) -> None:
    _jax_cache_hits[0] += event == "/jax/compilation_cache/cache_hits"


jax.monitoring.register_event_listener(_count_jax_cache_hits)


def compile_for_keeping(fun: Callable, args: tuple, key: str, donate_argnums: tuple[int, ...]) -> tuple[Any, bool]:
    """(`fun` jitted and compiled for `args`, whether it may be kept). An executable that JAX's
    persistent cache read back serializes without its kernels on the CPU (running the copy fails
    with "Function add.1_kernel not found"). So the program is compiled under a name of its own,
    `key`, that JAX's cache has not seen unless this very program was compiled before (its file
    since lost); if JAX's cache answers all the same, the program is not kept, and goes through
    JAX's cache on every run, as without this module."""
    def program(*program_args):
        return fun(*program_args)
    program.__name__ = program.__qualname__ = key.replace("-", "_")
    hits = _jax_cache_hits[0]
    compiled = jax.jit(program, donate_argnums=donate_argnums).lower(*args).compile()
    return compiled, _jax_cache_hits[0] == hits


def read_program(path: str) -> Callable:
    """The compiled program kept in `path`, loaded onto the devices it was compiled for."""
    with open(path, "rb") as f:
        serialized, device_ids = pickle.load(f)
    by_id = {device.id: device for device in jax.devices()}
    return serialize_executable.deserialize_and_load(*serialized, execution_devices=[by_id[i] for i in device_ids])


# Programs of a family read back ahead of their first call, most recently used first: a loader
# thread deserializes them (which releases the GIL, 0.2 s for the main job's update on this
# host's CPU) while the trainer sets up and samples its first rollout.
READ_AHEAD = 16


class _Loader:
    """One thread that reads kept programs back in the order asked, each into its Future. At exit
    it stops after the program in hand, so that no load is cut off inside XLA."""

    def __init__(self):
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def read_ahead(self, paths: list[str]) -> dict[str, Future]:
        if self.thread is None:
            self.thread = threading.Thread(target=self._serve, name="r3jax-programs", daemon=True)
            self.thread.start()
            atexit.register(self._stop)
        futures = {path: Future() for path in paths}
        for request in futures.items():
            self.requests.put(request)
        return futures

    def _serve(self) -> None:
        while not self.stopping.is_set():
            path, future = self.requests.get()
            if path is not None and future.set_running_or_notify_cancel():
                try:
                    future.set_result(read_program(path))
                except Exception as error:  # the caller reports it, as for its own load
                    future.set_exception(error)

    def _stop(self) -> None:
        self.stopping.set()
        self.requests.put((None, None))
        self.thread.join()


_loader = _Loader()


def _last_used(path: str) -> float:
    """A kept program's use sets its mtime; a read of JAX's entry, its atime (to a day, under relatime)."""
    try:
        status = os.stat(path)
    except FileNotFoundError:  # removed by another process meanwhile
        return 0.0
    return max(status.st_atime, status.st_mtime)


def keep_within(where: str, max_bytes: int, pattern: str = "*.program") -> None:
    """Removes the least recently used files of `pattern` in `where` (kept programs, or JAX's
    entries with "*-cache") until the rest take at most `max_bytes` (-1: no bound)."""
    if max_bytes < 0:
        return
    paths = sorted(glob.glob(os.path.join(glob.escape(where), pattern)), key=_last_used)
    sizes = [_size(path) for path in paths]
    total = sum(sizes)
    for path, size in zip(paths, sizes):
        if total <= max_bytes:
            return
        with contextlib.suppress(FileNotFoundError):  # another process's removal
            os.remove(path)
        total -= size


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


class Cached:
    """`jax.jit(fun, donate_argnums)` (`fun` of positional arguments) compiled once per call
    signature: in this process from memory, across processes from `folder()`. `identity` must
    name every value `fun` closes over (None: the plain jit, nothing kept); `name` says what it is
    in file names."""

    def __init__(self, name: str, fun: Callable, identity: Any, donate_argnums: tuple[int, ...] = ()):
        self.name, self.fun, self.identity, self.donate_argnums = name, fun, identity, donate_argnums
        self.jitted = jax.jit(fun, donate_argnums=donate_argnums)
        self.compiled: dict[tuple, Callable] = {}
        self.read_ahead = self._read_ahead()

    def _read_ahead(self) -> dict[str, Future]:
        """This family's kept programs, being read back by the loader thread, by path."""
        where = folder()
        if self.identity is None or where is None:
            return {}
        paths = glob.glob(os.path.join(glob.escape(where), f"{family_key(self.name, self.identity)}-*.program"))
        paths.sort(key=_last_used, reverse=True)
        return _loader.read_ahead(paths[:READ_AHEAD])

    def __call__(self, *args):
        # every call, not only a tracing one: jax.jit keys its traces by the mesh in context too
        with mesh_context(args):
            return self._call(*args)

    def _call(self, *args):
        if self.identity is None:
            return self.jitted(*args)
        call_signature = signature(args)
        program = self.compiled.get(call_signature)
        if program is None:
            program = self.compiled[call_signature] = self._load_or_compile(args, call_signature)
        return program(*args)

    def _kept(self, path: str) -> Callable | None:
        """The program kept in `path` (from the loader thread if it has it in hand), or None."""
        future = self.read_ahead.pop(path, None)
        try:
            if future is not None and not future.cancel():
                return future.result()
            return read_program(path)
        except FileNotFoundError:  # never kept, or removed meanwhile by a process keeping to the bound
            return None

    def _load_or_compile(self, args: tuple, call_signature: tuple) -> Callable:
        where = folder()
        if where is None:
            return self.jitted
        key = program_key(self.name, self.identity, call_signature)
        path = os.path.join(where, f"{key}.program")
        try:
            program = self._kept(path)
        except Exception as error:  # written by another JAX, or broken: compile again
            print(f"warning: {path}: could not be loaded ({type(error).__name__}: {error}); removed, compiling it "
                  "again", file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):  # another process's removal
                os.remove(path)
        else:
            if program is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.utime(path)  # recently used: read ahead first next time
                return program
        compiled, keepable = compile_for_keeping(self.fun, args, key, self.donate_argnums)
        if not keepable:
            return compiled
        try:
            serialized = serialize_executable.serialize(compiled)
        except (ValueError, NotImplementedError):  # a program with closed-over constants: not kept
            return compiled
        # the devices it was compiled for, in order (a one-device program on one of several)
        device_ids = [device.id for device in compiled._executable.xla_executable.local_devices()]
        try:
            files.write_bytes(path, pickle.dumps((serialized, device_ids)))
        except OSError as error:  # a full disk, say: the program runs all the same
            print(f"warning: {path}: not kept ({error})", file=sys.stderr)
            return compiled
        keep_within(where, max_bytes)
        return compiled

    def count(self) -> int:
        """Distinct call signatures compiled (or loaded) in this process."""
        return len(self.compiled) if self.identity is not None else self.jitted._cache_size()
