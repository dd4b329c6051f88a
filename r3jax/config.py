"""Shared config pieces (ml_collections) and start-up validation.

Every experiment file in configs/ starts from `base_config()` and changes what it needs. Bad values
raise `ConfigError` with the key named; main.py turns that into one line and exit status 2. A key
the table does not have, or a bad value, set in a config file, is refused naming the file and line
that set it.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import linecache
import math
import os
import re
import sys
import traceback
from typing import Any, NamedTuple, Sequence

import ml_collections

from r3jax.errors import ConfigError

# Choice lists, each used by one SCHEMA entry below and imported from here by the modules that
# act on it: a new choice is added in one place, next to its key's default and meaning.
MODES = ("train", "sft", "rl", "eval", "compare")
RESUME_CHOICES = ("", "continue", "restart")
TASKS = ("arith", "gsm8k", "gsm8k_pot", "svamp", "svamp_pot", "snli", "mnli", "race", "race_high",
         "race_middle", "boardgameqa", "jsonl")
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = ("float32", "bfloat16")
LORA_BASE_DTYPES = (*DTYPES, "int8", "nf4")
REMAT_CHOICES = ("none", "full", "save_dots")
ATTENTION_IMPLS = ("xla", "cudnn", "pallas", "splash", "auto")
SCHEDULES = ("constant", "linear", "cosine")
# org/name, as the Hugging Face hub names a model, and optionally @revision (a branch, tag or commit)
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w.-]+(?:/[\w.-]+)*))?")
# the keys naming a model or tokenizer directory, which may also be a hub id in the local HF cache
MODEL_DIR_KEYS = ("model.path", "tokenizer.path", "rl.init", "model.lora.init_from")
STRATEGIES = ("outcome", "staged", "mixed", "adaptive", "hint_on_failure")
STAGE_UNITS = ("steps", "epochs", "budget")
KL_MODES = ("reward", "loss")
ESTIMATORS = ("gae", "grpo", "drgrpo", "rloo", "reinforce_pp")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
SPLITS = ("test", "validation", "train")
WANDB_MODES = ("", "offline", "online")
COMPARE_METRICS = ("greedy", "sample")
ARMS = {"rl": "outcome", "staged": "staged", "r3": "mixed", "adaptive": "adaptive", "hint_on_failure": "hint_on_failure"}  # compare.arms: arm -> rl.strategy
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Every config key: (default, meaning) or (default, meaning, choices). base_config(), validate()
# and `python -m r3jax.main --help` all read this one table; a key added here is documented (and
# its choices checked) by construction.
SCHEMA: dict[str, Any] = {
    "seed": (0, "seeds the model's initialisation, the data order and sampling"),
    "mode": ("train", "train (SFT then RL), sft, rl (from rl.init or this workdir's SFT), eval (model.path's model), "
                      "compare", MODES),
    "compile_cache": ("~/.cache/r3jax/jax", "JAX's persistent compilation cache, shared by runs and processes "
                                            "(a rerun skips compiling), with r3jax's kept programs in its "
                                            "r3jax-programs/ (a rerun skips tracing its steps); '' = off; "
                                            "JAX_COMPILATION_CACHE_DIR wins"),
    "compile_cache_max_gb": (10.0, "the most disk compile_cache takes: JAX's entries and the kept programs each "
                                   "keep to half, the least recently used removed first; 0 = no bound; "
                                   "JAX_COMPILATION_CACHE_MAX_SIZE wins for JAX's entries"),
    "stall_timeout_s": (0.0, "ends the run (exit status 124) when, past a loop's first step, no step nor evaluation "
                             "batch finishes for this many seconds: a reward function or service that hangs, or a "
                             "process stuck; longer than the slowest step, a new shape's compile included; 0 = never"),
    "resume": ("", "a workdir whose stored config differs: '' refuses, 'continue' keeps what is there and "
                   "runs under the new config, 'restart' moves the old workdir aside and starts afresh", RESUME_CHOICES),
    "task": {
        "name": ("arith", "the task: arith, gsm8k, gsm8k_pot, svamp, svamp_pot, snli, mnli, race, race_high, "
                          "race_middle, boardgameqa, jsonl", TASKS),
        "options": ({"limit": 0, "reward_fn": ""},
                    "the task's own options (README, Tasks). Every task: validation_size (a count or "
                    "fraction of train carved off for model selection), limit (at most N demonstrations of "
                    "each split; 0 = all) and reward_fn (package.module:function, replacing the task's "
                    "scorer), the last two in every config. File tasks: train_path, test_path, tfds. jsonl: "
                    "cut, answer_type, answer_marker, partial_reward. arith: seed, num_train, num_test, "
                    "min_steps, max_steps, max_value, max_operand, operations, distractors, partial_reward"),
    },
    "tokenizer": {
        "path": ("", "a SentencePiece .model or an HF tokenizer dir; '' = model.path's, else one trained on "
                     "the task's training text"),
        "vocab_size": (256, "the vocabulary of a SentencePiece model trained on the task's text"),
    },
    "model": {
        "path": ("", "a local HF checkpoint dir (Llama, Mistral, Qwen2, Qwen3), or a hub id (org/name, or "
                     "org/name@revision: a branch, tag or full commit hash) already in the local Hugging Face cache "
                     "(nothing is downloaded); '' = a from-scratch model of the shape below"),
        "from_scratch": (True, "allow a from-scratch model; False makes model.path required"),
        "param_dtype": ("float32", "trainable weights and optimizer moments (master weights; bfloat16 ones "
                                   "lose updates smaller than their spacing)", DTYPES),
        "dtype": ("float32", "what the matmuls compute in (bfloat16 on accelerators); the frozen RL "
                             "reference is kept in it", DTYPES),
        "export_dtype": ("", "exported HF weights; '' = param_dtype", ("", *DTYPES)),
        "scan_layers": (False, "the decoder layers as one scan over stacked weights (compile time flat in "
                               "depth)"),
        "remat": ("none", "what the backward pass recomputes: none, full (each layer's activations), "
                          "save_dots (keeps the matmul outputs)", REMAT_CHOICES),
        "attention_chunk": (0, "queries attended at a time in a training or prefill forward (memory: one "
                               "block's scores exist at once, recomputed in the backward pass); 0 = all"),
        "attention_impl": ("auto", "the attention kernel of a training or update forward: xla (masked dense), "
                                  "cudnn (cuDNN flash attention; GPU, model.dtype bfloat16), pallas (Pallas "
                                  "flash attention with segment ids; GPU), splash (Pallas splash attention with "
                                  "segment ids; TPU), auto (cudnn on a GPU under "
                                  "bfloat16, else xla)", ATTENTION_IMPLS),
        "model_type": ("llama", "from scratch: llama, mistral, qwen2 or qwen3 (q/k norms)", MODEL_TYPES),
        "hidden_size": (128, "from scratch: width"),
        "intermediate_size": (384, "from scratch: MLP width"),
        "num_layers": (4, "from scratch: decoder layers"),
        "num_heads": (4, "from scratch: attention heads"),
        "num_kv_heads": (2, "from scratch: key/value heads (grouped-query attention)"),
        "head_dim": (32, "from scratch: width per head"),
        "rope_theta": (10000.0, "from scratch: RoPE base"),
        "max_position_embeddings": (1024, "from scratch: longest sequence"),
        "tie_word_embeddings": (False, "from scratch: the LM head reuses the embedding"),
        "lora": {
            "rank": (0, "> 0: SFT and RL train LoRA adapters of this rank (float32) on a frozen base instead of "
                        "every weight; the RL reference is the base with the adapters off (no copy)"),
            "alpha": (16.0, "the adapters' output is scaled by alpha / rank"),
            "targets": (".*_proj", "regular expression over the projections that get adapters: "
                                   + ", ".join(LORA_MODULES)),
            "base_dtype": ("float32", "the frozen base's weights (replaces model.param_dtype under LoRA); int8: "
                                      "projection kernels in int8 with a float32 scale per output feature, the "
                                      "rest in bfloat16; nf4 (QLoRA): kernels as 4-bit NormalFloat codes with a "
                                      "float32 scale per 64 input weights of each output feature, the rest in "
                                      "bfloat16", LORA_BASE_DTYPES),
            "init_from": ("", "a PEFT adapter dir (e.g. a run's sft/best/adapter) the first phase's adapters start "
                              "from, on the model it was trained on (model.path; mode=rl: rl.init); '' = fresh "
                              "adapters. Its rank and targets must be this config's"),
        },
    },
    "mesh": ((-1, 1, 1), "(data, fsdp, tensor) device mesh; -1 takes the remaining devices"),
    "sft": {
        "steps": (1000, "optimizer updates"),
        "data_epochs": (0.0, "> 0: that many passes over the data instead of sft.steps"),
        "batch_size": (32, "sequences per microbatch"),
        "grad_accum": (1, "microbatches per update"),
        "lr": (2e-5, "peak learning rate (AdamW)"),
        "warmup_steps": (0, "linear warm-up"),
        "schedule": ("linear", "decay after warm-up: constant, linear or cosine", SCHEDULES),
        "weight_decay": (0.0, "AdamW weight decay"),
        "grad_clip": (1.0, "global gradient-norm clip; 0 = none"),
        "max_length": (1024, "longest SFT sequence; longer examples are left out"),
        "eval_every": (0, "steps between validation evaluations that pick sft/best; 0 = never (best = last)"),
        "eval_examples": (200, "validation problems per evaluation"),
        "checkpoint_every": (500, "steps between checkpoints"),
        "logits_chunk": (0, "positions per LM-head call in the loss (memory at large vocabularies); 0 = all"),
    },
    "rl": {
        "init": ("", "HF dir of the SFT model that mode=rl and mode=compare start from; '' = <workdir>/sft/best"),
        "strategy": ("mixed", "start states: outcome (k = 0 only), staged (easiest stage first), mixed (R^3), "
                              "adaptive (each demonstration's start point moved by its samples' success), "
                              "hint_on_failure (k = 0; groups that all fail sampled again from a hint)", STRATEGIES),
        "full_task_fraction": (0.25, "adaptive: the share of every batch's start states at k = 0"),
        "adaptive_band": ((0.2, 0.8), "adaptive: a demonstration's start point moves one state earlier when at least "
                                      "the upper share of its samples succeed, one later at or below the lower"),
        "num_start_states": (5, "M start states per demonstration; 0 = one per step"),
        "steps": (1000, "RL steps (a batch sampled, then rl.epochs x rl.minibatches updates)"),
        "token_budget": (0, "> 0: stop after this many sampled completion tokens"),
        "data_epochs": (0.0, "> 0: that many passes over the start states instead of rl.steps"),
        "batch_size": (32, "completions per step (start states x rl.group_size)"),
        "lr": (3e-7, "policy learning rate"),
        "separate_critic": (False, "a critic model of its own instead of a value head on the policy"),
        "critic_lr": (0.0, "value head or critic learning rate; 0 = rl.lr"),
        "warmup_steps": (0, "linear warm-up steps"),
        "schedule": ("constant", "decay over the run's progress (steps or budget): constant, linear, cosine", SCHEDULES),
        "weight_decay": (0.0, "AdamW weight decay"),
        "grad_clip": (1.0, "global gradient-norm clip; 0 = none"),
        "kl_coef": (0.05, "KL penalty to the frozen SFT reference"),
        "kl_mode": ("reward", "reward (per-token penalty in the reward, the paper's) or loss", KL_MODES),
        "estimator": ("gae", "gae (PPO with a critic, the paper's), or critic-free over rl.group_size "
                             "completions: grpo, drgrpo, rloo, reinforce_pp", ESTIMATORS),
        "group_size": (1, "completions per start state"),
        "loss_agg": ("token_mean", "token_mean, seq_mean_token_mean or seq_mean_token_sum_norm", LOSS_AGGREGATIONS),
        "dynamic_sampling": (False, "drop groups whose rewards are all equal and sample more (DAPO)"),
        "max_sampling_rounds": (3, "dynamic sampling: batches sampled at most per step"),
        "critic_warmup_steps": (0, "gae: first steps train only the critic"),
        "missing_eos_penalty": (0.0, "subtracted from the score of a completion cut off before a stop token"),
        "gamma": (1.0, "GAE discount"),
        "lam": (0.95, "GAE lambda"),
        "clip_ratio_low": (0.2, "PPO ratio clip below 1"),
        "clip_ratio_high": (0.2, "PPO ratio clip above 1 (DAPO's clip-higher when larger)"),
        "value_clip": (0.2, "value-loss clip"),
        "vf_coef": (5.0, "value-loss coefficient"),
        "entropy_coef": (0.0, "entropy bonus"),
        "whiten_advantages": (True, "gae: normalise advantages over the batch"),
        "max_log_ratio": (20.0, "clamp of the log importance ratio before exp (overflow guard)"),
        "epochs": (2, "passes over each sampled batch"),
        "minibatches": (1, "updates per pass"),
        "score_clip": (0.0, "clip of the scores to +-this; 0 = none"),
        "temperature": (1.0, "sampling temperature (the update's log-probs use the same one)"),
        "top_k": (0, "sampling top-k; 0 = off"),
        "top_p": (1.0, "sampling nucleus"),
        "max_new_tokens": (700, "longest completion"),
        "max_prompt_length": (512, "start states with longer prompts are left out"),
        "length_bucket": (32, "the update batch is cut to its longest real prompt and completion, each rounded up "
                              "to a multiple of this (few compiled shapes, no FLOP on columns of padding)"),
        "pack": (True, "the update's forward passes read the batch's rollouts packed end to end in rows of "
                       "rl.pack_width (attention kept within each), not one padded row each; needs "
                       "rl.minibatches = 1 and rl.prepare_chunks = 1 (False: padded rows, which those split)"),
        "pack_width": (0, "tokens per packed row, at least rl.max_prompt_length + rl.max_new_tokens (the longest "
                          "rollout); 0 = that, rounded up to rl.length_bucket"),
        "logits_chunk": (0, "completion positions per LM-head call in the PPO loss (memory); 0 = all"),
        "rollout_rows": (0, "rows per sampler call when sampling a step's batch (memory: the KV cache and "
                            "activations of that many rows); 0 = the whole batch at once"),
        "prepare_chunks": (1, "slices of the batch's rows that the update's no-gradient forward passes (old and "
                              "reference log-probs, values) run one at a time (memory); must divide rl.batch_size"),
        "reuse_sampler_logprobs": (False, "the update's old log-probs are the sampler's, not recomputed by a "
                                          "forward pass (equal in float32; refused with top-k, top-p or "
                                          "bfloat16 compute, where they differ); with rl.minibatches=1 the "
                                          "first gradient pass computes them anyway, so it saves nothing"),
        "rollout_mesh": ((), "(data, fsdp, tensor) to sample in, the weights moved into it once per step; "
                             "() = the training layout"),
        "stage_length": (1.0, "staged: length of each stage in rl.stage_unit"),
        "stage_unit": ("epochs", "staged: steps, epochs (over the stage's start states) or budget (a share)", STAGE_UNITS),
        "stage_weights": ((), "mixed: optional sampling weight per stage (stage 0 = the full task)"),
        "eval_every": (0, "steps between validation evaluations; 0 = never"),
        "eval_examples": (200, "validation problems per evaluation"),
        "checkpoint_every": (50, "steps between checkpoints"),
    },
    "eval": {
        "split": ("test", "the split of the final evaluation: test, validation or train", SPLITS),
        "num_examples": (0, "problems evaluated; 0 = all"),
        "batch_size": (32, "completions per sampler call"),
        "max_new_tokens": (700, "longest completion"),
        "maj_k": (0, "> 0: also vote over maj_k samples per problem"),
        "temperature": (1.0, "maj@k sampling temperature"),
    },
    "checkpoint": {"keep": (2, "checkpoints kept per phase")},
    "metrics": {
        "sample_completions": (4, "completions per evaluation written to TensorBoard as text"),
        "wandb": ("", "Weights & Biases: '' = off, offline (no network; `wandb sync` later) or online", WANDB_MODES),
        "wandb_project": ("r3jax", "W&B project"),
    },
    "compare": {
        "seeds": ((0, 1, 2), "seeds of every arm, declared before any run"),
        "arms": (("rl", "staged", "r3"), "rl (outcome only), staged, r3 (mixed), adaptive, hint_on_failure, each optionally "
                                          "-<estimator> (r3-grpo: critic-free over compare.group_size); a bare arm "
                                          "uses rl.estimator"),
        "metric": ("greedy", "the primary metric, declared before any run: greedy accuracy on the test split, or "
                             "single-sample accuracy at the RL temperature (the policy RL trains) on its first "
                             "compare.sample_problems; tuning selects by it on validation", COMPARE_METRICS),
        "group_size": (4, "completions per start state of the critic-free arms"),
        "tune_lr": ((), "RL learning rates every arm is tried with (seed compare.seeds[0], greedy accuracy on "
                        "the validation split); () = rl.lr alone"),
        "tune_kl_coef": ((), "KL coefficients tried likewise, crossed with compare.tune_lr; () = rl.kl_coef alone"),
        "continued_sft": (True, "the SFT-continued control arm: as many SFT updates as R^3 gets"),
        "continued_lr": (1e-4, "its constant learning rate"),
        "tune_continued_lr": ((), "learning rates SFT-continued is tried with, as the RL arms are with theirs; "
                                  "() = compare.continued_lr alone"),
        "samples": (4, "samples per problem for single-sample accuracy and pass@k"),
        "sample_problems": (500, "test problems those sampled metrics use"),
        "output": ("", "'' = <workdir>/compare.json"),
    },
}


def _defaults(schema: dict) -> dict:
    return {name: _defaults(entry) if isinstance(entry, dict) else entry[0] for name, entry in schema.items()}


class Key(NamedTuple):
    """One documented config key."""
    name: str  # dotted, e.g. "rl.strategy"
    default: Any
    meaning: str
    choices: tuple = ()  # the values allowed; () = any value of the default's kind


def documented_keys(schema: dict = SCHEMA, prefix: str = "") -> list[Key]:
    """Every key of the table, in its order."""
    rows = []
    for name, entry in schema.items():
        if isinstance(entry, dict):
            rows += documented_keys(entry, f"{prefix}{name}.")
        else:
            rows.append(Key(prefix + name, *entry))
    return rows


def flatten(config, prefix: str = "", sections: bool = False) -> dict[str, Any]:
    """{dotted key: value} of a config (or its dict form): the leaves, and with `sections` the
    sections too."""
    flat = {}
    for name, value in config.items():
        if hasattr(value, "items"):
            if sections:
                flat[prefix + name] = value
            flat.update(flatten(value, f"{prefix}{name}.", sections))
        else:
            flat[prefix + name] = value
    return flat


def base_config() -> ml_collections.ConfigDict:
    """Every documented key at its default, locked against new keys (a misspelt key in a config
    file would otherwise be a new key that nothing reads); task.options holds each task's own
    keys, so it stays open."""
    config = ml_collections.ConfigDict(_defaults(SCHEMA))
    config.lock()
    config.task.options.unlock()
    return config


def allow_config_imports(path: str) -> None:
    """Lets a config file's own imports (`from configs import arith`) resolve from the folder
    above its own, wherever the run starts."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)


def load_config_file(path: str, argument: str = "") -> ml_collections.ConfigDict:
    """`get_config([argument])` of a config file imported by its path; ConfigError naming the file
    and line for a key that `base_config()` does not have."""
    allow_config_imports(path)
    spec = importlib.util.spec_from_file_location("r3jax_user_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return module.get_config(argument) if argument else module.get_config()
    except (AttributeError, KeyError) as error:
        if LOCKED not in str(error):
            raise
        raise unknown_key_error(error) from None


def where_set(path: str, argument: str = "") -> dict[str, str]:
    """{dotted key: "file:line: its source"}: where the config file `path`, or a file it calls,
    last set each key. Read by loading the file again with ConfigDict's setter watched."""
    setters: dict[tuple[int, str], str] = {}
    setitem = ml_collections.ConfigDict.__setitem__

    def watched(self, key, value):
        setitem(self, key, value)
        frame = sys._getframe(1)
        while frame is not None and os.sep + "ml_collections" + os.sep in frame.f_code.co_filename:
            frame = frame.f_back
        if frame is not None and frame.f_code.co_filename != __file__:  # not base_config's defaults
            source = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            setters[(id(self), key)] = f"{frame.f_code.co_filename}:{frame.f_lineno}: {source}"

    ml_collections.ConfigDict.__setitem__ = watched
    try:
        config = load_config_file(path, argument)
    finally:
        ml_collections.ConfigDict.__setitem__ = setitem
    sections = {id(config): ""} | {id(value): f"{key}." for key, value in flatten(config, sections=True).items()
                                   if isinstance(value, ml_collections.ConfigDict)}
    return {sections[owner] + key: where for (owner, key), where in setters.items() if owner in sections}


def with_setting_line(message: str, config_file: str, overrides: Sequence[str]) -> str:
    """`message`, an error naming `config.KEY: ...`, with the line of `config_file` (`path[:argument]`)
    that set KEY, where the file set it and no override (`KEY=VALUE`) did."""
    named = re.match(r"config\.([\w.]+): ", message)
    if not named or not config_file or named.group(1) in {override.partition("=")[0] for override in overrides}:
        return message
    try:
        where = where_set(*config_file.split(":", 1)).get(named.group(1))
    except Exception:  # the error to report is `message`; a file that no longer loads only loses the line
        return message
    return f"{message} (set in {where})" if where else message


# how ml_collections words a new key set on a locked ConfigDict
LOCKED = "cannot be added since the config is locked"


def unknown_key_error(error: AttributeError | KeyError) -> ConfigError:
    """The ConfigError for a new key set on `base_config()` (`error` is ml_collections' refusal):
    the key with its section, the config file and line that set it, the closest known keys."""
    name = re.search(r'Key "([^"]*)"', str(error)).group(1)
    frames = list(traceback.walk_tb(error.__traceback__))
    refusing = next(frame.f_locals["self"] for frame, _ in frames
                    if isinstance(frame.f_locals.get("self"), ml_collections.ConfigDict))
    defaults = base_config()
    sections = {"": defaults, **{f"{path}.": value for path, value in flatten(defaults, sections=True).items()
                                 if isinstance(value, ml_collections.ConfigDict)}}
    section = next((path for path, value in sections.items() if set(value.keys()) == set(refusing.keys())), "")
    setter = [entry for entry in traceback.extract_tb(error.__traceback__)
              if os.sep + "ml_collections" + os.sep not in entry.filename][-1]
    return ConfigError(f"config.{section}{name}: unknown config key, set in {setter.filename}:{setter.lineno} "
                       f"({setter.line}; closest known: {closest_keys(section + name, defaults)})")


def closest_keys(key: str, config: ml_collections.ConfigDict) -> str:
    """The known keys nearest to a misspelt `key`, for the message that names it."""
    return ", ".join(difflib.get_close_matches(key, list(flatten(config, sections=True)), n=3, cutoff=0.0))


def unknown_override(key: str, config: ml_collections.ConfigDict, source: str) -> str:
    """Why an override of `key` is refused: unknown in the config file `source`, its closest known
    keys, and for a task option, that task.options holds the options the file sets for its own task."""
    why = f"unknown config key in {source} (closest known: {closest_keys(key, config)})"
    if key.startswith("task.options."):
        why += (f"; task.options holds the options {source} sets for task {config.task.name}: start from a config "
                "for the task you want, e.g. --config=configs/jsonl.py for your own files, "
                "--config=configs/paper.py:<task> for the paper's")
    return why


def apply_override(config: ml_collections.ConfigDict, key: str, text: str, source: str) -> None:
    """Sets `config.<key>` from the text of a --config.KEY=VALUE flag: a Python literal where the
    text is one, else the text; ConfigError naming the key for an unknown key or a value of the
    wrong type (ConfigDict keeps each key's type)."""
    section, _, name = key.rpartition(".")
    target = config
    for part in filter(None, section.split(".")):
        target = target.get(part) if hasattr(target, "get") else None
    if not hasattr(target, "get") or name not in target:
        raise ConfigError(f"config.{key}: {unknown_override(key, config, source)}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    try:
        target[name] = value
    except TypeError as error:
        raise ConfigError(f"config.{key}: {text!r} does not fit the key's type ({error})") from None


def from_section(cls, section: ml_collections.ConfigDict, **given):
    """The dataclass `cls` with each field read from the config section's key of the same name
    (fields the section lacks keep their defaults); `given` fills the rest."""
    names = [f.name for f in dataclasses.fields(cls) if f.name in section and f.name not in given]
    return cls(**{name: section[name] for name in names}, **given)


def training_steps(section: ml_collections.ConfigDict, num_examples: int, examples_per_step: int) -> int:
    """`section.steps`, or with `section.data_epochs` > 0 the steps of that many passes over the data."""
    if section.data_epochs > 0:
        return max(1, math.ceil(section.data_epochs * num_examples / examples_per_step))
    return section.steps


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """(data, fsdp, tensor) sizes with a -1 given the remaining devices; ValueError when the shape
    is malformed or does not fit `num_devices`."""
    shape = list(shape)
    if len(shape) != len(MESH_AXES) or shape.count(-1) > 1:
        raise ValueError(f"{tuple(shape)}: need {len(MESH_AXES)} sizes (data, fsdp, tensor), at most one of them -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape and known and num_devices % known == 0:
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"{tuple(shape)} does not fit {num_devices} devices")
    return tuple(shape)


def data_parallel_size(shape: Sequence[int]) -> int:
    """How many ways a batch splits on a mesh of (resolved) `shape`: its data x fsdp size."""
    return math.prod(size for axis, size in zip(MESH_AXES, shape) if axis in BATCH_AXES)


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key}: {message}")


def _numbers(values) -> bool:
    """Whether every one of `values` is a number (a tuple key's literal may hold anything)."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def validate_mesh(c: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """The training mesh and the rollout mesh fit the devices; returns the training mesh's shape."""
    for key, shape in (("rl.rollout_mesh", c.rl.rollout_mesh), ("mesh", c.mesh)):
        if shape or key == "mesh":
            try:
                resolved = resolve_mesh_shape(shape, num_devices)
            except ValueError as error:
                raise ConfigError(f"config.{key}: {error}") from None
    return resolved


def value_at(c: ml_collections.ConfigDict, key: str) -> Any:
    """`c`'s value (or section) at the dotted `key`."""
    for part in key.split("."):
        c = c[part]
    return c


def _validate_values(c: ml_collections.ConfigDict) -> None:
    """Every key holds a value, not None (which a config file may set any key to), and one with a
    choice list (SCHEMA's third element) one of its choices."""
    for key in documented_keys():
        value = value_at(c, key.name)
        _check(value is not None, key.name, f"None, where a {type(key.default).__name__} is expected "
               f"(default: {key.default!r})")
        _check(not key.choices or value in key.choices, key.name,
               f"{value!r} is not one of {key.choices}")


POSITIVE = ("sft.batch_size", "sft.grad_accum", "rl.batch_size", "rl.epochs", "rl.minibatches",
            "rl.max_new_tokens", "rl.max_prompt_length", "eval.batch_size", "eval.max_new_tokens",
            "checkpoint.keep", "sft.lr", "rl.lr", "rl.temperature", "sft.max_length", "sft.checkpoint_every",
            "rl.checkpoint_every", "tokenizer.vocab_size", "rl.max_sampling_rounds", "eval.temperature",
            "rl.length_bucket")
NON_NEGATIVE = ("sft.steps", "rl.steps", "rl.token_budget", "sft.warmup_steps", "rl.warmup_steps",
                "sft.eval_every", "rl.eval_every", "sft.eval_examples", "rl.eval_examples", "eval.num_examples",
                "rl.kl_coef", "rl.critic_lr", "rl.vf_coef", "rl.entropy_coef", "rl.value_clip", "rl.score_clip",
                "rl.top_k", "sft.weight_decay", "rl.weight_decay", "sft.grad_clip", "rl.grad_clip",
                "rl.num_start_states", "rl.clip_ratio_low", "rl.clip_ratio_high", "rl.critic_warmup_steps",
                "rl.missing_eos_penalty", "metrics.sample_completions", "sft.logits_chunk", "rl.logits_chunk",
                "model.attention_chunk",
                "eval.maj_k", "sft.data_epochs", "rl.data_epochs", "compare.samples", "compare.sample_problems",
                "rl.pack_width", "compile_cache_max_gb", "stall_timeout_s")


def _check_positive(c: ml_collections.ConfigDict, keys: tuple[str, ...]) -> None:
    for key in keys:
        _check(value_at(c, key) > 0, key, f"must be positive, got {value_at(c, key)}")


def _validate_ranges(c: ml_collections.ConfigDict) -> None:
    _check_positive(c, POSITIVE)
    for key in NON_NEGATIVE:
        _check(value_at(c, key) >= 0, key, f"must be non-negative, got {value_at(c, key)}")
    _check(0 < c.rl.top_p <= 1, "rl.top_p", f"must be in (0, 1], got {c.rl.top_p}")
    _check(0 <= c.rl.full_task_fraction <= 1, "rl.full_task_fraction", f"must be in [0, 1], got {c.rl.full_task_fraction}")
    band = tuple(c.rl.adaptive_band)
    _check(len(band) == 2 and _numbers(band) and 0 <= band[0] < band[1] <= 1, "rl.adaptive_band",
           f"must be (low, high) with 0 <= low < high <= 1, got {band}")
    _check(c.rl.clip_ratio_low < 1, "rl.clip_ratio_low", f"must be below 1, got {c.rl.clip_ratio_low}")
    for key in ("gamma", "lam"):
        _check(0 <= c.rl[key] <= 1, f"rl.{key}", f"must be in [0, 1], got {c.rl[key]}")


SCRATCH_SHAPE = ("model.hidden_size", "model.intermediate_size", "model.num_layers", "model.num_heads",
                 "model.num_kv_heads", "model.head_dim", "model.max_position_embeddings", "model.rope_theta")


def _validate_scratch_model(c: ml_collections.ConfigDict) -> None:
    """A from-scratch model's shape (a model.path brings its own)."""
    if c.model.path:
        return
    _check_positive(c, SCRATCH_SHAPE)
    _check(c.model.num_heads % c.model.num_kv_heads == 0, "model.num_heads",
           f"{c.model.num_heads} query heads do not share model.num_kv_heads = {c.model.num_kv_heads} key/value "
           "heads evenly (grouped-query attention needs a multiple)")


def _validate_paths(c: ml_collections.ConfigDict) -> None:
    """Every file or directory the config names exists."""
    for key in ("train_path", "test_path"):
        path = c.task.options.get(key)
        _check(not path or os.path.exists(path), f"task.options.{key}", f"data file {path} not found")
    _check(c.model.path or c.model.from_scratch, "model.path",
           "required by this config (a local HF checkpoint directory)")
    _check(c.model.path or c.mode != "eval", "model.path", "mode=eval evaluates the model in this HF directory "
           "(a run's <workdir>/rl/final or <workdir>/sft/best); none given")
    if c.model.path:
        _check_model_dir("model.path", "model", c.model.path)
    if c.tokenizer.path:
        _check(os.path.exists(c.tokenizer.path), "tokenizer.path",
               f"{c.tokenizer.path} not found{_why_not_found(c.tokenizer.path)}")
    if c.rl.init:
        _check(c.mode in ("rl", "compare"), "rl.init", f"mode={c.mode} does not read it (mode=rl and mode=compare "
               "start from it; mode=train starts RL from its own SFT model)")
        _check_model_dir("rl.init", "SFT checkpoint", c.rl.init,
                         " (an HF model directory, as a run's <workdir>/sft/best)")


def _check_model_dir(key: str, what: str, path: str, hint: str = "") -> None:
    """`path`, config key `key`, is an HF model directory: it exists and holds a config.json."""
    _check(os.path.isdir(path), key, f"{what} directory {path} not found{_why_not_found(path)}")
    if os.path.exists(adapter_config := os.path.join(path, "adapter_config.json")):
        base = _adapter_base(adapter_config)
        raise ConfigError(f"config.{key}: {path} is a PEFT adapter, not a model: give the model it was trained on"
                          f"{f' ({base})' if base else ''} as {key}, and this directory as model.lora.init_from")
    _check(os.path.exists(os.path.join(path, "config.json")), key, f"{path} has no config.json{hint}")


def _why_not_found(path: str) -> str:
    """What a model directory `path` that is not there may be instead, for its error message."""
    if os.path.isdir(path.rstrip("/") + ".partial"):
        return (f" ({path.rstrip('/')}.partial is an export of it being written, or interrupted: rerun the run "
                "that exports it)")
    if (hub_id := HUB_ID.fullmatch(path)) and not os.path.isdir(path.split("/")[0]):  # else a local folder's
        revision = f" --revision {hub_id['revision']}" if hub_id["revision"] else ""
        return (" nor in the local Hugging Face cache (r3jax downloads nothing: `hf download "
                f"{hub_id['repo']}{revision}` first, or give a local directory)")
    return ""


def _adapter_base(adapter_config: str) -> str | None:
    """The base model a PEFT adapter_config.json names, if it can be read."""
    try:
        with open(adapter_config) as f:
            return json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):  # the error being reported is the directory, not this file
        return None


def lora_targets(pattern: str) -> tuple[str, ...]:
    """The projections (LORA_MODULES) whose names `pattern`, a regular expression, matches in full;
    ConfigError naming config.model.lora.targets when it is malformed or matches none."""
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"config.model.lora.targets: {pattern!r} is not a regular expression ({error})") from None
    names = tuple(name for name in LORA_MODULES if regex.fullmatch(name))
    _check(bool(names), "model.lora.targets", f"{pattern!r} matches no module (the modules: {', '.join(LORA_MODULES)})")
    return names


def _validate_lora(c: ml_collections.ConfigDict) -> None:
    _check(c.model.lora.rank >= 0, "model.lora.rank", f"must be a positive rank, or 0 for no LoRA, got {c.model.lora.rank}")
    if c.model.lora.rank:
        _check(c.model.lora.alpha > 0, "model.lora.alpha", f"must be positive, got {c.model.lora.alpha}")
        lora_targets(c.model.lora.targets)
    path = c.model.lora.init_from
    _check(not path or c.model.lora.rank, "model.lora.init_from", "needs model.lora.rank > 0 (the adapter's rank)")
    _check(not path or os.path.exists(os.path.join(path, "adapter_config.json")), "model.lora.init_from",
           f"{path} has no adapter_config.json (a PEFT adapter directory)")


def _validate_rl(c: ml_collections.ConfigDict) -> None:
    """The RL settings that depend on one another."""
    _check(c.mode == "eval" or c.model.param_dtype == "float32" or c.model.lora.rank, "model.param_dtype",
           f"{c.model.param_dtype} master weights lose updates smaller than their spacing; train with "
           "float32 and set model.dtype=bfloat16 to compute in bfloat16")
    needed = 1 if c.rl.estimator == "gae" else 2
    _check(c.rl.group_size >= needed, "rl.group_size",
           f"{c.rl.group_size}: rl.estimator={c.rl.estimator} needs at least {needed} completions per start state")
    _check(c.rl.batch_size % c.rl.group_size == 0, "rl.group_size",
           f"{c.rl.group_size} does not divide rl.batch_size {c.rl.batch_size} (rows = start states x group)")
    _check(c.rl.strategy != "hint_on_failure" or c.rl.group_size >= 2, "rl.strategy",
           "hint_on_failure needs rl.group_size >= 2: it hints groups all of whose samples failed")
    _check(not c.rl.dynamic_sampling or c.rl.group_size >= 2, "rl.dynamic_sampling",
           "needs rl.group_size >= 2: it drops groups whose rewards are all equal")
    _check(c.rl.critic_warmup_steps == 0 or c.rl.estimator == "gae", "rl.critic_warmup_steps",
           f"rl.estimator={c.rl.estimator} has no critic to warm up")
    _check(c.rl.stage_unit != "budget" or c.rl.token_budget > 0, "rl.stage_unit",
           "'budget' needs rl.token_budget > 0")
    _check(c.rl.batch_size % c.rl.minibatches == 0, "rl.minibatches",
           f"{c.rl.minibatches} does not divide rl.batch_size {c.rl.batch_size}")
    _check(c.rl.rollout_rows >= 0, "rl.rollout_rows", f"must be 0 (all rows) or a row count, got {c.rl.rollout_rows}")
    _check(c.rl.prepare_chunks > 0 and c.rl.batch_size % c.rl.prepare_chunks == 0, "rl.prepare_chunks",
           f"{c.rl.prepare_chunks} does not divide rl.batch_size {c.rl.batch_size}")
    longest = c.rl.max_prompt_length + c.rl.max_new_tokens
    _check(c.rl.pack_width == 0 or c.rl.pack_width >= longest, "rl.pack_width",
           f"{c.rl.pack_width} is narrower than the longest rollout, rl.max_prompt_length + rl.max_new_tokens = {longest}")
    _check(not c.rl.pack or (c.rl.minibatches == 1 and c.rl.prepare_chunks == 1), "rl.pack",
           "packed rows mix rollouts, so they cannot be split by rollout: set rl.minibatches=1 and "
           f"rl.prepare_chunks=1 (got {c.rl.minibatches} and {c.rl.prepare_chunks}), or rl.pack=False")
    _check(not c.rl.reuse_sampler_logprobs or (c.rl.top_k == 0 and c.rl.top_p == 1 and c.model.dtype == "float32"),
           "rl.reuse_sampler_logprobs", "the sampler's log-probs equal the update's only in float32 without "
           f"top-k or top-p (rl.top_k={c.rl.top_k}, rl.top_p={c.rl.top_p}, model.dtype={c.model.dtype})")


def _validate_selection(c: ml_collections.ConfigDict) -> None:
    """Model selection reads a validation split that exists."""
    validation_size = c.task.options.get("validation_size", 0)
    _check(isinstance(validation_size, (int, float)) and validation_size >= 0, "task.options.validation_size",
           f"must be a count or a fraction of the training data, got {validation_size}")
    _check(validation_size > 0 or not (c.sft.eval_every or c.rl.eval_every or c.eval.split == "validation"),
           "task.options.validation_size", "model selection (sft.eval_every, rl.eval_every) and "
           "eval.split=validation read a validation split carved from train: set it above 0")


def _validate_compare(c: ml_collections.ConfigDict) -> None:
    for arm in c.compare.arms:
        strategy, _, estimator = str(arm).partition("-")
        _check(strategy in ARMS and (not estimator or estimator in ESTIMATORS), "compare.arms",
               f"{arm!r}: expected one of {tuple(ARMS)}, optionally with -<estimator> ({', '.join(ESTIMATORS)})")
    for key in ("tune_lr", "tune_continued_lr"):
        _check(_numbers(c.compare[key]) and all(v > 0 for v in c.compare[key]), f"compare.{key}",
               f"{c.compare[key]}: learning rates must be > 0")
    kl_coefs = c.compare.tune_kl_coef
    _check(_numbers(kl_coefs) and all(v >= 0 for v in kl_coefs), "compare.tune_kl_coef",
           f"{kl_coefs}: KL coefficients must be >= 0")
    _check(c.compare.group_size >= 2 and (c.mode != "compare" or c.rl.batch_size % c.compare.group_size == 0),
           "compare.group_size",
           f"{c.compare.group_size}: needs at least 2 completions per start state, dividing rl.batch_size")
    _check(c.compare.metric != "sample" or c.compare.samples > 0, "compare.metric",
           "sample reads compare.samples samples per problem: set compare.samples above 0")


def validate(c: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ConfigError naming the first bad key."""
    _validate_values(c)
    _validate_ranges(c)
    _validate_scratch_model(c)
    _validate_paths(c)
    _validate_lora(c)
    _validate_rl(c)
    _validate_selection(c)
    _validate_compare(c)
    validate_layout(c, num_devices)


def validate_layout(c: ml_collections.ConfigDict, num_devices: int) -> None:
    """The meshes fit the devices, and every batch splits evenly over the data-parallel ones."""
    data_parallel = data_parallel_size(validate_mesh(c, num_devices))
    for key in ("sft.batch_size", "rl.batch_size", "eval.batch_size"):
        size = value_at(c, key)
        below, above = max(size // data_parallel, 1) * data_parallel, -(-size // data_parallel) * data_parallel
        _check(size % data_parallel == 0, key,
               f"{size} is not a multiple of the data-parallel size {data_parallel} (the mesh's data x fsdp): "
               + " or ".join(str(n) for n in dict.fromkeys((below, above))) + " would do")
