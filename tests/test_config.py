"""Config checks in-process: unknown keys name their closest known keys, master-weight dtypes,
model selection on a validation split, and the learning-rate schedule by progress."""
import os
import runpy

import pytest

from r3jax import config as config_lib, main, optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARITH = os.path.join(ROOT, "configs", "arith.py")


@pytest.mark.parametrize("override, named", [
    ("--config.rl.kl_cof=0.1", "rl.kl_coef"),
    ("--config.rl.limit=3", "rl.init"),
    ("--config.sft.stepz=3", "sft.steps"),
    ("--config.task.options.max_step=3", "task.options.max_steps"),
])
def test_unknown_key_names_the_closest_known_keys(override, named):
    message = main._explain_override_failure(["r3jax", f"--config={ARITH}", override])
    key = override.split("=")[0]
    assert message.startswith(f"{key}: unknown config key") and named in message.split("closest known:")[1]


def test_known_keys_and_paper_arguments_are_not_flagged():
    paper = os.path.join(ROOT, "configs", "paper.py")
    assert main._explain_override_failure(["r3jax", f"--config={paper}:svamp", "--config.rl.lr=1e-6"]) is None


def test_missing_config_file_is_one_line():
    message = main._explain_override_failure(["r3jax", "--config=/nonexistent/exp.py:gsm8k"])
    assert message == "--config: config file /nonexistent/exp.py not found"


def test_bfloat16_master_weights_are_refused_for_training_only():
    c = config_lib.base_config()
    c.model.param_dtype = "bfloat16"
    with pytest.raises(config_lib.ConfigError, match="config.model.param_dtype: bfloat16 master weights"):
        config_lib.validate(c, num_devices=1)
    c.mode = "eval"
    config_lib.validate(c, num_devices=1)
    c.model.dtype = "bf16"
    with pytest.raises(config_lib.ConfigError, match="config.model.dtype: 'bf16'"):
        config_lib.validate(c, num_devices=1)


def test_model_selection_needs_a_validation_split():
    c = config_lib.base_config()
    c.sft.eval_every = 100
    with pytest.raises(config_lib.ConfigError, match="config.task.options.validation_size"):
        config_lib.validate(c, num_devices=1)
    c.task.options.validation_size = 0.05
    config_lib.validate(c, num_devices=1)


@pytest.mark.parametrize("task", ["gsm8k", "snli"])
def test_paper_recipes_train_float32_masters_and_select_on_validation(task):
    c = runpy.run_path(os.path.join(ROOT, "configs", "paper.py"))["get_config"](task)
    assert (c.model.param_dtype, c.model.dtype, c.model.export_dtype) == ("float32", "bfloat16", "bfloat16")
    assert c.task.options.validation_size > 0 and c.eval.split == "test"
    arith = runpy.run_path(ARITH)["get_config"]()
    assert arith.task.options.validation_size > 0 and arith.sft.eval_every > 0


def test_lr_scale_hand_worked():
    assert optim.lr_scale("linear", 2, 0, 0.0) == 0.5  # warm-up: step 1 of 2
    assert optim.lr_scale("linear", 2, 1, 0.0) == 1.0
    assert optim.lr_scale("linear", 0, 7, 0.25) == 0.75
    assert optim.lr_scale("cosine", 0, 7, 0.5) == pytest.approx(0.5)
    assert optim.lr_scale("cosine", 0, 7, 1.0) == pytest.approx(0.0)
    assert optim.lr_scale("linear", 0, 7, 1.3) == 0.0  # a budget overshot by the last batch
    assert optim.lr_scale("constant", 4, 9, 0.9) == 1.0
    with pytest.raises(ValueError, match="schedule 'step'"):
        optim.lr_scale("step", 0, 0, 0.0)
