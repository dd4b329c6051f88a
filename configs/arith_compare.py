"""The paper's comparison on `arith`: SFT, then outcome-only RL, staged RL and R^3 (mixed) from
the same SFT model with the same budget of sampled tokens, 3 seeds each (declared here, before
any run), SFT continued for as many updates, and 2,000 test problems read once at the end.

    python -m r3jax.main --config=configs/arith_compare.py
"""
from configs import arith


def get_config():
    c = arith.get_config()
    c.mode = "compare"
    c.task.options.num_test = 2000
    c.eval.num_examples = 0  # all 2,000
    c.rl.token_budget = 50_000
    c.rl.steps = 10_000  # the budget ends each run
    c.rl.stage_unit = "budget"  # staged: equal shares of the budget per stage, easiest first
    c.rl.eval_every = 0
    c.compare.seeds = (0, 1, 2)
    # the paper's PPO for every strategy, and critic-free GRPO (4 samples per start state) for two
    c.compare.arms = ("rl", "staged", "r3", "rl-grpo", "r3-grpo")
    c.compare.group_size = 4
    c.compare.sample_problems = 300
    return c
