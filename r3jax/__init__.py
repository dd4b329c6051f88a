"""r3jax: R^3 (reverse curriculum reinforcement learning for LLM reasoning) in JAX/Flax."""
