"""Shared config pieces (ml_collections) and start-up validation.

Every experiment file in configs/ starts from `base_config()` and changes what it needs. Bad values
raise `ConfigError` with the key named; main.py turns that into one line and exit status 2.
"""
from __future__ import annotations

import math
import os

import ml_collections
import numpy as np

MODES = ("train", "sft", "rl", "eval", "compare")
STRATEGIES = ("outcome", "staged", "mixed")
DTYPES = ("float32", "bfloat16")
ARMS = {"rl": "outcome", "staged": "staged", "r3": "mixed"}


class ConfigError(ValueError):
    pass


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mode = "train"  # train = SFT then R^3; sft; rl (from config.rl.init or this workdir's SFT); eval; compare

    c.task = ml_collections.ConfigDict({"name": "arith", "options": ml_collections.ConfigDict()})

    c.tokenizer = ml_collections.ConfigDict({
        "path": "",        # .model (SentencePiece) or HF tokenizer dir; "" = model.path, else train one
        "vocab_size": 256,  # for a SentencePiece model trained on the task's training text
    })

    c.model = ml_collections.ConfigDict({
        "path": "",  # local HF checkpoint dir; "" = a from-scratch model of the shape below
        "from_scratch": True,  # False: model.path is required
        # param_dtype: the trainable weights and optimizer moments (master weights: float32 to
        # train; bfloat16 weights lose updates smaller than their spacing); dtype: what the
        # matmuls compute in (bfloat16 on accelerators); export_dtype: exported HF weights ("" =
        # param_dtype). The frozen RL reference is kept in dtype.
        "param_dtype": "float32", "dtype": "float32", "export_dtype": "",
        # the decoder layers as one scan over stacked weights; what the backward pass recomputes:
        # none, full (each layer's activations), save_dots (keeps the matmul outputs)
        "scan_layers": False, "remat": "none",
        "model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_layers": 4,
        "num_heads": 4, "num_kv_heads": 2, "head_dim": 32, "rope_theta": 10000.0,
        "max_position_embeddings": 1024, "tie_word_embeddings": False,
    })

    c.mesh = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices

    c.sft = ml_collections.ConfigDict({
        "steps": 1000, "data_epochs": 0.0,  # data_epochs > 0: that many passes over the data instead
        "batch_size": 32, "grad_accum": 1, "lr": 2e-5, "warmup_steps": 0,
        "schedule": "linear", "weight_decay": 0.0, "grad_clip": 1.0, "max_length": 1024,
        "eval_every": 0, "eval_examples": 200, "checkpoint_every": 500,
        "logits_chunk": 0,  # positions per LM-head call in the loss (memory at large vocabularies); 0 = all
    })

    c.rl = ml_collections.ConfigDict({
        "init": "",  # HF dir of the SFT model; "" = <workdir>/sft/best
        "strategy": "mixed", "num_start_states": 5, "steps": 1000, "token_budget": 0,
        "data_epochs": 0.0,  # > 0: that many passes over the start states instead of `steps`
        "batch_size": 32, "lr": 3e-7, "separate_critic": False,
        "critic_lr": 0.0,  # value head (shared) or separate critic; 0 = rl.lr
        "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0, "grad_clip": 1.0,
        "kl_coef": 0.05, "kl_mode": "reward",
        # gae: PPO with a critic (the paper's); grpo, drgrpo, rloo, reinforce_pp: critic-free, over
        # group_size completions per start state
        "estimator": "gae", "group_size": 1,
        "loss_agg": "token_mean",  # token_mean, seq_mean_token_mean, seq_mean_token_sum_norm
        "dynamic_sampling": False,  # drop groups with all-equal rewards, sample more (DAPO)
        "max_sampling_rounds": 3,  # dynamic sampling: batches sampled at most per step
        "critic_warmup_steps": 0,  # gae: steps that train only the critic
        "missing_eos_penalty": 0.0,  # subtracted from the score of a completion cut off before a stop
        "gamma": 1.0, "lam": 0.95, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2,
        "value_clip": 0.2, "vf_coef": 5.0, "entropy_coef": 0.0, "epochs": 2, "minibatches": 1,
        "score_clip": 0.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 700,
        "max_prompt_length": 512,
        "logits_chunk": 0,
        # rollout_mesh: (data, fsdp, tensor) over the same devices for sampling, the weights moved
        # into it once per step; () = sample in the training layout
        "rollout_mesh": (),  # completion positions per LM-head call in the PPO loss (memory); 0 = all
        "stage_length": 1.0, "stage_unit": "epochs",  # staged: per stage; unit steps|epochs|budget
        "stage_weights": (),  # mixed: optional weight per stage (stage 0 = the full task)
        "eval_every": 0, "eval_examples": 200, "checkpoint_every": 50,
    })

    c.eval = ml_collections.ConfigDict({
        "split": "test", "num_examples": 0, "batch_size": 32, "max_new_tokens": 700,
        # maj_k > 0: the final evaluations also vote over maj_k samples at `temperature` per problem
        "maj_k": 0, "temperature": 1.0})

    c.checkpoint = ml_collections.ConfigDict({"keep": 2})

    c.compare = ml_collections.ConfigDict({
        # arms: a strategy (rl = outcome only, staged, r3 = mixed), with -<estimator> for a
        # critic-free one (r3-grpo), which samples group_size completions per start state
        "seeds": (0, 1, 2), "arms": ("rl", "staged", "r3"), "group_size": 4,
        "continued_sft": True,  # the SFT-continued control arm: as many SFT updates as R^3 gets
        "continued_lr": 1e-4,
        "samples": 4, "sample_problems": 500,  # sampled accuracy and pass@k: samples per problem, problems
        "output": ""})  # "" = <workdir>/compare.json
    return c


def load_config_file(path: str, argument: str = "") -> ml_collections.ConfigDict:
    """`get_config([argument])` of a config file imported by its path; its own imports (such as
    `from configs import arith`) resolve from the working directory."""
    import importlib.util
    import sys

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    spec = importlib.util.spec_from_file_location("r3jax_user_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(argument) if argument else module.get_config()


def training_steps(section: ml_collections.ConfigDict, num_examples: int, examples_per_step: int) -> int:
    """`section.steps`, or with `section.data_epochs` > 0 the steps of that many passes over the data."""
    if section.data_epochs > 0:
        return max(1, math.ceil(section.data_epochs * num_examples / examples_per_step))
    return section.steps


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key}: {message}")


def validate_mesh(c: ml_collections.ConfigDict, num_devices: int) -> None:
    """The training mesh and the rollout mesh fit the devices."""
    for key, shape in (("mesh", c.mesh), ("rl.rollout_mesh", c.rl.rollout_mesh)):
        if key == "rl.rollout_mesh" and not shape:
            continue
        shape = list(shape)
        _check(len(shape) == 3 and shape.count(-1) <= 1, key, f"{tuple(shape)}: need (data, fsdp, tensor)")
        known = int(np.prod([m for m in shape if m != -1]))
        _check(num_devices % known == 0 and (-1 in shape or known == num_devices), key,
               f"{tuple(shape)} does not fit {num_devices} devices")


def validate(c: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ConfigError naming the first bad key."""
    from r3jax import optim, tasks
    from r3jax.models.transformer import REMAT_CHOICES
    from r3jax.ppo import ESTIMATORS, LOSS_AGGREGATIONS

    _check(c.mode in MODES, "mode", f"{c.mode!r} is not one of {MODES}")
    for key in ("param_dtype", "dtype", "export_dtype"):
        _check(c.model[key] in DTYPES or (key == "export_dtype" and not c.model[key]), f"model.{key}",
               f"{c.model[key]!r} is not one of {DTYPES}")
    _check(c.model.remat in REMAT_CHOICES, "model.remat", f"{c.model.remat!r} is not one of {REMAT_CHOICES}")
    _check(c.mode == "eval" or c.model.param_dtype == "float32", "model.param_dtype",
           f"{c.model.param_dtype} master weights lose updates smaller than their spacing; train with "
           "float32 and set model.dtype=bfloat16 to compute in bfloat16")
    _check(c.task.name in tasks.REGISTRY, "task.name",
           f"unknown task {c.task.name!r} (known: {', '.join(tasks.REGISTRY)})")
    for key in ("train_path", "test_path"):
        path = c.task.options.get(key)
        _check(not path or os.path.exists(path), f"task.options.{key}", f"data file {path} not found")
    _check(c.model.path or c.model.from_scratch, "model.path",
           "required by this config (a local HF checkpoint directory)")
    if c.model.path:
        _check(os.path.isdir(c.model.path), "model.path", f"model directory {c.model.path} not found")
        _check(os.path.exists(os.path.join(c.model.path, "config.json")), "model.path",
               f"{c.model.path} has no config.json")
    if c.tokenizer.path:
        _check(os.path.exists(c.tokenizer.path), "tokenizer.path", f"{c.tokenizer.path} not found")
    if c.rl.init:
        _check(os.path.isdir(c.rl.init), "rl.init", f"SFT checkpoint directory {c.rl.init} not found")
    _check(c.rl.strategy in STRATEGIES, "rl.strategy", f"{c.rl.strategy!r} is not one of {STRATEGIES}")
    _check(c.rl.kl_mode in ("reward", "loss"), "rl.kl_mode", f"{c.rl.kl_mode!r}: expected reward or loss")
    _check(c.rl.estimator in ESTIMATORS, "rl.estimator", f"{c.rl.estimator!r} is not one of {ESTIMATORS}")
    _check(c.rl.loss_agg in LOSS_AGGREGATIONS, "rl.loss_agg", f"{c.rl.loss_agg!r} is not one of {LOSS_AGGREGATIONS}")
    _check(c.rl.group_size >= (1 if c.rl.estimator == "gae" else 2), "rl.group_size",
           f"{c.rl.group_size}: rl.estimator={c.rl.estimator} needs at least "
           f"{1 if c.rl.estimator == 'gae' else 2} completions per start state")
    _check(c.rl.batch_size % c.rl.group_size == 0, "rl.group_size",
           f"{c.rl.group_size} does not divide rl.batch_size {c.rl.batch_size} (rows = start states x group)")
    _check(not c.rl.dynamic_sampling or c.rl.group_size >= 2, "rl.dynamic_sampling",
           "needs rl.group_size >= 2: it drops groups whose rewards are all equal")
    _check(c.rl.max_sampling_rounds >= 1, "rl.max_sampling_rounds", f"must be at least 1, got {c.rl.max_sampling_rounds}")
    for key in ("clip_ratio_low", "clip_ratio_high", "critic_warmup_steps", "missing_eos_penalty"):
        _check(c.rl[key] >= 0, f"rl.{key}", f"must be non-negative, got {c.rl[key]}")
    _check(c.rl.clip_ratio_low < 1, "rl.clip_ratio_low", f"must be below 1, got {c.rl.clip_ratio_low}")
    _check(c.rl.critic_warmup_steps == 0 or c.rl.estimator == "gae", "rl.critic_warmup_steps",
           f"rl.estimator={c.rl.estimator} has no critic to warm up")
    _check(c.rl.stage_unit in ("steps", "epochs", "budget"), "rl.stage_unit",
           f"{c.rl.stage_unit!r}: expected steps, epochs or budget")
    _check(c.rl.stage_unit != "budget" or c.rl.token_budget > 0, "rl.stage_unit",
           "'budget' needs rl.token_budget > 0")
    _check(c.eval.split in ("train", "validation", "test"), "eval.split", f"{c.eval.split!r}")
    _check(c.task.options.get("validation_size", 0) >= 0, "task.options.validation_size",
           f"must be a count or a fraction of the training data, got {c.task.options.get('validation_size')}")
    _check(c.task.options.get("validation_size", 0) > 0 or not (c.sft.eval_every or c.rl.eval_every
                                                                or c.eval.split == "validation"),
           "task.options.validation_size", "model selection (sft.eval_every, rl.eval_every) and "
           "eval.split=validation read a validation split carved from train: set it above 0")
    for section in ("sft", "rl"):
        _check(c[section].logits_chunk >= 0, f"{section}.logits_chunk",
               f"must be 0 (all at once) or positive, got {c[section].logits_chunk}")
    _check(c.eval.maj_k >= 0, "eval.maj_k", f"must be 0 (greedy only) or a sample count, got {c.eval.maj_k}")
    _check(c.eval.temperature > 0, "eval.temperature", f"must be positive, got {c.eval.temperature}")
    for section in ("sft", "rl"):
        _check(c[section].data_epochs >= 0, f"{section}.data_epochs",
               f"must be 0 (use {section}.steps) or a number of passes, got {c[section].data_epochs}")
        _check(c[section].schedule in optim.SCHEDULES, f"{section}.schedule",
               f"{c[section].schedule!r}: expected one of {optim.SCHEDULES}")
    for key in ("sft.batch_size", "sft.grad_accum", "rl.batch_size", "rl.epochs", "rl.minibatches",
                "rl.max_new_tokens", "rl.max_prompt_length", "eval.batch_size", "eval.max_new_tokens",
                "checkpoint.keep", "sft.lr", "rl.lr", "rl.temperature", "sft.max_length", "sft.checkpoint_every",
                "rl.checkpoint_every", "rl.num_start_states", "tokenizer.vocab_size"):
        section, name = key.split(".")
        _check(c[section][name] > 0 or (key == "rl.num_start_states" and c[section][name] == 0), key,
               f"must be positive, got {c[section][name]}")
    for key in ("sft.steps", "rl.steps", "rl.token_budget", "sft.warmup_steps", "rl.warmup_steps",
                "sft.eval_every", "rl.eval_every", "sft.eval_examples", "rl.eval_examples", "eval.num_examples",
                "rl.kl_coef", "rl.critic_lr", "rl.vf_coef", "rl.entropy_coef", "rl.value_clip", "rl.score_clip",
                "rl.top_k", "sft.weight_decay", "rl.weight_decay", "sft.grad_clip", "rl.grad_clip"):
        section, name = key.split(".")
        _check(c[section][name] >= 0, key, f"must be non-negative, got {c[section][name]}")
    _check(0 < c.rl.top_p <= 1, "rl.top_p", f"must be in (0, 1], got {c.rl.top_p}")
    for key in ("gamma", "lam"):
        _check(0 <= c.rl[key] <= 1, f"rl.{key}", f"must be in [0, 1], got {c.rl[key]}")
    for arm in c.compare.arms:
        strategy, _, estimator = arm.partition("-")
        _check(strategy in ARMS and (not estimator or estimator in ESTIMATORS), "compare.arms",
               f"{arm!r}: expected one of {tuple(ARMS)}, optionally with -<estimator> ({', '.join(ESTIMATORS)})")
    _check(c.compare.samples >= 0 and c.compare.sample_problems >= 0, "compare.samples",
           "samples per problem and problems for sampled metrics must be non-negative")
    _check(c.compare.group_size >= 2 and c.rl.batch_size % c.compare.group_size == 0, "compare.group_size",
           f"{c.compare.group_size}: needs at least 2 completions per start state, dividing rl.batch_size")
    _check(c.rl.batch_size % c.rl.minibatches == 0, "rl.minibatches",
           f"{c.rl.minibatches} does not divide rl.batch_size {c.rl.batch_size}")
    validate_mesh(c, num_devices)
    mesh = list(c.mesh)
    known = int(np.prod([m for m in mesh if m != -1]))
    data_parallel = mesh[0] * mesh[1] if -1 not in mesh[:2] else num_devices // known * (
        mesh[0] if mesh[0] != -1 else mesh[1])
    for key in ("sft.batch_size", "rl.batch_size", "eval.batch_size"):
        section, name = key.split(".")
        _check(c[section][name] % data_parallel == 0, key,
               f"{c[section][name]} is not a multiple of the data-parallel size {data_parallel}")
