"""Programs kept on disk (r3jax/programs.py): a rerun loads what an earlier run compiled, without
tracing it, and gets the same numbers; anything that defines the program makes another file."""
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r3jax import programs
from r3jax.sharding import StateStep


@pytest.fixture
def kept_in(tmp_path, monkeypatch):
    monkeypatch.setattr(programs, "folder", lambda: str(tmp_path))
    return tmp_path


def counting_step(traces: list, salt: float):
    """step(state [4], x [4]) -> (state + x, {"dot": state . x * salt}); appends to `traces` when
    traced. Tests give each program a salt of its own, so that JAX's persistent cache (conftest's,
    shared by the session) has never seen it: a program read back from that cache is not kept."""
    def step(state, x):
        traces.append(x.shape)
        return state + x, {"dot": state @ x * salt}
    return step


@pytest.fixture
def salt():
    return float(np.random.default_rng().integers(1, 2**20))


def kept(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".program"))


def test_a_rerun_loads_the_program_and_traces_nothing(kept_in, salt):
    traces = []
    state, x = jnp.arange(4.0), jnp.full(4, 2.0)
    first_state, first_out = StateStep(counting_step(traces, salt), "probe", identity="v1")(state.copy(), x)
    assert len(traces) == 1 and len(kept(kept_in)) == 1
    rerun = StateStep(counting_step(traces, salt), "probe", identity="v1")  # a new process's step
    for _ in range(2):
        rerun_state, rerun_out = rerun(state.copy(), x)
        np.testing.assert_array_equal(rerun_state, first_state)
        np.testing.assert_array_equal(rerun_out["dot"], first_out["dot"])
    assert len(traces) == 1, "the rerun traced the step"
    assert rerun.compilations() == 1


def test_another_identity_or_shape_is_another_program(kept_in, salt):
    traces = []
    StateStep(counting_step(traces, salt), "probe", identity="v1")(jnp.zeros(4), jnp.ones(4))
    StateStep(counting_step(traces, salt + 1), "probe", identity="v2")(jnp.zeros(4), jnp.ones(4))
    step = StateStep(counting_step(traces, salt), "probe", identity="v1")
    _, out = step(jnp.zeros(3), jnp.ones(3))
    assert len(traces) == 3 and len(kept(kept_in)) == 3
    step(jnp.zeros(4), jnp.ones(4))  # kept from the first call
    assert len(traces) == 3 and step.compilations() == 2


def test_a_broken_file_is_removed_and_its_program_compiled_again(kept_in, salt, capsys):
    traces = []
    StateStep(counting_step(traces, salt), "probe", identity="v1")(jnp.zeros(4), jnp.ones(4))
    (name,) = kept(kept_in)
    (kept_in / name).write_bytes(b"not a program")
    new_state, out = StateStep(counting_step(traces, salt), "probe", identity="v1")(jnp.ones(4), jnp.ones(4))
    assert re.search(r"^warning: .*\.program: could not be loaded \(", capsys.readouterr().err, re.M)
    assert len(traces) == 2
    np.testing.assert_array_equal(new_state, 2.0)
    assert float(out["dot"]) == 4.0 * salt
    assert not kept(kept_in)  # compiled again from JAX's cache (conftest's), so not kept


def test_without_an_identity_or_a_folder_nothing_is_kept(tmp_path, monkeypatch, salt):
    traces = []
    monkeypatch.setattr(programs, "folder", lambda: str(tmp_path))
    StateStep(counting_step(traces, salt), "probe")(jnp.zeros(4), jnp.ones(4))
    monkeypatch.setattr(programs, "folder", lambda: None)
    StateStep(counting_step(traces, salt), "probe", identity="v1")(jnp.zeros(4), jnp.ones(4))
    assert not os.listdir(tmp_path) and len(traces) == 2


def test_a_program_jaxs_cache_holds_under_its_own_name_is_still_kept(kept_in, salt):
    """As after an upgrade of r3jax that left the program's HLO as it was: JAX's cache has it
    (compiled by plain `jax.jit`), this folder has not."""
    traces = []
    jax.jit(counting_step(traces, salt), donate_argnums=0)(jnp.zeros(4), jnp.ones(4))
    StateStep(counting_step(traces, salt), "probe", identity="v1")(jnp.zeros(4), jnp.ones(4))
    assert len(kept(kept_in)) == 1
    new_state, out = StateStep(counting_step(traces, salt), "probe", identity="v1")(jnp.ones(4), jnp.ones(4))
    assert len(traces) == 2  # the plain jit's and the kept program's compile; the rerun loaded it
    np.testing.assert_array_equal(new_state, 2.0)
    assert float(out["dot"]) == 4.0 * salt


def test_a_program_read_back_from_jaxs_cache_is_not_kept(kept_in, salt):
    traces = []
    StateStep(counting_step(traces, salt), "probe", identity="v1")(jnp.zeros(4), jnp.ones(4))
    (name,) = kept(kept_in)
    os.remove(kept_in / name)  # JAX's cache has the program, this folder has not
    new_state, out = StateStep(counting_step(traces, salt), "probe", identity="v1")(jnp.ones(4), jnp.ones(4))
    assert not kept(kept_in) and len(traces) == 2
    np.testing.assert_array_equal(new_state, 2.0)
    assert float(out["dot"]) == 4.0 * salt


def test_the_key_changes_with_what_defines_a_program(monkeypatch):
    signature = programs.signature((jnp.zeros((2, 3)), np.zeros(3, np.int32), 1.0))
    assert programs.signature_text(signature)[1] == (
        ("float32[2,3]", repr(jnp.zeros((2, 3)).sharding)), ("int32[3]", "None"), ("~float32[]", "None"))
    key = programs.program_key("update", ("model", "rl"), signature)
    assert programs.program_key("update", ("model", "rl"), signature) == key
    assert programs.program_key("update", ("other model", "rl"), signature) != key
    assert programs.program_key("update", ("model", "rl"), programs.signature((jnp.zeros((2, 4)),))) != key
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=true")
    assert programs.program_key("update", ("model", "rl"), signature) != key
    monkeypatch.undo()
    with jax.debug_nans(True):
        assert programs.program_key("update", ("model", "rl"), signature) != key


def test_the_folder_follows_jaxs_cache():
    cache = jax.config.jax_compilation_cache_dir  # conftest's
    assert programs.folder() == os.path.join(os.path.expanduser(cache), programs.FOLDER)
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert programs.folder() is None
    finally:
        jax.config.update("jax_compilation_cache_dir", cache)


def test_kept_programs_are_read_back_ahead_of_their_first_call(kept_in, salt, monkeypatch):
    traces = []
    step_of = functools.partial(StateStep, counting_step(traces, salt), "probe", identity="v1")
    first, second = step_of(), step_of()
    first(jnp.zeros(4), jnp.ones(4))
    second(jnp.zeros(3), jnp.ones(3))
    (older, newer) = sorted(kept(kept_in), key=lambda name: os.path.getmtime(kept_in / name))
    os.utime(kept_in / older, (1, 1))  # last used long ago
    monkeypatch.setattr(programs, "READ_AHEAD", 1)
    rerun = step_of()
    rerun.prepare(jnp.zeros(3))
    (cached,) = rerun.programs.values()
    assert list(cached.read_ahead) == [str(kept_in / newer)]  # the most recently used only
    cached.read_ahead[str(kept_in / newer)].result(timeout=60)  # read back before any call
    new_state, out = rerun(jnp.ones(3), jnp.ones(3))
    np.testing.assert_array_equal(new_state, 2.0)
    assert float(out["dot"]) == 3.0 * salt
    assert not cached.read_ahead and len(traces) == 2, "the rerun traced the step"
    rerun(jnp.ones(4), jnp.ones(4))  # not read ahead: loaded at its call, still without tracing
    assert len(traces) == 2 and os.path.getmtime(kept_in / older) > 1


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "plain-jit"])
def test_a_program_is_traced_under_the_mesh_its_arguments_lie_on(tmp_path, monkeypatch, salt, keep):
    """What `transformer.per_device` reads: the mesh of the arguments, or none for arrays on one
    device or a one-device mesh; a later call on another kind traces again rather than reusing
    another's program."""
    from r3jax import sharding

    monkeypatch.setattr(programs, "folder", lambda: str(tmp_path) if keep else None)
    seen = []

    def step(state, x):
        mesh = jax.sharding.get_abstract_mesh()
        seen.append(None if mesh.empty else dict(mesh.shape))
        return state + x * salt, {}

    on_mesh = StateStep(step, "mesh-probe", identity="v1" if keep else None)
    mesh = sharding.make_mesh((2, 2, 2))
    on_mesh(*sharding.shard_batch((jnp.zeros(8), jnp.ones(8)), mesh))
    on_mesh(jnp.zeros(8), jnp.ones(8))
    on_mesh(*sharding.shard_batch((jnp.zeros(4), jnp.ones(4)), sharding.make_mesh((1, 1, 1), jax.devices()[:1])))
    assert seen == [{"data": 2, "fsdp": 2, "tensor": 2}, None, None]


def test_the_samplers_programs_are_read_back_before_the_first_rollout(kept_in, salt, monkeypatch):
    """`sampling.read_ahead` (what RL calls at set-up) has the loader thread read the sampler's kept
    program back, so that a rerun's first `sample` neither traces nor loads it itself."""
    import threading

    from helpers import TINY, tiny_params
    from r3jax import sampling

    settings = sampling.SamplingConfig(max_new_tokens=3, temperature=1.0 + salt / 2**30)  # a program of its own
    params, prompts = tiny_params(), jnp.arange(1, 9, dtype=jnp.int32).reshape(2, 4)
    sample = functools.partial(sampling.sample, TINY, params, prompts, jnp.ones_like(prompts), jax.random.key(0),
                               settings)
    sampling._generator.cache_clear()
    first = sample()
    assert len(kept(kept_in)) == 1
    sampling._generator.cache_clear()  # as in a new process
    readers = []
    read_program = programs.read_program
    monkeypatch.setattr(programs, "read_program",
                        lambda path: readers.append(threading.current_thread().name) or read_program(path))
    sampling.read_ahead(TINY, settings)
    assert sampling._generator.cache_info().currsize == 1
    cached = sampling._generator(TINY, settings)
    for future in cached.read_ahead.values():
        future.result(timeout=60)
    monkeypatch.setattr(programs, "compile_for_keeping", lambda *_: pytest.fail("the rerun compiled the sampler"))
    again = sample()
    sampling._generator.cache_clear()
    assert readers == ["r3jax-programs"] and not cached.read_ahead
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(first.tokens))


def test_kept_programs_keep_within_the_bound_least_recently_used_first(tmp_path):
    for age, name in enumerate(["newest", "middle", "oldest"]):
        path = tmp_path / f"{name}.program"
        path.write_bytes(b"x" * 100)
        os.utime(path, (1e9 - age, 1e9 - age))
    (tmp_path / "other-cache").write_bytes(b"x" * 1000)  # JAX's entry: its own cache bounds it
    programs.keep_within(str(tmp_path), -1)
    assert kept(tmp_path) == ["middle.program", "newest.program", "oldest.program"]
    programs.keep_within(str(tmp_path), 250)
    assert kept(tmp_path) == ["middle.program", "newest.program"]
    programs.keep_within(str(tmp_path), 99)
    assert kept(tmp_path) == [] and (tmp_path / "other-cache").exists()


def test_a_new_program_past_the_bound_removes_the_least_recently_used(kept_in, salt, monkeypatch):
    traces = []
    StateStep(counting_step(traces, salt), "probe", identity="v1")(jnp.zeros(3), jnp.ones(3))
    (first,) = kept(kept_in)
    os.utime(kept_in / first, (1e9, 1e9))
    monkeypatch.setattr(programs, "max_bytes", os.path.getsize(kept_in / first) + 1)
    StateStep(counting_step(traces, salt), "probe", identity="v1")(jnp.zeros(4), jnp.ones(4))
    assert len(traces) == 2 and len(kept(kept_in)) == 1 and kept(kept_in) != [first]
