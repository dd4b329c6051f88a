"""Config checks in-process: unknown keys name their closest known keys, master-weight dtypes,
model selection on a validation split, and the learning-rate schedule by progress."""
import os
import re
import runpy

import numpy as np
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


def test_another_tasks_option_points_to_a_config_for_that_task():
    """configs/arith.py's task.options are arith's: another task's option names the config to start from."""
    message = main._explain_override_failure(["r3jax", f"--config={ARITH}", "--config.task.name=jsonl",
                                              "--config.task.options.train_path=mine.jsonl"])
    assert message.startswith("--config.task.options.train_path: unknown config key")
    assert message.endswith(f"task.options holds the options {ARITH} sets for task arith: start from a config for "
                            "the task you want, e.g. --config=configs/jsonl.py for your own files, "
                            "--config=configs/paper.py:<task> for the paper's")
    assert "task arith" not in main._explain_override_failure(["r3jax", f"--config={ARITH}", "--config.rl.kl_cof=1"])


@pytest.mark.parametrize("line, named", [
    ("c.rl.lenght_bucket = 4", "config.rl.lenght_bucket: unknown config key"),
    ("c.model.hiden_size = 32", "config.model.hiden_size: unknown config key"),
    ("c.sedd = 1", "config.sedd: unknown config key"),
    ("c.rl['kl_cof'] = 0.1", "config.rl.kl_cof: unknown config key"),
])
def test_a_config_file_setting_an_unknown_key_is_refused_at_its_line(line, named, tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(f"from configs.arith import get_config as arith\n\n\ndef get_config():\n    c = arith()\n"
                    f"    {line}\n    return c\n")
    with pytest.raises(config_lib.ConfigError) as refused:
        config_lib.load_config_file(str(path))
    message = str(refused.value)
    assert message.startswith(named) and f"set in {path}:6 ({line};" in message, message
    assert main._explain_override_failure(["r3jax", f"--config={path}"]) == message


def test_a_bad_value_a_config_file_sets_is_refused_at_its_line(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text("from configs.arith import get_config as arith\n\n\ndef get_config():\n    c = arith()\n"
                    "    c.rl.update(top_p=1.5,\n                lr=1e-6)\n    c['sft']['steps'] = 7\n    return c\n")
    where = config_lib.where_set(str(path))
    assert where["rl.top_p"] == where["rl.lr"] == f"{path}:6: c.rl.update(top_p=1.5,"
    assert where["sft.steps"] == f"{path}:8: c['sft']['steps'] = 7"
    assert where["task.name"] == f"{ROOT}/configs/arith.py:10: c.task.name = \"arith\""  # in the file it calls
    assert "checkpoint.keep" not in where  # left at base_config's default
    c = config_lib.load_config_file(str(path))
    with pytest.raises(config_lib.ConfigError) as refused:
        config_lib.validate(c, 1)
    assert config_lib.with_setting_line(str(refused.value), str(path), []) == (
        f"config.rl.top_p: must be in (0, 1], got 1.5 (set in {path}:6: c.rl.update(top_p=1.5,)")
    overridden = config_lib.with_setting_line(str(refused.value), str(path), ["rl.top_p=1.5"])
    assert overridden == str(refused.value)  # an override set it, not the file
    assert config_lib.with_setting_line("config.checkpoint.keep: must be positive", str(path), []).endswith("positive")


def test_a_config_file_may_give_a_task_its_own_options(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text("from configs.arith import get_config as arith\n\n\ndef get_config():\n    c = arith()\n"
                    "    c.task.options.new_option = 3\n    return c\n")
    assert config_lib.load_config_file(str(path)).task.options.new_option == 3


def test_known_keys_and_paper_arguments_are_not_flagged():
    paper = os.path.join(ROOT, "configs", "paper.py")
    assert main._explain_override_failure(["r3jax", f"--config={paper}:svamp", "--config.rl.lr=1e-6"]) is None


SHIPPED_CONFIGS = [name for name in sorted(os.listdir(os.path.join(ROOT, "configs")))
                   if name.endswith(".py") and name not in ("__init__.py", "paper.py")]
PAPER_TASKS = runpy.run_path(os.path.join(ROOT, "configs", "paper.py"))["TASKS"]


@pytest.mark.parametrize("config_file", SHIPPED_CONFIGS + [f"paper.py:{task}" for task in PAPER_TASKS])
def test_every_shipped_config_takes_the_options_every_task_takes(config_file):
    """The README's `--config.task.options.reward_fn=...` works on any config, arith's included."""
    argv = ["r3jax", f"--config={os.path.join(ROOT, 'configs', config_file)}",
            "--config.task.options.reward_fn=my_rewards:score", "--config.task.options.limit=50"]
    if config_file.startswith("paper.py"):
        argv.append("--config.task.options.tfds=True")  # the file tasks' own way to their data
    assert main._explain_override_failure(argv) is None


def test_missing_config_file_is_one_line():
    message = main._explain_override_failure(["r3jax", "--config=/nonexistent/exp.py:gsm8k"])
    assert message == "--config: config file /nonexistent/exp.py not found"


@pytest.mark.parametrize("setting", [("rl", "top_k", 5), ("rl", "top_p", 0.9), ("model", "dtype", "bfloat16")])
def test_reusing_sampler_logprobs_is_refused_where_they_differ(setting):
    c = config_lib.base_config()
    c.rl.reuse_sampler_logprobs = True
    config_lib.validate(c, num_devices=1)
    section, name, value = setting
    c[section][name] = value
    with pytest.raises(config_lib.ConfigError, match=f"^config.rl.reuse_sampler_logprobs: .*{section}.{name}={value}"):
        config_lib.validate(c, num_devices=1)


@pytest.mark.parametrize("setting", [("minibatches", 2), ("prepare_chunks", 2)])
def test_packing_is_refused_where_rows_would_be_split_by_rollout(setting):
    c = config_lib.base_config()
    c.rl.pack = True
    config_lib.validate(c, num_devices=1)
    c.rl[setting[0]] = setting[1]
    with pytest.raises(config_lib.ConfigError, match=f"^config.rl.pack: .*rl.{setting[0]}=1"):
        config_lib.validate(c, num_devices=1)


def test_bfloat16_master_weights_are_refused_for_training_only(tmp_path):
    c = config_lib.base_config()
    c.model.param_dtype = "bfloat16"
    with pytest.raises(config_lib.ConfigError, match="config.model.param_dtype: bfloat16 master weights"):
        config_lib.validate(c, num_devices=1)
    c.mode = "eval"
    (tmp_path / "config.json").write_text("{}")  # a model directory, as far as validation looks
    c.model.path = str(tmp_path)
    config_lib.validate(c, num_devices=1)
    c.model.dtype = "bf16"
    with pytest.raises(config_lib.ConfigError, match="config.model.dtype: 'bf16'"):
        config_lib.validate(c, num_devices=1)


def test_an_rl_start_model_is_refused_where_the_mode_does_not_read_it(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a model directory, as far as validation looks
    c = config_lib.base_config()
    c.rl.init = str(tmp_path)
    for mode in ("rl", "compare"):
        c.mode = mode
        config_lib.validate(c, num_devices=1)
    for mode in ("train", "sft"):
        c.mode = mode
        with pytest.raises(config_lib.ConfigError, match=f"^config.rl.init: mode={mode} does not read it"):
            config_lib.validate(c, num_devices=1)


def test_a_from_scratch_model_shape_is_checked_and_a_model_path_brings_its_own(tmp_path):
    c = config_lib.base_config()
    c.model.num_heads, c.model.num_kv_heads = 3, 2
    with pytest.raises(config_lib.ConfigError, match="^config.model.num_heads: 3 query heads do not share "
                                                     "model.num_kv_heads = 2"):
        config_lib.validate(c, num_devices=1)
    (tmp_path / "config.json").write_text("{}")
    c.model.path = str(tmp_path)
    config_lib.validate(c, num_devices=1)
    c.model.path, c.model.num_heads, c.model.num_layers = "", 4, 0
    with pytest.raises(config_lib.ConfigError, match="^config.model.num_layers: must be positive, got 0"):
        config_lib.validate(c, num_devices=1)


def test_evaluation_needs_a_model_to_evaluate():
    c = config_lib.base_config()
    c.mode = "eval"
    with pytest.raises(config_lib.ConfigError, match="config.model.path: mode=eval evaluates the model in this HF"):
        config_lib.validate(c, num_devices=1)


def test_every_attention_kernel_is_accepted_on_several_devices():
    c = config_lib.base_config()
    for kernel in config_lib.ATTENTION_IMPLS:
        c.model.attention_impl = kernel
        config_lib.validate(c, num_devices=8)


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


@pytest.mark.parametrize("task", ["gsm8k_pot", "svamp_pot"])
def test_program_recipes_require_isolation(task):
    c = runpy.run_path(os.path.join(ROOT, "configs", "paper.py"))["get_config"](task)
    assert c.task.options.require_isolation is True


def test_an_unisolated_sandbox_shows_in_the_final_summary():
    lines = main.final_summary("runs/x", {"sandbox": "process (no bwrap binary)"})
    assert lines == ["sandbox: process (no bwrap binary)", "results written to runs/x"]


def test_lr_scale_hand_worked():
    assert optim.lr_scale("linear", 2, 0, 0.0) == 0.5  # warm-up: step 1 of 2
    assert optim.lr_scale("linear", 2, 1, 0.0) == 1.0
    assert optim.lr_scale("linear", 0, 7, 0.25) == 0.75
    assert optim.lr_scale("cosine", 0, 7, 0.5) == pytest.approx(0.5)
    assert optim.lr_scale("cosine", 0, 7, 1.0) == pytest.approx(0.0)
    assert optim.lr_scale("linear", 0, 7, 1.3) == 0.0  # a budget overshot by the last batch
    assert optim.lr_scale("constant", 4, 9, 0.9) == 1.0
    config = config_lib.base_config()
    config.sft.schedule = "step"  # an unknown schedule is refused once, at start-up
    with pytest.raises(config_lib.ConfigError, match="config.sft.schedule: 'step'"):
        config_lib.validate(config, 1)


BAD_VALUES = [
    ("rl.temperature", 0.0), ("rl.temperature", -1.0), ("eval.temperature", 0.0), ("rl.top_p", 1.5),
    ("rl.top_p", 0.0), ("rl.kl_coef", -0.1), ("sft.steps", -3), ("rl.steps", -1), ("sft.lr", -1e-5),
    ("sft.lr", 0.0), ("rl.lr", -3e-7), ("eval.num_examples", -3), ("rl.token_budget", -5),
    ("sft.warmup_steps", -1), ("rl.gamma", 1.5), ("rl.lam", -0.1), ("rl.top_k", -2), ("rl.vf_coef", -1.0),
    ("rl.value_clip", -0.2), ("rl.entropy_coef", -0.01), ("sft.batch_size", 0), ("rl.epochs", 0),
    ("rl.max_new_tokens", 0), ("sft.max_length", 0), ("rl.max_prompt_length", -1), ("checkpoint.keep", 0),
    ("rl.clip_ratio_low", 1.2), ("rl.clip_ratio_high", -0.1), ("rl.estimator", "ppo"), ("rl.loss_agg", "sum"),
    ("rl.group_size", 3), ("rl.schedule", "step"), ("model.dtype", "bf16"), ("model.export_dtype", "fp8"),
    ("rl.missing_eos_penalty", -1.0), ("rl.max_sampling_rounds", 0), ("eval.split", "dev"),
    ("sft.eval_examples", -1), ("rl.score_clip", -5.0), ("sft.grad_clip", -1.0), ("mode", "serve"),
    ("compare.arms", ("r3-ppo",)), ("rl.num_start_states", -1), ("eval.maj_k", -2), ("rl.length_bucket", 0),
    ("rl.pack_width", 1000),  # narrower than the longest rollout, 512 + 700
]


@pytest.mark.parametrize("key, value", BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_bad_value_is_refused_naming_its_key(key, value):
    c = config_lib.base_config()
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
    with pytest.raises(config_lib.ConfigError, match=f"^config.{key}: "):
        config_lib.validate(c, num_devices=1)


@pytest.mark.parametrize("config_file, overrides, named", [
    ("configs/arith.py", {"rl.strategy": "stagged"}, "config.rl.strategy"),
    ("configs/arith.py", {"model.path": "/nonexistent/llama"}, "/nonexistent/llama"),
    ("configs/gsm8k.py", {}, "config.model.path"),
    ("configs/gsm8k.py", {"model.path": "{hf}", "task.options.train_path": "/nonexistent/train.jsonl"},
     "/nonexistent/train.jsonl"),
    ("configs/arith.py", {"mesh": (3, 1, 1)}, "config.mesh"),
    ("configs/arith.py", {"rl.batch_size": 0}, "config.rl.batch_size"),
    ("configs/arith.py", {"eval.maj_k": -1}, "config.eval.maj_k"),
    ("configs/arith.py", {"rl.data_epochs": -1}, "config.rl.data_epochs"),
])
def test_config_file_with_a_bad_value_is_refused(config_file, overrides, named, tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a model directory, as far as validation looks
    c = config_lib.load_config_file(config_file)
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        target = c
        for part in section.split(".") if section else ():
            target = target[part]
        target[name] = value.format(hf=tmp_path) if isinstance(value, str) else value
    with pytest.raises(config_lib.ConfigError, match=named):
        config_lib.validate(c, num_devices=1)


@pytest.mark.parametrize("key", [key.name for key in config_lib.documented_keys()])
def test_none_in_a_config_file_is_refused_naming_its_key(key):
    """ConfigDict lets a config file set any key to None; most keys then raised a TypeError."""
    c = config_lib.base_config()
    section, _, name = key.rpartition(".")
    (config_lib.value_at(c, section) if section else c)[name] = None
    with pytest.raises(config_lib.ConfigError, match=f"^config.{key}: None, where a "):
        config_lib.validate(c, num_devices=1)


@pytest.mark.parametrize("key, value", [("compare.tune_lr", ("x",)), ("compare.tune_continued_lr", (1e-5, None)),
                                        ("compare.tune_kl_coef", ("0.1",)), ("rl.adaptive_band", (0.2, "x")),
                                        ("compare.arms", (0,)), ("task.options.validation_size", "x")])
def test_a_tuple_of_the_wrong_things_is_refused_naming_its_key(key, value):
    c = config_lib.base_config()
    section, _, name = key.rpartition(".")
    config_lib.value_at(c, section)[name] = value
    with pytest.raises(config_lib.ConfigError, match=f"^config.{key}: "):
        config_lib.validate(c, num_devices=1)


def test_a_missing_model_directory_is_called_a_hub_id_only_where_it_could_be_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    c = config_lib.base_config()
    cache_hint = " nor in the local Hugging Face cache (r3jax downloads nothing: `hf download {}` first"
    for path, hint in (("runs/best", ""), ("org/model", cache_hint.format("org/model")),
                       ("org/model@v2", cache_hint.format("org/model --revision v2")),
                       ("org/model@refs/pr/1", cache_hint.format("org/model --revision refs/pr/1"))):
        c.model.path = path
        with pytest.raises(config_lib.ConfigError) as refused:
            config_lib.validate(c, 1)
        assert str(refused.value).startswith(f"config.model.path: model directory {path} not found{hint}")
        assert hint or str(refused.value).endswith("not found"), str(refused.value)


def test_the_comparisons_group_size_binds_only_a_comparison():
    """A training run of 2 completions a step was refused for compare.group_size (4), a key it never reads."""
    c = config_lib.load_config_file("configs/arith.py")
    c.rl.update(batch_size=2, group_size=2)
    config_lib.validate(c, num_devices=1)
    c.mode = "compare"
    with pytest.raises(config_lib.ConfigError, match="^config.compare.group_size: 4: needs at least 2 completions"):
        config_lib.validate(c, num_devices=1)


def test_at_least_thirty_bad_inputs():
    assert len(BAD_VALUES) >= 30


@pytest.mark.parametrize("config_file, overrides, expected", [
    ("configs/arith.py", {}, "runs/arith"),
    ("configs/arith.py", {"mode": "eval"}, "runs/arith_eval"),
    ("configs/paper.py:svamp_pot", {"task.name": "svamp_pot"}, "runs/paper_svamp_pot"),
    ("configs/paper.py:snli", {"task.name": "snli"}, "runs/paper_snli"),
    ("configs/arith_compare.py", {"mode": "compare"}, "runs/arith_compare"),
])
def test_default_workdirs_never_shared_between_tasks_or_modes(config_file, overrides, expected):
    c = config_lib.base_config()
    c.task.name = "arith"
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (c[section] if section else c)[name] = value
    assert main.default_workdir(config_file, c) == expected


def _import_graph() -> dict[str, set[str]]:
    """{module: the r3jax modules it imports}, function-level imports included."""
    import ast

    package = os.path.join(ROOT, "r3jax")
    modules = {}
    for folder, _, names in os.walk(package):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".").removesuffix(".__init__")
                modules[module] = path
    graph = {module: set() for module in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("r3jax"):
                # `from package import submodule` imports the submodule; anything else, the module named
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[module] |= {target for target in targets if target in modules and target != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` as a path of modules, or [] when it has none."""
    state, path = {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[module] = "done"
        path.pop()
        return []

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return []


def test_import_graph_has_no_cycle_and_config_is_a_leaf():
    graph = _import_graph()
    assert _cycle(graph) == []
    assert graph["r3jax.config"] == {"r3jax.errors"} and graph["r3jax.errors"] == set()
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the checker finds one


def test_choice_lists_are_the_ones_their_modules_act_on():
    from r3jax import ppo, tasks
    from r3jax.models.transformer import REMAT_POLICIES

    assert set(tasks.REGISTRY) == set(config_lib.TASKS)
    assert set(config_lib.REMAT_CHOICES) == {"none", *REMAT_POLICIES}
    for schedule in config_lib.SCHEDULES:
        assert 0 <= optim.lr_scale(schedule, 0, 5, 0.5) <= 1
    for aggregation in config_lib.LOSS_AGGREGATIONS:
        ppo.aggregate(np.ones((2, 3), np.float32), np.ones((2, 3), np.float32), aggregation)


@pytest.mark.parametrize("key", [key for key in config_lib.documented_keys() if key.choices], ids=lambda k: k.name)
def test_every_choice_is_checked_and_listed_in_help(key):
    c = config_lib.base_config()
    section, _, name = key.name.rpartition(".")
    (c[section] if section else c)[name] = "no-such-choice"
    with pytest.raises(config_lib.ConfigError, match=f"config.{key.name}: 'no-such-choice' is not one of"):
        config_lib.validate(c, num_devices=1)
    entry = re.split(r"\n  (?=\S)", main.help_text(["r3jax"]).split(f"\n  {key.name} = ", 1)[1])[0]
    assert "one of: " + ", ".join(map(repr, key.choices)) in entry


def test_functions_are_short_and_take_few_parameters():
    """No function of r3jax/ runs past 60 lines or takes more than 8 parameters (an option
    constructor, a task's __init__ with its options, aside)."""
    import ast

    too_long = []
    for folder, _, names in os.walk(os.path.join(ROOT, "r3jax")):
        for name in (n for n in names if n.endswith(".py")):
            path = os.path.join(folder, name)
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.FunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    parameters = len([a for a in node.args.args + node.args.kwonlyargs if a.arg != "self"])
                    if lines > 60 or (parameters > 8 and node.name != "__init__"):
                        too_long.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} "
                                        f"({lines} lines, {parameters} parameters)")
    assert too_long == []


@pytest.mark.parametrize("config_file", ["configs/arith.py", "configs/arith_compare.py",
                                         "configs/arith_compare_10x.py", "configs/arith_lora.py"])
def test_the_shipped_arith_configs_validate(config_file, tmp_path):
    """Each shipped config that needs no downloaded model validates as written; arith_lora, which
    starts from the main job's SFT model, names rl.init until that model exists."""
    c = config_lib.load_config_file(config_file)
    if c.rl.init:
        with pytest.raises(config_lib.ConfigError, match="^config.rl.init: .*runs/arith/sft/best"):
            config_lib.validate(c, num_devices=1)
        (tmp_path / "config.json").write_text("{}")
        c.rl.init = str(tmp_path)
    config_lib.validate(c, num_devices=1)
