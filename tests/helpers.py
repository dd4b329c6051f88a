"""Shared test helpers: tiny models built locally from random configs (r3jax and HF), the CLI's
environment and its run logs."""
import os
import time

import flax.linen as nn
import jax

from r3jax.metrics import read_jsonl
from r3jax.models.transformer import ModelConfig, init_params

TINY = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=512)


def tiny_params(cfg: ModelConfig = TINY, seed: int = 0, scale: float = 1.0):
    """Random params; `scale` > 1 sharpens the logits so sampled text is less uniform."""
    params = nn.unbox(init_params(cfg, jax.random.key(seed)))
    return jax.tree.map(lambda p: p * scale if p.ndim > 1 else p, params)


def make_hf_model(kind: str, path: str, seed: int = 0, **overrides):
    """Creates and saves a tiny random HF causal LM of the given family (torch, CPU)."""
    import torch
    import transformers

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5)
    common.update(overrides)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    torch.manual_seed(seed)
    model = model_class(config_class(**common)).eval()
    model.save_pretrained(path)
    return model


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_env(devices: int = 1) -> dict:
    """The environment for a CLI run on `devices` simulated CPU devices, compiled as the suite is."""
    flags = os.environ.get("R3JAX_TEST_COMPILE_FLAGS", "")
    if devices > 1:
        flags = f"--xla_force_host_platform_device_count={devices} {flags}"
    return {**os.environ, "XLA_FLAGS": flags.strip()}


# The CLI runs on this machine's one CPU device, not the 8 simulated ones of the mesh tests.
ENV = xla_env()


def rl_log(workdir) -> list[dict]:
    return read_jsonl(os.path.join(workdir, "rl", "rl.jsonl"))


def length_parity_reward(response: str, gold: str) -> float:
    """A reward a random model earns half the time (`task.options.reward_fn=helpers:length_parity_reward`),
    so RL tests see groups of both equal and unequal rewards."""
    return float(len(response) % 2)


def process_dependent_reward(response: str, gold: str) -> float:
    """`length_parity_reward` on process 0 and its opposite on the others: a reward that differs
    between hosts, of which a multi-host run must use process 0's alone."""
    parity = length_parity_reward(response, gold)
    return parity if jax.process_index() == 0 else 1.0 - parity


def hangs_once_told(response: str, gold: str) -> float:
    """`length_parity_reward`, but while the file R3JAX_TEST_HANG names exists it does not return,
    as a reward function, or a service it calls, that stops answering."""
    told = os.environ.get("R3JAX_TEST_HANG")
    while told and os.path.exists(told):
        time.sleep(1)
    return length_parity_reward(response, gold)
