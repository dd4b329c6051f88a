"""The scanned model's sampling time under two checkouts of r3jax, interleaved: how much a change to
the sampler or the model moved it. Each round runs one process per checkout.

    python bench/decode_versions.py BEFORE_ROOT AFTER_ROOT [--rounds 2]

(e.g. `git worktree add /tmp/before <commit>`). A 8-layer, 256-wide scanned Llama samples 256 new
tokens for 16 prompts of 64 tokens; each process reports the median of 5 timed calls after one
that compiles. Prints each checkout's medians and the after / before ratio.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np

from common import device_name

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
import r3jax
assert r3jax.__file__.startswith(sys.argv[1]), r3jax.__file__
from r3jax.models.transformer import ModelConfig, init_params
from r3jax.sampling import SamplingConfig, sample
cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_layers=8, num_heads=8, num_kv_heads=4,
                  head_dim=32, max_position_embeddings=2048, scan_layers=True)
params = nn.unbox(init_params(cfg, jax.random.key(0)))
tokens = jax.random.randint(jax.random.key(1), (16, 64), 1, 512)
settings = SamplingConfig(max_new_tokens=256, temperature=1.0, pad_id=0)
def timed(seed):
    start = time.perf_counter()
    jax.block_until_ready(sample(cfg, params, tokens, jnp.ones_like(tokens), jax.random.key(seed), settings).tokens)
    return time.perf_counter() - start
timed(0)
print(json.dumps(float(np.median([timed(seed) for seed in range(1, 6)]))))
"""


def median_seconds(root: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, root], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    seconds = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name in ("before", "after"):
            seconds[name].append(median_seconds(getattr(args, name)))
    ratios = np.array(seconds["after"]) / np.array(seconds["before"])
    print(json.dumps({"device": device_name(), "seconds": seconds, "after_over_before": ratios.round(3).tolist()}))


if __name__ == "__main__":
    main()
