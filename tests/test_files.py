"""Crash-proof files: a write replaces the whole file or leaves the old one; a broken file is named."""
import json
import os
import stat

import pytest

from r3jax import files
from r3jax.errors import InputError, UnreadableFileError


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "results.json"
    files.write_json(str(path), {"accuracy": 0.5})

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        files.write_json(str(path), {"accuracy": Unserialisable()})
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert os.listdir(tmp_path) == ["results.json"]


def test_writers_round_trip_and_create_folders(tmp_path):
    files.write_jsonl(str(tmp_path / "a" / "log.jsonl"), [{"step": 1}, {"step": 2}])
    assert (tmp_path / "a" / "log.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    files.write_text(str(tmp_path / "b" / "table.md"), "| x |\n")
    assert (tmp_path / "b" / "table.md").read_text() == "| x |\n"
    files.write_json(str(tmp_path / "c.json"), {"k": [1, 2]})
    assert files.read_json(str(tmp_path / "c.json"), "") == {"k": [1, 2]}


def test_a_figure_is_a_png(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    files.save_figure(fig, str(tmp_path / "curves.png"))
    plt.close(fig)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["curves.png"]


@pytest.mark.parametrize("content, reason", [("", "empty"), ('{"a": ', "Expecting value")])
def test_an_unreadable_file_is_named_with_the_way_out(tmp_path, content, reason):
    path = tmp_path / "unit.json"
    path.write_text(content)
    with pytest.raises(UnreadableFileError, match=f"^{path} cannot be read \\({reason}.*: delete it$"):
        files.read_json(str(path), "delete it")


def test_a_checkpoint_with_broken_metadata_is_named(tmp_path):
    import jax.numpy as jnp

    from r3jax.checkpoint import Checkpointer

    state = {"w": jnp.ones(3)}
    checkpointer = Checkpointer(str(tmp_path), asynchronous=False)
    checkpointer.save(1, state, {"step": 1})
    checkpointer.close()
    (tmp_path / "1" / "meta" / "metadata").write_text('{"st')
    checkpointer = Checkpointer(str(tmp_path), asynchronous=False)
    with pytest.raises(UnreadableFileError, match=f"^{tmp_path}/1/meta/metadata cannot be read .*delete {tmp_path}/1 "):
        checkpointer.restore(1, state)
    checkpointer.close()


@pytest.mark.parametrize("damage", ["data cut short", "data lost", "metadata lost"])
def test_a_damaged_checkpoint_is_named_with_the_step_to_resume_from(tmp_path, damage):
    """A checkpoint whose arrays match the run's but cannot be read is damaged, not a changed
    config (before: a data file cut short was a traceback, a lost _METADATA "does not match this
    run's model"); one whose arrays differ still is a changed config."""
    import jax.numpy as jnp
    import optax

    from r3jax.checkpoint import Checkpointer

    params = {"w": jnp.ones((300, 100)), "b": jnp.zeros(4)}
    state = {"params": params, "opt_state": optax.adam(1e-3).init(params)}  # named tuples: orbax stores lists
    checkpointer = Checkpointer(str(tmp_path), asynchronous=False)
    for step in (1, 2):
        checkpointer.save(step, state, {"step": step})
    checkpointer.close()
    stored = tmp_path / "2" / "state"
    for data in stored.glob("**/d/*"):
        os.truncate(data, 10) if damage == "data cut short" else os.remove(data)
    if damage == "metadata lost":
        os.remove(stored / "_METADATA")
    checkpointer = Checkpointer(str(tmp_path), asynchronous=False)
    with pytest.raises(UnreadableFileError, match=f"^checkpoint {tmp_path}/2 cannot be read \\(.+\\), perhaps damaged "
                                                  f"or cut short by a crash: delete {tmp_path}/2 to resume from step 1$"):
        checkpointer.restore(2, state)
    changed = dict(state, params={"w": jnp.ones((300, 101)), "b": jnp.zeros(4)})
    with pytest.raises(InputError, match=f"^checkpoint {tmp_path}/1 does not match this run's model or optimizer "):
        checkpointer.restore(1, changed)
    checkpointer.close()


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_state_orbax_cannot_save_is_its_own_error_not_a_full_disk(tmp_path, asynchronous):
    """Before, any failed save was "could not be written ... make room", exit 74. A full disk
    (tensorstore's OS error code) is still that: tests/test_main.py's file-size limit."""
    import jax.numpy as jnp

    from r3jax.checkpoint import Checkpointer

    checkpointer = Checkpointer(str(tmp_path), asynchronous=asynchronous)
    with pytest.raises(ValueError, match="^Unsupported type: <class 'object'>"):
        checkpointer.save(1, {"w": jnp.ones(3), "unsaveable": object()}, {"step": 1})
        checkpointer.close()


def test_written_files_take_their_permissions_from_the_umask(tmp_path):
    """As any new file does: before, every file r3jax wrote was 0600 whatever the umask (results,
    exported models), so that no one else on a shared machine could read them."""
    previous = os.umask(0o022)
    try:
        files.write_text(str(tmp_path / "shared.json"), "{}")
        os.umask(0o077)
        files.write_text(str(tmp_path / "private.json"), "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
