"""The update's attention on packed rows: the masked dense kernel (`model.attention_impl=xla`, in
causal blocks) next to the fused ones (cudnn, pallas; splash on a TPU), measured in the same run,
at TinyLlama-1.1B's attention shape (32 query heads over 4 key/value heads of 64) in bfloat16.

    python bench/attention.py [--rows 16] [--width 1212]

Each row packs rollouts of GSM8K-like lengths (prompt plus completion, 150-600 tokens) end to end,
segment ids as `rl.pack` lays them out, the rest of the row padding. For each kernel: the forward
and the forward + backward seconds (median of 10 after one compiling call), and its largest
difference from a float32 dense reference on real positions, output and gradients, next to the
bfloat16 dense kernel's own. Meant for an accelerator (cudnn needs a GPU, splash a TPU; a kernel
the backend lacks is reported as an error; the Pallas kernels run interpreted, slowly, on a CPU).
Results: bench/results/attention-<device>.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import write
from r3jax.metrics import machine_info
from r3jax.models.transformer import attention, causal_block_attention, fused_attention

KV_HEADS, GROUPS, HEAD_DIM = 4, 8, 64
KERNELS = ("xla", "cudnn", "pallas", "splash")


def packed_segments(rows: int, width: int, seed: int = 0) -> np.ndarray:
    """`[rows, width]` segment ids: rollouts of 150-600 tokens end to end (the first cut to the
    width), 0 from the first that does not fit."""
    rng = np.random.default_rng(seed)
    segments = np.zeros((rows, width), np.int32)
    for row in segments:
        start, segment, length = 0, 1, min(width, int(rng.integers(150, 601)))
        while length <= width - start:
            row[start:start + length] = segment
            start, segment, length = start + length, segment + 1, int(rng.integers(150, 601))
    return segments


def attend(kernel: str, q, k, v, segments):
    """One kernel's attention as the model runs it without a cache; q `[rows, width, kv_heads,
    groups, head_dim]`, k/v `[rows, kv_heads, width, head_dim]`."""
    if kernel == "xla":
        return causal_block_attention(q, k, v, segments > 0, segments)
    return fused_attention(q, k, v, segments, kernel)


def seconds(fn, *args) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(10):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(kernel: str, inputs, segments, cotangent, reference) -> dict:
    real = (segments > 0)[:, :, None, None, None]
    forward = jax.jit(lambda q, k, v: attend(kernel, q, k, v, segments))
    loss = lambda q, k, v: (attend(kernel, q, k, v, segments).astype(jnp.float32) * cotangent * real).sum()
    backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    out, grads = forward(*inputs), backward(*inputs)
    ref_out, ref_grads = reference
    error = lambda got, want: float(jnp.abs(got.astype(jnp.float32) - want).max())
    return {"forward_s": seconds(forward, *inputs), "forward_backward_s": seconds(backward, *inputs),
            "max_output_error": error(out * real, ref_out * real),
            "max_gradient_error": max(error(g, r) for g, r in zip(grads, ref_grads))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--width", type=int, default=1212, help="configs/gsm8k.py's pack width")
    args = parser.parse_args()
    segments = jnp.asarray(packed_segments(args.rows, args.width))
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (args.rows, args.width, KV_HEADS, GROUPS, HEAD_DIM), jnp.float32)
    k, v = (jax.random.normal(key, (args.rows, KV_HEADS, args.width, HEAD_DIM), jnp.float32) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)
    real = (segments > 0)[:, :, None, None, None]
    ref_loss = lambda q, k, v: (attention(q, k, v, segments > 0, 0, segments) * cotangent * real).sum()
    reference = (jax.jit(lambda q, k, v: attention(q, k, v, segments > 0, 0, segments))(q, k, v),
                 jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(q, k, v))
    inputs = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    by_kernel = {}
    for kernel in KERNELS:
        try:
            by_kernel[kernel] = measure(kernel, inputs, segments, cotangent, reference)
        except Exception as error:  # a kernel this backend lacks is reported, not fatal
            by_kernel[kernel] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        print(kernel, by_kernel[kernel], flush=True)
    dense = by_kernel["xla"]
    result = {"benchmark": "packed-row attention: dense vs fused kernels (bench/attention.py)",
              "machine": machine_info(), "rows": args.rows, "width": args.width,
              "real_fraction": float((segments > 0).mean()),
              "shape": {"kv_heads": KV_HEADS, "groups": GROUPS, "head_dim": HEAD_DIM}, "dtype": "bfloat16",
              "by_kernel": by_kernel,
              "forward_backward_over_xla": {name: r["forward_backward_s"] / dense["forward_backward_s"]
                                            for name, r in by_kernel.items() if "error" not in r}}
    print({k: result[k] for k in ("real_fraction", "forward_backward_over_xla")})
    fused = {name: r["forward_backward_s"] for name, r in by_kernel.items() if name != "xla" and "error" not in r}
    print("fastest fused kernel:", min(fused, key=fused.get) if fused else "none")
    write("attention", result)


if __name__ == "__main__":
    main()
