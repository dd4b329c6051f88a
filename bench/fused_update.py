"""One whole GRPO update under each attention kernel against the float32 dense update, on
tests/test_trim.py's batch (the padded batch sampled by its tiny model, then packed): the largest
weight and metric differences, next to the bfloat16 dense kernel's own, which is the rounding a
bfloat16 kernel is judged against. Meant for an accelerator (cudnn needs a GPU; the Pallas kernels
run interpreted on a CPU, where tests/test_trim.py checks them).

    python bench/fused_update.py

Results: bench/results/fused_update-<device>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from common import write  # noqa: E402
from helpers import tiny_params  # noqa: E402
from r3jax.metrics import machine_info  # noqa: E402
from r3jax.models.value import actor_critic_params  # noqa: E402
from test_trim import BASE, TINY, _padded_batch, _update, packed  # noqa: E402

KERNELS = {"float32 dense": TINY.replace(attention_impl="xla"),
           "float32 pallas": TINY.replace(attention_impl="pallas"),
           "bfloat16 dense": TINY.replace(dtype="bfloat16", attention_impl="xla"),
           "bfloat16 cudnn": TINY.replace(dtype="bfloat16", attention_impl="cudnn")}


def largest_difference(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, b)))


def main():
    cfg = dataclasses.replace(BASE, estimator="grpo", group_size=4, loss_agg="seq_mean_token_sum_norm", minibatches=1)
    params = actor_critic_params(TINY, tiny_params(), False, critic=False)
    padded = _padded_batch(params, cfg.group_size)
    want_params, want, _ = _update(cfg, params, padded, model_cfg=KERNELS["float32 dense"])
    by_kernel = {}
    for name, model_cfg in KERNELS.items():
        try:
            got_params, got, _ = _update(cfg, params, packed(padded), model_cfg=model_cfg)
            by_kernel[name] = {"largest_weight_difference": largest_difference(got_params, want_params),
                               "largest_metric_difference": max(abs(got[k] - want[k]) for k in want)}
        except Exception as error:  # a kernel this backend lacks is reported, not fatal
            by_kernel[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        print(name, by_kernel[name], flush=True)
    write("fused_update", {"benchmark": "one GRPO update per attention kernel vs the float32 dense one "
                                        "(bench/fused_update.py)", "machine": machine_info(),
                           "largest_weight_move": largest_difference(want_params, params), "by_kernel": by_kernel})


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
