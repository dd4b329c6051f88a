"""The main job: tokenizer -> model -> SFT -> R^3 -> evaluation, results table and curves."""
from __future__ import annotations

import os

import jax
import numpy as np

from r3jax import config as config_lib, files, sharding, tokenizer as tokenizer_lib
from r3jax.checkpoint import StopSignal
from r3jax.evaluate import EvalSettings, Problems, evaluate, greedy_problems
from r3jax.metrics import read_jsonl
from r3jax.models import hf, lora
from r3jax.models.transformer import ModelConfig, init_params
from r3jax.report import results_markdown
from r3jax.rollout import Policy
from r3jax.settings import Settings
from r3jax.tasks import Task
from r3jax.train import rl, sft

# ModelConfig fields that come from config.model, not from a checkpoint: how the model runs
EXECUTION_KEYS = ("param_dtype", "dtype", "scan_layers", "remat", "attention_chunk", "attention_impl")


def build_tokenizer(config, task: Task, workdir: str) -> tokenizer_lib.Tokenizer:
    """config.tokenizer.path, else the one beside the model (config.model.path, or the SFT model
    config.rl.init), else a SentencePiece model trained on the task's training text."""
    for path in (config.tokenizer.path, config.model.path, config.rl.init):
        if path:
            return tokenizer_lib.load(path)
    model_file = os.path.join(workdir, "tokenizer.model")
    if not os.path.exists(model_file) and sharding.is_primary():
        texts = (task.prompt(d.question) + d.response for d in task.demonstrations("train"))
        tokenizer_lib.train_sentencepiece(texts, model_file[:-len(".model")], config.tokenizer.vocab_size)
    sharding.barrier("tokenizer")
    return tokenizer_lib.load(model_file)


def execution_settings(config) -> dict:
    """How config.model runs a model (EXECUTION_KEYS); under LoRA the weights are the frozen base's,
    stored in model.lora.base_dtype."""
    settings = {k: config.model[k] for k in EXECUTION_KEYS}
    if config.model.lora.rank:  # a quantized base keeps what it does not quantise in bfloat16
        base_dtype = config.model.lora.base_dtype
        settings["param_dtype"] = "bfloat16" if base_dtype in lora.QUANTIZED else base_dtype
    return settings


def scratch_model_config(config, vocab_size: int) -> ModelConfig:
    return config_lib.from_section(ModelConfig, config.model, vocab_size=vocab_size,
                                   param_dtype=execution_settings(config)["param_dtype"])


def with_adapters(config, policy: Policy, init_from: str = "") -> Policy:
    """`policy` with LoRA adapters of config.model.lora on its weights (unchanged when lora.rank is
    0): what SFT and RL train. Fresh ones, or those of the PEFT directory `init_from`."""
    model_cfg = lora.configure(policy.model_cfg, config.model.lora)
    if not model_cfg.lora_rank:
        return policy
    if model_cfg.quantized_kernels:
        policy = policy._replace(params=lora.quantize_placed(model_cfg, policy.params, policy.mesh))
    if init_from:
        adapters = lora.load_peft(init_from, model_cfg, policy.mesh)
    else:
        adapters = lora.init_adapters(model_cfg, jax.random.fold_in(jax.random.key(config.seed), 1), policy.mesh)
    return policy._replace(model_cfg=model_cfg, params=lora.merge(policy.params, adapters))


def build_model(config, tokenizer: tokenizer_lib.Tokenizer, mesh) -> Policy:
    """The model of config.model.path, else a from-scratch one; says which, and its size."""
    if config.model.path:
        model_cfg, params, _, _ = load_policy(config.model.path, config, tokenizer, mesh)
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise config_lib.ConfigError(
                f"config.tokenizer.path: the tokenizer has {tokenizer.vocab_size} ids but the model "
                f"{config.model.path} has a vocabulary of {model_cfg.vocab_size}")
    else:
        model_cfg = scratch_model_config(config, tokenizer.vocab_size)
        params = sharding.init_sharded(lambda key: init_params(model_cfg, key), jax.random.key(config.seed), mesh)
    policy = with_adapters(config, Policy(model_cfg, params, tokenizer, mesh), config.model.lora.init_from)
    announce(policy, config.model.path or "from scratch")
    return policy


def announce(policy: Policy, source: str) -> None:
    """The start-up lines naming the model a run trains, and with LoRA what of it trains."""
    model_cfg = policy.model_cfg
    if not sharding.is_primary():
        return
    kernels = f" (the frozen projections in {model_cfg.quantized_kernels})" if model_cfg.quantized_kernels else ""
    print(f"model: {model_cfg.model_type}, {model_cfg.num_params():,} parameters ({source}), "
          f"{model_cfg.num_layers} layers, weights in {model_cfg.param_dtype}{kernels}, compute in {model_cfg.dtype}")
    if model_cfg.lora_rank:
        print(f"LoRA rank {model_cfg.lora_rank} on {', '.join(model_cfg.lora_targets)}: "
              f"{lora.describe(model_cfg, policy.params)}")


def load_policy(path: str, config, tokenizer: tokenizer_lib.Tokenizer, mesh) -> Policy:
    """The HF model in `path`, run as config.model says (EXECUTION_KEYS)."""
    return Policy(*hf.load(path, mesh, **execution_settings(config)), tokenizer, mesh)


def test_problems(settings: Settings, task: Task) -> Problems:
    """The final evaluation's problems: config.eval.split (its first eval.num_examples), greedy."""
    eval_section = settings.config.eval
    demos = task.demonstrations(eval_section.split)
    if eval_section.num_examples:
        demos = demos[:eval_section.num_examples]
    return greedy_problems(task, demos, settings.eval)


def write_results(workdir: str, results: dict[str, dict], title: str) -> None:
    """results.json and a markdown table in the workdir (process 0 only)."""
    if not sharding.is_primary():
        return
    files.write_json(os.path.join(workdir, "results.json"), results)
    correct = {name: np.array([float(r["correct"]) for r in read_jsonl(predictions_path(workdir, name))])
               for name in results if os.path.exists(predictions_path(workdir, name))}
    table = results_markdown(results, correct, title)
    files.write_text(os.path.join(workdir, "results.md"), table)
    print(table, end="")


def result_entries(name: str, policy: Policy, problems: Problems, eval_settings: EvalSettings, workdir: str,
                   entries: dict | None = None) -> dict:
    """The results entries of one model: its greedy report on `problems` (with `entries` added),
    and with eval_settings.maj_k its maj@k evaluation. Writes the predictions of each."""
    report, records = evaluate(policy, problems, desc=f"{name} test")
    write_records(workdir, name, records)
    results = {name: {**report, **(entries or {})}}
    k = eval_settings.maj_k
    if k:
        results[f"{name} maj@{k}"], maj_records = evaluate(
            policy, problems.sampled(k, eval_settings.temperature), desc=f"{name} maj@{k}")
        write_records(workdir, f"{name}_maj{k}", maj_records)
    return results


def earlier_sft_evaluation(sft_workdir: str, problems: Problems) -> tuple[dict[str, dict], list[dict]]:
    """The SFT model's entries that the mode=sft or train run in `sft_workdir` left in its
    results.json, and its per-problem records, for the table of a mode=rl run from that model, so
    that R^3 - SFT stays in it; ({}, []) unless they are of these problems, in this order."""
    path, predictions = os.path.join(sft_workdir, "results.json"), predictions_path(sft_workdir, "sft")
    if not (os.path.exists(path) and os.path.exists(predictions)):
        return {}, []
    records = read_jsonl(predictions)
    if [record["id"] for record in records] != [demo.id for demo in problems.demos]:
        return {}, []
    earlier = files.read_json(path, "delete it, and this run's table leaves the SFT model out")
    return {name: entry for name, entry in earlier.items() if name == "sft" or name.startswith("sft maj@")}, records


def run_of_sft_model(path: str) -> str | None:
    """`W` for a model at `W/sft/best`, the SFT model a run in workdir W evaluated; else None."""
    best = os.path.normpath(path)
    if os.path.basename(best) == "best" and os.path.basename(os.path.dirname(best)) == "sft":
        return os.path.dirname(os.path.dirname(best))
    return None


def sft_model_in(workdir: str) -> str:
    """The SFT model in `workdir` that mode=rl starts from without rl.init; ConfigError if none."""
    path = os.path.join(workdir, "sft", "best")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise config_lib.ConfigError(f"config.rl.init: '' starts RL from {path}, which holds no model; give rl.init, "
                                     "or run SFT into this workdir first (mode=sft)")
    return path


def run(settings: Settings, workdir: str, task: Task, mesh) -> dict | None:
    """Modes train / sft / rl / eval. Returns the results entries, or None if stopped by a signal."""
    config = settings.config
    os.makedirs(workdir, exist_ok=True)
    sft_dir = config.rl.init or (sft_model_in(workdir) if config.mode == "rl" else "")
    tokenizer = build_tokenizer(config, task, workdir)
    policy = None if config.mode == "rl" else build_model(config, tokenizer, mesh)
    problems = test_problems(settings, task)
    if config.mode == "eval":
        results = result_entries("model", policy, problems, settings.eval, workdir)
        write_results(workdir, results, f"{task.name}: evaluation")
        return results
    stop = StopSignal()  # an evaluation alone has nothing to save: a signal ends it as usual
    sft_workdir = run_of_sft_model(sft_dir) if config.mode == "rl" else None
    results, sft_records = earlier_sft_evaluation(sft_workdir, problems) if sft_workdir else ({}, [])
    if sft_records and os.path.realpath(sft_workdir) != os.path.realpath(workdir):
        write_records(workdir, "sft", sft_records)  # beside this run's, for the paired difference
    if config.mode in ("train", "sft"):
        sft_dir = sft.train(settings, policy, task, workdir, stop)
        if sft_dir is None:
            return None
        results.update(result_entries("sft", load_policy(sft_dir, config, tokenizer, mesh), problems, settings.eval,
                                      workdir))
    if config.mode in ("train", "rl"):
        # after SFT here, fresh adapters on the folded SFT model; mode=rl may continue an adapter
        start = with_adapters(config, load_policy(sft_dir, config, tokenizer, mesh),
                              config.model.lora.init_from if config.mode == "rl" else "")
        if policy is None:
            announce(start, sft_dir)
        result = rl.train(settings, start, task, os.path.join(workdir, "rl"), stop)
        if result is None:
            return None
        final = start.with_params(result["params"])
        results.update(result_entries(f"r3-{config.rl.strategy}", final, problems, settings.eval, workdir,
                                      {"steps": result["steps"], "tokens_sampled": result["tokens_sampled"]}))
        sft.export(os.path.join(workdir, "rl", "final"), final, config.model.export_dtype, sft_dir)
    stop.restore()
    write_results(workdir, results, f"{task.name}: test accuracy at start state k = 0 (greedy unless maj@k)")
    return results


def predictions_path(workdir: str, name: str) -> str:
    """Where the per-problem records of the model evaluated as `name` are written."""
    return os.path.join(workdir, f"{name}_predictions.jsonl")


def write_records(workdir: str, name: str, records: list[dict]) -> None:
    if not sharding.is_primary():
        return
    files.write_jsonl(predictions_path(workdir, name), records)
