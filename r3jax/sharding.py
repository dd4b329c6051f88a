"""Device mesh, the one logical-axis rules table, and sharded initialisation.

Parameters carry logical axis names (`nn.with_logical_partitioning`); `RULES` maps them onto the
mesh axes `data`, `fsdp` and `tensor`. Batches are split over `data` x `fsdp`.
"""
from __future__ import annotations

import functools
import os
import pickle
import secrets
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from r3jax import programs
from r3jax.config import BATCH_AXES, MESH_AXES, resolve_mesh_shape
from r3jax.models.transformer import ModelConfig, init_params

RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("lora", None),  # a LoRA adapter's rank axis: small, replicated
    ("layers", None),  # the stacked axis of scanned layers: every device holds its shard of every layer
)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over (data, fsdp, tensor); one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(shape, len(devices))
    # Auto axes: shardings come from jit in/out shardings and propagate, as the design asks.
    return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Replicates any dimension the mesh axes do not divide (e.g. a vocabulary of 32001)."""
    def fits(axes, size):
        axes = axes if isinstance(axes, tuple) else (axes,)
        return size % int(np.prod([mesh.shape[a] for a in axes if a is not None])) == 0
    return P(*[axes if axes is None or fits(axes, size) else None
               for axes, size in zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape)])


def logical_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of boxed (logically partitioned) values or their abstract shapes."""
    mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_tree), RULES)
    return jax.tree.map(lambda spec, leaf: NamedSharding(mesh, _fit(spec, leaf.shape, mesh)),
                        mesh_specs, nn.unbox(boxed_tree), is_leaf=lambda x: isinstance(x, P))


def init_sharded(init_fn: Callable[[jax.Array], Any], key: jax.Array, mesh: Mesh) -> Any:
    """Runs `init_fn(key) -> boxed params` so each shard is created on its own device; returns
    the plain params. No device ever holds a full copy."""
    shardings = logical_shardings(jax.eval_shape(init_fn, key), mesh)
    return jax.jit(lambda k: nn.unbox(init_fn(k)), out_shardings=shardings)(key)


def shardings_like_params(tree: Any, params: Any, mesh: Mesh) -> Any:
    """A sharding for each leaf of `tree` (a state built from `params`: optimizer moments,
    counters): that of the parameter of its shape whose path ends the leaf's own path (Adam's
    moments like their weights) where it is placed on a mesh, else replicated over `mesh`."""
    by_path = {jax.tree_util.keystr(path): (leaf.shape, leaf.sharding)
               for path, leaf in jax.tree_util.tree_leaves_with_path(params)
               if isinstance(getattr(leaf, "sharding", None), NamedSharding)}

    def placed(path, leaf):
        name = jax.tree_util.keystr(path)
        matches = [p for p, (shape, _) in by_path.items() if name.endswith(p) and shape == leaf.shape]
        return by_path[max(matches, key=len)][1] if matches else NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(placed, tree)


def init_like_params(fn: Callable[[Any], Any], params: Any) -> Any:
    """`fn(params)` under jit (an optimizer's state, a step counter), laid out by
    `shardings_like_params` on the params' mesh. jit alone leaves outputs that do not depend on
    the params' values (zeros, counts) uncommitted on one device: a StateStep then replicated Adam's
    moments in full on every device of an FSDP mesh, and a multi-host run could not resume, its
    checkpoint restored onto one device of each process."""
    mesh = programs.mesh_of(params)
    if mesh is None:  # plain arrays, off any mesh
        return jax.jit(fn)(params)
    return jax.jit(fn, out_shardings=shardings_like_params(jax.eval_shape(fn, params), params, mesh))(params)


@functools.lru_cache(maxsize=8)  # one compiled copier per model and mesh: the comparison's arms share it
def compute_copy(model_cfg: ModelConfig, mesh: Mesh) -> Callable[[Any], Any]:
    """`copy(params) -> params` in the compute dtype, in new buffers, laid out as the params'
    logical axes are on `mesh`, as one jitted call: the frozen RL reference (on the training mesh)
    and, once per RL step, the sampling weights (on the rollout mesh: e.g. replicated, so decoding
    reads local weights where the FSDP training layout would all-gather every weight per token)."""
    shardings = logical_shardings(jax.eval_shape(functools.partial(init_params, model_cfg), jax.random.key(0)), mesh)
    return jax.jit(lambda params: jax.tree.map(lambda p: p.astype(model_cfg.jnp_dtype), params),
                   out_shardings=shardings)


class StateStep:
    """`jax.jit(step, donate_argnums=0)` for `step(state, *args) -> (new_state, *outputs)`, with the
    new state laid out as the state it was given (leaves on one device, such as a step counter,
    replicated over the mesh of the rest). Left to sharding propagation, the updated state can come
    out laid out otherwise (FSDP weights split over one mesh axis fewer, say), and the next call then
    compiles the whole step again for that layout. Has `lower` as a jitted function does.

    Given an `identity` (every value `step` closes over), its programs are `programs.Cached` under
    `name`: a rerun loads them from disk instead of tracing them again."""

    def __init__(self, step: Callable[..., tuple], name: str = "", identity: Any = None):
        self.step, self.name, self.identity = step, name, identity
        self.programs: dict[tuple, programs.Cached] = {}

    @staticmethod
    def _layout(state: Any) -> list[NamedSharding | None]:
        """Each leaf's sharding as a jitted call returns it (no mesh axis of size 1, no trailing
        None in the spec), so that the next call's inputs match the last one's exactly."""
        shardings = [getattr(leaf, "sharding", None) for leaf in jax.tree.leaves(state)]
        mesh = programs.mesh_of(state)
        if mesh is None:
            return [None] * len(shardings)

        def canonical(spec: tuple) -> P:
            def split(entry):
                names = tuple(n for n in (entry if isinstance(entry, tuple) else (entry,))
                              if n is not None and mesh.shape[n] > 1)
                return names[0] if len(names) == 1 else (names or None)
            spec = tuple(split(entry) for entry in spec)
            while spec and spec[-1] is None:
                spec = spec[:-1]
            return P(*spec)
        return [NamedSharding(mesh, canonical(tuple(s.spec)) if isinstance(s, NamedSharding) else P())
                for s in shardings]

    def _for(self, state: Any) -> tuple[tuple, list]:
        """(the key of `state`'s program in `programs`, created if new; its layout)."""
        layout = self._layout(state)
        key = (jax.tree.structure(state), tuple(layout))
        if key not in self.programs:
            def pinned(state, *args):
                new_state, *outputs = self.step(state, *args)
                leaves, treedef = jax.tree.flatten(new_state)
                pinned_leaves = [leaf if sharding is None else jax.lax.with_sharding_constraint(leaf, sharding)
                                 for leaf, sharding in zip(leaves, layout)]
                return (jax.tree.unflatten(treedef, pinned_leaves), *outputs)
            identity = None if self.identity is None else (self.identity, repr(layout))
            self.programs[key] = programs.Cached(self.name, pinned, identity, donate_argnums=(0,))
        return key, layout

    @staticmethod
    def _place(state: Any, layout: list) -> Any:
        leaves, treedef = jax.tree.flatten(state)
        return jax.tree.unflatten(treedef, [
            leaf if sharding is None or leaf.sharding == sharding else jax.device_put(leaf, sharding)
            for leaf, sharding in zip(leaves, layout)])

    def prepare(self, state: Any) -> Any:
        """Makes ready the programs for `state`'s layout ahead of the first call (kept ones are read
        back in the background meanwhile, `programs.Cached`), and returns `state` placed as they take
        it. A checkpoint restored onto that comes back on the mesh: a leaf left on one device (a
        count, a value head) would come back committed to it, which no other host can read."""
        return self._place(state, self._for(state)[1])

    def __call__(self, state: Any, *args):
        key, layout = self._for(state)
        return self.programs[key](self._place(state, layout), *args)

    def lower(self, state: Any, *args):
        with programs.mesh_context((state, *args)):
            return self.programs[self._for(state)[0]].jitted.lower(state, *args)

    def compilations(self) -> int:
        """Distinct call signatures compiled (or loaded) in this process."""
        return sum(program.count() for program in self.programs.values())


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Shards the batch axis over data x fsdp, replicates the rest."""
    spec = [None] * ndim
    spec[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(tree: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
    """Places every array of a host batch with its batch axis split over data x fsdp."""
    return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x), batch_axis)), tree)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array as numpy on this process, gathered from the other hosts when it is
    sharded over devices this process cannot address (multi-host)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_primary() -> bool:
    """Whether this process writes the run's files: logs, results, plots, exported models.
    Multi-host runs need a workdir on a filesystem every host sees."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process gets here (a no-op for a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def processes_not_seeing(folder: str, wait_s: float = 10.0) -> list[int]:
    """The processes that do not see a file process 0 writes in `folder` ([] for one process).
    Each looks for it for up to `wait_s` seconds: a network filesystem may show a new file late."""
    if jax.process_count() == 1:
        return []
    token = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31))))
    marker = os.path.join(folder, f".r3jax-shared-{token}")
    if is_primary():
        os.makedirs(folder, exist_ok=True)
        open(marker, "w").close()
    barrier("shared-folder marker written")  # one name: each process may spell the folder its own way
    deadline = time.monotonic() + wait_s
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    blind = processes_where(not os.path.exists(marker))
    if is_primary():
        os.remove(marker)
    return blind


def processes_where(flag: bool) -> list[int]:
    """The indices of the processes that pass `flag` True (every process must call it)."""
    if jax.process_count() == 1:
        return [0] if flag else []
    flags = multihost_utils.process_allgather(np.int32(flag))
    return [int(process) for process in np.flatnonzero(np.asarray(flags))]


def computed_by_primary(compute: Callable[[], Any]) -> Any:
    """`compute()` run on process 0 alone, and its result, or the exception it raised, given to
    every process. For what need not come out the same on every host (a sandboxed program near its
    time limit, a reward function that samples or calls a service) where every process must take
    the same decisions from it: which groups to keep, which checkpoint is best."""
    if jax.process_count() == 1:
        return compute()
    payload = b""
    if is_primary():
        try:
            payload = pickle.dumps((True, compute()))
        except Exception as error:  # raised on every process below
            payload = _pickled_error(error)
    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(payload))))
    buffer = np.zeros(1 << max(size - 1, 1).bit_length(), np.uint8)  # a power of two: few broadcast shapes
    buffer[:len(payload)] = np.frombuffer(payload, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    succeeded, value = pickle.loads(received[:size].tobytes())
    if not succeeded:
        raise value
    return value


def _pickled_error(error: Exception) -> bytes:
    try:
        return pickle.dumps((False, error))
    except Exception:  # an exception that does not pickle: its type and message
        return pickle.dumps((False, RuntimeError(f"{type(error).__name__}: {error}")))


def initialize_distributed(enabled: bool, coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Multi-host start-up when `enabled` or a coordinator / several processes are given; a no-op
    otherwise. On TPU pods and under SLURM the arguments may stay None: JAX discovers them."""
    if not (enabled or coordinator or (num_processes or 1) > 1):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; others ignore it
    jax.distributed.initialize(coordinator, num_processes, process_id)
