"""The paper's comparison on `arith`: SFT, then outcome-only RL, staged RL and R^3 (mixed) from
the same SFT model with the same budget of sampled tokens, 3 seeds each.

    python -m r3jax.main --config=configs/arith_compare.py
"""
from configs import arith


def get_config():
    c = arith.get_config()
    c.mode = "compare"
    c.rl.token_budget = 50_000
    c.rl.steps = 10_000  # the budget ends each run
    c.rl.stage_unit = "budget"  # staged: equal shares of the budget per stage, easiest first
    c.rl.eval_every = 0
    c.compare.seeds = (0, 1, 2)
    c.compare.arms = ("rl", "staged", "r3")
    c.compare.estimators = ("gae", "grpo")  # PPO with a critic (the paper's) and critic-free GRPO
    c.compare.group_size = 4
    c.compare.output = "bench/results/arith-compare.json"
    return c
