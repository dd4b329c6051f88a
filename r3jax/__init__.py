"""r3jax: R^3 (reverse curriculum reinforcement learning for LLM reasoning) in JAX/Flax."""
import os

# XLA:CPU hands elementwise work to YNNPACK as well as dots by default; limited to dots and
# reductions, a forward + backward pass of bench/peers.py's 3.95M Llama took 391-442 ms instead of
# 552-611 (docs/experiments.md, "XLA's CPU backward"). Set here, before JAX reads XLA_FLAGS at its
# first use; a value of the user's own wins. GPU and TPU compiles do not read it.
YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
if YNN_FUSION_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {YNN_FUSION_FLAG}=dot,reduce".strip()
