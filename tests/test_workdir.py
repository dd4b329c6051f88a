"""Workdir identity: a rerun under a different config is refused key by key unless config.resume
says what to do; growing a finished phase extends it; comparison units are named by their config."""
import json
import os

import pytest

from r3jax import config as config_lib, workdir
from r3jax.errors import UnreadableFileError
from r3jax.train import compare


def _stored(path, config):
    """A workdir whose run under `config` made its SFT phase."""
    os.makedirs(os.path.join(path, "sft"), exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**json.loads(config.to_json_best_effort()), "runtime": {"sandbox": "none"}}, f)


def test_an_identical_rerun_is_accepted_silently(tmp_path):
    config = config_lib.base_config()
    _stored(tmp_path, config)
    assert workdir.claim(str(tmp_path), config) == []
    assert workdir.claim(str(tmp_path / "fresh"), config) == []


def test_a_different_config_is_refused_one_line_per_key(tmp_path):
    old = config_lib.base_config()
    _stored(tmp_path, old)
    new = config_lib.base_config()
    new.task.name, new.sft.lr, new.eval.num_examples = "gsm8k", 1e-3, 7  # eval keys never conflict
    with pytest.raises(config_lib.ConfigError) as error:
        workdir.claim(str(tmp_path), new)
    lines = str(error.value).splitlines()
    assert lines[0] == f"--workdir={tmp_path} was made by a different config:"
    assert lines[1:3] == ["  sft.lr: 2e-05 there, 0.001 now", "  task.name: 'arith' there, 'gsm8k' now"]
    assert "--config.resume=continue" in lines[3] and len(lines) == 4
    (tmp_path / "sft" / "best").mkdir()
    rl_only = config_lib.base_config()
    rl_only.rl.strategy = "staged"
    with pytest.raises(config_lib.ConfigError) as error:
        workdir.claim(str(tmp_path), rl_only)
    assert str(error.value).splitlines()[-1] == (
        f"(RL alone differs: --config.mode=rl --config.rl.init={tmp_path}/sft/best in another --workdir trains it "
        "from this workdir's SFT model)")


def test_a_workdir_from_before_a_key_existed_takes_its_default(tmp_path):
    config = config_lib.base_config()
    older = json.loads(config.to_json_best_effort())
    del older["resume"], older["metrics"], older["rl"]["max_log_ratio"]
    (tmp_path / "config.json").write_text(json.dumps(older))
    (tmp_path / "sft").mkdir()
    assert workdir.claim(str(tmp_path), config) == []
    config.rl.max_log_ratio = 10.0
    with pytest.raises(config_lib.ConfigError, match="rl.max_log_ratio: 20.0 there, 10.0 now"):
        workdir.claim(str(tmp_path), config)


def test_a_workdir_that_holds_only_its_config_takes_a_new_one(tmp_path):
    """A run that failed at start-up (a model directory without a tokenizer) left its config.json
    and nothing else (but hidden files: a crashed write's temp file, a start-up's shared-folder
    marker): the corrected command runs there; anything more, and it is refused."""
    _stored(tmp_path, config_lib.base_config())
    (tmp_path / "sft").rmdir()
    (tmp_path / ".r3jax-shared-123").write_text("")
    new = config_lib.base_config()
    new.tokenizer.path = "/models/tokenizer.model"
    assert workdir.claim(str(tmp_path), new) == [
        f"{tmp_path}/config.json was all an earlier run left (it stopped before making anything): "
        "running under the new config"]
    (tmp_path / "tokenizer.model").write_text("")
    with pytest.raises(config_lib.ConfigError, match="tokenizer.path: '' there"):
        workdir.claim(str(tmp_path), new)


def test_resume_continue_keeps_and_restart_moves_aside(tmp_path):
    _stored(tmp_path / "run", config_lib.base_config())
    new = config_lib.base_config()
    new.rl.kl_coef, new.resume = 0.1, "continue"
    messages = workdir.claim(str(tmp_path / "run"), new)
    assert messages[0].startswith("resume=continue") and "rl.kl_coef: 0.05 there, 0.1 now" in messages[1]
    assert (tmp_path / "run" / "sft").exists()
    new.resume = "restart"
    assert workdir.claim(str(tmp_path / "run"), new) == [f"resume=restart: moved the old workdir to {tmp_path}/run.old-1"]
    assert (tmp_path / "run.old-1" / "sft").exists() and not (tmp_path / "run").exists()


def test_growing_a_phase_extends_it_and_a_longer_sft_retires_the_rl_phase(tmp_path):
    old = config_lib.base_config()
    _stored(tmp_path, old)
    (tmp_path / "rl").mkdir()
    new = config_lib.base_config()
    new.sft.steps, new.rl.token_budget, new.compare.seeds, new.mode = 2000, 10, (0, 1, 2, 3), "rl"
    new.compare.tune_lr = (1e-5, 3e-5)  # more tuning trials: the finished ones stay valid
    messages = workdir.claim(str(tmp_path), new)
    assert "extending: sft.steps 1000 -> 2000" in messages and "extending: compare.seeds [0, 1, 2] -> [0, 1, 2, 3]" in messages
    assert "extending: compare.tune_lr [] -> [1e-05, 3e-05]" in messages
    assert messages[-1].endswith(f"moved to {tmp_path}/rl.before-sft-extension-1") and not (tmp_path / "rl").exists()
    shrunk = config_lib.base_config()
    shrunk.compare.seeds = (0,)  # fewer seeds is not an extension
    with pytest.raises(config_lib.ConfigError, match="compare.seeds"):
        workdir.claim(str(tmp_path), shrunk)


@pytest.mark.parametrize("content", ["", '{"seed": 0, "mode": "tr'], ids=["empty", "cut-short"])
def test_an_unreadable_stored_config_is_named_and_restart_recovers(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(content)
    config = config_lib.base_config()
    with pytest.raises(UnreadableFileError, match=f"^{run}/config.json cannot be read .*--config.resume=restart"):
        workdir.claim(str(run), config)
    config.resume = "restart"
    assert workdir.claim(str(run), config) == [
        f"resume=restart: {run}/config.json was unreadable; moved the old workdir to {run}.old-1"]
    assert not run.exists() and (tmp_path / "run.old-1" / "config.json").read_text() == content


def test_bad_resume_value_is_named():
    config = config_lib.base_config()
    config.resume = "yes"
    with pytest.raises(config_lib.ConfigError, match="config.resume"):
        config_lib.validate(config, 1)


def test_comparison_units_are_named_by_every_defining_value(tmp_path):
    config = config_lib.base_config()
    base = compare.unit_dir(config, "out", "r3", "seed0")
    assert base.startswith(os.path.join("out", "r3-seed0-"))
    more_seeds = config.copy_and_resolve_references()
    more_seeds.compare.seeds, more_seeds.eval.num_examples = (0, 1, 2, 3, 4), 9
    assert compare.unit_dir(more_seeds, "out", "r3", "seed0") == base
    for key, value in (("rl.token_budget", 999), ("rl.lr", 1e-5), ("sft.steps", 5), ("seed", 3)):
        changed = config.copy_and_resolve_references()
        section, _, name = key.rpartition(".")
        (changed[section] if section else changed)[name] = value
        assert compare.unit_dir(changed, "out", "r3", "seed0") != base, key
    evaluated = config.copy_and_resolve_references()
    evaluated.eval.num_examples = 9
    assert workdir.evaluation_key(evaluated) != workdir.evaluation_key(config)
