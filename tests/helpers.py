"""Tiny models for tests, built locally from random configs."""
import jax

from r3jax.models.transformer import ModelConfig, init_params
import flax.linen as nn

TINY = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=512)


def tiny_params(cfg: ModelConfig = TINY, seed: int = 0, scale: float = 1.0):
    """Random params; `scale` > 1 sharpens the logits so sampled text is less uniform."""
    params = nn.unbox(init_params(cfg, jax.random.key(seed)))
    return jax.tree.map(lambda p: p * scale if p.ndim > 1 else p, params)
