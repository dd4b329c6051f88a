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
    c.rl.token_budget = 60_000
    c.rl.steps = 10_000  # the budget ends each run
    c.rl.stage_unit = "budget"  # staged: equal shares of the budget per stage, easiest first
    c.rl.eval_every = 0
    c.compare.seeds = (0, 1, 2)
    # the paper's PPO for every strategy, and outcome-only RL and R^3 with the critic-free GRPO
    # estimator; each arm tried with three learning rates on the validation split before its seeds
    # run (3e-5 was added after a first run on (1e-5, 1e-4), where 1e-4 lost 9-27 validation points
    # to 1e-5 and 1e-5 moved nothing)
    c.compare.arms = ("rl", "staged", "r3", "rl-grpo", "r3-grpo")
    c.compare.tune_lr = (1e-5, 3e-5, 1e-4)
    c.compare.tune_continued_lr = (3e-5, 1e-4, 3e-4)  # the SFT-continued control gets as many trials
    c.compare.sample_problems = 300
    return c
