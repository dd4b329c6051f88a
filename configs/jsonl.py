"""Your own data: SFT then R^3 on local JSONL files (README, "Your data, your reward, your model").

    python -m r3jax.main --config=configs/jsonl.py --config.task.options.train_path=train.jsonl \
        --config.task.options.test_path=test.jsonl [--config.model.path=/models/my-llama]

Without model.path it trains the embedded default's tiny model from scratch, which suits a CPU
and a quick look; give a local HF checkpoint for real work.
"""
import ml_collections

from configs import arith


def get_config():
    c = arith.get_config()
    c.task.name = "jsonl"
    c.task.options = ml_collections.ConfigDict({
        "train_path": "", "test_path": "",
        "validation_size": 0.05,  # held out of train for model selection
        "cut": "lines",  # start-state steps: lines or words
        "answer_type": "number",  # number (partial_reward for a wrong one) or text
        "answer_marker": "####",
        "partial_reward": 0.0,
        "reward_fn": "",  # package.module:function replaces the scorer
        "limit": 0,  # the first N records of each split; 0 = all
    })
    c.sft.eval_examples = 100
    c.eval.num_examples = 0
    return c
