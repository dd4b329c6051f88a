import os

# 8 simulated CPU devices for the mesh tests; must be set before JAX initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

DATA_DIR = os.environ.get("R3JAX_DATA_DIR",
                          os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture(scope="session")
def data_dir():
    return os.path.abspath(DATA_DIR)


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
    }[kind]
    torch.manual_seed(seed)
    model = model_class(config_class(**common)).eval()
    model.save_pretrained(path)
    return model
