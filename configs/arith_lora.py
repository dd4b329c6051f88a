"""The main job's R^3 phase with LoRA: RL from the main job's full SFT model (`runs/arith/sft/best`)
that trains only rank-16 adapters (alpha 32) beside every projection; the separate critic is a
second set of adapters on the same frozen base, and the KL reference is the base with the adapters
off. Everything else is the main job's: 100 PPO steps of R^3 (M = 5, batch 32, T = 1.3, KL 0.05),
greedy test accuracy at k = 0 on the same 400 problems. Declared before the run: lr 1e-4 (ten times
the full fine-tune's 1e-5, the usual step for adapters), seed 0, one trial, no tuning.

    python -m r3jax.main --config=configs/arith.py --workdir=runs/arith        # the main job (its SFT)
    python -m r3jax.main --config=configs/arith_lora.py --workdir=runs/arith_lora
"""
from configs import arith


def get_config():
    c = arith.get_config()
    c.mode = "rl"
    c.rl.init = "runs/arith/sft/best"
    c.rl.lr = 1e-4
    c.model.lora.rank = 16
    c.model.lora.alpha = 32.0
    return c
