"""SFT warm-up: next-token loss on the response (rationale + answer + EOS), prompt masked.

Gradient accumulation runs inside the one jitted step as a scan over microbatches that carries
(loss sum, token count), so the loss is the exact token mean of the whole accumulated batch.
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from r3jax import config as config_lib, optim, sharding
from r3jax.checkpoint import StopSignal, latest_step
from r3jax.curriculum import epoch_order
from r3jax.evaluate import evaluate, greedy_problems, samples
from r3jax.models import hf, lora
from r3jax.models.transformer import ModelConfig, forward
from r3jax.ppo import chunked_logprobs
from r3jax.rollout import Policy, encode_demo, sft_example
from r3jax.settings import Settings
from r3jax.tasks.base import Task
from r3jax.tokenizer import Tokenizer, left_pad
from r3jax.train import loop


class SFTState(NamedTuple):
    params: Any
    opt_state: Any
    step: jnp.ndarray


def export(path: str, policy: Policy, dtype: str = "", base_model: str = "") -> None:
    """An HF model directory with its tokenizer, loadable by r3jax and by transformers (whose
    `generate()` stops at the tokenizer's stop ids); weights in `dtype` ("" = the params' own).
    A LoRA model is exported with its adapters folded in, and the adapters alone in PEFT's format
    in `<path>/adapter`, for the HF model in `base_model`.

    Atomic: written beside `path`, then renamed over it, so a run killed mid-export leaves the
    previous export (or none), never a partial one. The previous one is renamed away before it is
    removed, so that a kill while removing it (seconds for large files on NFS) leaves the new one."""
    model_cfg, params, tokenizer, _ = policy
    partial, replaced = _beside(path)
    if sharding.is_primary():
        finish_interrupted_export(path)
        for leftover in (partial, replaced):
            if os.path.exists(leftover):
                shutil.rmtree(leftover)
    special_ids = {"bos_token_id": tokenizer.bos_id, "pad_token_id": tokenizer.pad_id,
                   "eos_token_id": tokenizer.eos_id if len(tokenizer.stop_ids) == 1 else list(tokenizer.stop_ids)}
    if model_cfg.lora_rank:
        lora.save_peft(os.path.join(partial, "adapter"), model_cfg, params, base_model)
        model_cfg, params = (model_cfg.base().replace(quantized_kernels=""),
                             jax.jit(lora.fold, static_argnums=0)(model_cfg, params))
    hf.save(partial, model_cfg, params, dtype=dtype, special_ids=special_ids)
    if sharding.is_primary():
        if not tokenizer.save(partial):
            print(f"warning: {path}: no tokenizer.json (it would encode otherwise than the SentencePiece model "
                  "tokenizer.model beside it, which r3jax reads)", file=sys.stderr)
        if os.path.exists(path):
            os.replace(path, replaced)
        os.replace(partial, path)
        if os.path.exists(replaced):
            shutil.rmtree(replaced)
    sharding.barrier(f"export {path}")


def _beside(path: str) -> tuple[str, str]:
    """(where an export of `path` is written, where the export it replaces waits to be removed)."""
    return path.rstrip("/") + ".partial", path.rstrip("/") + ".replaced"


def finish_interrupted_export(path: str) -> None:
    """Completes an export killed between its two renames, which leaves no `path`. The earlier
    export is renamed to `.replaced` only once `.partial` is whole, so `.partial` is the export
    (or, were it gone, `.replaced` is)."""
    partial, replaced = _beside(path)
    if os.path.exists(path) or not os.path.exists(replaced):
        return
    whole = partial if os.path.exists(partial) else replaced
    os.replace(whole, path)
    print(f"warning: {path}: an export was interrupted between its two renames; completed from {whole}",
          file=sys.stderr)


def make_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, np.ndarray]:
    """Left-padded `[batch, length]` arrays, length rounded up to a multiple of 32 (few compiles)."""
    length = -(-max(len(tokens) for tokens, _ in examples) // 32) * 32
    tokens, mask = left_pad([t for t, _ in examples], pad_id, length)
    loss_mask, _ = left_pad([m for _, m in examples], 0, length)
    return {"tokens": tokens, "attention_mask": mask, "loss_mask": loss_mask}


def nll_sum(model_cfg: ModelConfig, params, batch: dict, logits_chunk: int = 0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(summed next-token NLL over loss-masked targets, their count); the LM head runs
    `logits_chunk` positions at a time (0: all at once), as in the PPO loss."""
    _, hidden = forward(model_cfg, params, batch["tokens"], batch["attention_mask"], with_head=False)
    target_logp, _ = chunked_logprobs(model_cfg, params, hidden[:, :-1], batch["tokens"][:, 1:], 1.0, logits_chunk)
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    return -(target_logp * mask).sum(), mask.sum()


def make_train_step(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, logits_chunk: int = 0,
                    identity: Any = None):
    """`step(state, batch [micro, accum, length], lr_scale, frozen=None) -> (state, metrics)`, one
    jit, state donated; `lr_scale` is the schedule's multiplier of the optimizer's peak learning
    rate; `frozen` is the base under LoRA adapters (state.params), never differentiated. With an
    `identity` (what built `optimizer`: `optim.sft_optimizer_knobs`) its programs are kept on disk
    (`programs.Cached`)."""
    grad_fn = jax.value_and_grad(lambda p, b, frozen: nll_sum(model_cfg, lora.merge(frozen, p), b, logits_chunk),
                                 has_aux=True)

    def step(state: SFTState, batch: dict, lr_scale, frozen=None):
        def accumulate(carry, microbatch):
            grads, loss_sum, count = carry
            (micro_loss, micro_count), micro_grads = grad_fn(state.params, microbatch, frozen)
            return (jax.tree.map(jnp.add, grads, micro_grads), loss_sum + micro_loss, count + micro_count), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        microbatches = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), batch)
        (grads, loss_sum, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), microbatches)
        grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics = {"loss": loss_sum / jnp.maximum(count, 1.0), "grad_norm": optax.tree.norm(grads),
                   "tokens": count}
        updates = optim.scaled(updates, lr_scale)
        return SFTState(optax.apply_updates(state.params, updates), opt_state, state.step + 1), metrics

    return sharding.StateStep(step, "sft-step",
                              None if identity is None else (model_cfg, logits_chunk, identity))


def _batch_for_step(examples, step: int, c, seed: int, pad_id: int) -> dict[str, np.ndarray]:
    size = c.batch_size * c.grad_accum
    chosen = [examples[i] for i in epoch_order(seed, step, size, len(examples))]
    batch = make_batch(chosen, pad_id)
    return {k: v.reshape(c.batch_size, c.grad_accum, -1) for k, v in batch.items()}


def _fitting_examples(task: Task, tokenizer: Tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """The (tokens, loss mask) of every training demonstration of at most `max_length` tokens."""
    every = [sft_example(encode_demo(tokenizer, task, d), tokenizer.eos_id) for d in task.demonstrations("train")]
    examples = [e for e in every if len(e[0]) <= max_length]
    if not examples:
        raise config_lib.ConfigError(f"config.sft.max_length: {max_length} tokens fit none of the training "
                                     f"examples (the shortest has {min(len(tokens) for tokens, _ in every)})")
    return examples


def _finished_earlier(out: str, steps: int) -> bool:
    """Whether the SFT run in `out` exported its last model at `steps` or later (and is to be
    skipped); says so, or that it is to be extended."""
    best_dir, last_dir = os.path.join(out, "best"), os.path.join(out, "last")
    if sharding.is_primary():
        for directory in (best_dir, last_dir):
            finish_interrupted_export(directory)
    sharding.barrier("sft exports")
    if not os.path.exists(os.path.join(last_dir, "config.json")):  # exports appear whole (export)
        return False
    latest = latest_step(os.path.join(out, "checkpoints"))
    if (latest or 0) >= steps:
        print(f"SFT: finished at step {latest} ({last_dir}); skipped")
        return True
    print(f"SFT: extending from step {latest} to {steps}")
    return False


def train(settings: Settings, start: Policy, task: Task, workdir: str, stop: StopSignal) -> str | None:
    """Runs (or resumes, or extends) SFT from `start` in `<workdir>/sft`: every weight, or with
    LoRA the adapters alone. Returns the HF dir of the best model (by accuracy on the validation
    split, else the last), or None when stopped early by a signal."""
    config = settings.config
    c = config.sft
    model_cfg, _, tokenizer, mesh = start
    params, frozen = lora.trainable_and_frozen(model_cfg, start.params)
    out = os.path.join(workdir, "sft")
    best_dir, last_dir = os.path.join(out, "best"), os.path.join(out, "last")
    examples = _fitting_examples(task, tokenizer, c.max_length)
    steps = config_lib.training_steps(c, len(examples), c.batch_size * c.grad_accum)
    if c.data_epochs:
        print(f"SFT: {c.data_epochs:g} epochs over {len(examples):,} examples = {steps:,} steps")
    if _finished_earlier(out, steps):
        return best_dir
    optimizer = optim.sft_optimizer(c)
    train_step = make_train_step(model_cfg, optimizer, c.logits_chunk, optim.sft_optimizer_knobs(c))
    validation = greedy_problems(task, task.demonstrations("validation")[:c.eval_examples], settings.eval)  # never test

    def sft_step(state: SFTState, meta: dict) -> tuple[SFTState, dict, dict]:
        step = meta["step"]
        batch = sharding.shard_batch(_batch_for_step(examples, step, c, config.seed, tokenizer.pad_id), mesh)
        lr_scale = optim.lr_scale(c.schedule, c.warmup_steps, step, step / steps)
        state, metrics = train_step(state, batch, lr_scale, frozen)
        return state, {**meta, "step": step + 1}, {k: float(v) for k, v in metrics.items()} | {"lr": c.lr * lr_scale}

    def model(state: SFTState) -> Policy:
        return start.with_params(lora.merge(frozen, state.params))

    def save(directory: str, state: SFTState) -> None:
        export(directory, model(state), config.model.export_dtype, config.model.path)

    def select(state: SFTState, meta: dict) -> tuple[dict, list[dict], dict]:
        report, records = evaluate(model(state), validation, desc="SFT eval")
        if report["accuracy"] > meta["best"]["accuracy"]:
            meta = {**meta, "best": {"accuracy": report["accuracy"], "step": meta["step"]}}
            save(best_dir, state)
        return {f"eval/{k}": v for k, v in report.items()}, samples(task, validation.demos, records), meta

    phase = loop.Phase("SFT", out, "sft", c.checkpoint_every, config.checkpoint.keep, c.eval_every, eval_at_end=True,
                       finite_keys=("loss", "grad_norm"), progress_bar=(("loss", "loss"), ("acc", "eval/accuracy")),
                       plot_keys=("loss", "eval/accuracy"))
    state = SFTState(params, *optim.initial_state(optimizer, params))
    state = train_step.prepare(state)
    hooks = loop.Hooks(sft_step, lambda meta: meta["step"] >= steps, lambda meta: (meta["step"], steps, "step"),
                       select)
    state, meta, finished = loop.run(phase, settings, state, {"step": 0, "best": {"accuracy": -1.0}}, hooks, stop)
    if not finished:
        return None
    save(last_dir, state)
    if meta["best"]["accuracy"] < 0:
        save(best_dir, state)
    return best_dir
