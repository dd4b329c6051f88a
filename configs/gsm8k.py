"""The paper's GSM8K CoT recipe (R^3 on Llama-2-7B, 8 devices). Only the model path is needed:

    python -m r3jax.main --config=configs/gsm8k.py --config.model.path=/path/to/llama-2-7b-hf

Values from the paper and the authors' released code (see ../shared/DESIGN.md): SFT lr 2e-5;
PPO clip 0.2, value clip 0.2, value-loss coefficient 5, gamma 1, lambda 0.95, KL 0.05 as a
per-token reward, 2 PPO epochs per batch, lr 3e-7, grad clip 1, temperature 1, 700 new tokens,
value head on the policy, partial reward 0.2, M = 5 start states mixed; greedy evaluation.
"""
from r3jax.config import base_config

TRAIN_PROMPTS = 7473 * 5  # start states: 5 per demonstration


def get_config():
    c = base_config()
    c.task.name = "gsm8k"
    c.task.options.train_path = ""  # "" = $R3JAX_DATA_DIR/gsm8k/train.jsonl
    c.task.options.test_path = ""
    c.task.options.partial_reward = 0.2
    c.task.options.limit = 0
    c.model.path = ""  # required: a local HF Llama-2-7B (or any Llama/Mistral/Qwen2) directory
    c.model.from_scratch = False
    c.model.param_dtype = "bfloat16"
    c.model.dtype = "bfloat16"
    c.mesh = (1, -1, 1)  # FSDP over all devices

    c.sft.steps = 3 * 7473 // 64  # 3 epochs
    c.sft.batch_size = 64
    c.sft.lr = 2e-5
    c.sft.warmup_steps = 30
    c.sft.schedule = "linear"
    c.sft.max_length = 1024
    c.sft.eval_every = 7473 // 64
    c.sft.eval_examples = 300
    c.sft.checkpoint_every = 100

    c.rl.strategy = "mixed"
    c.rl.num_start_states = 5
    c.rl.batch_size = 64
    c.rl.steps = 50 * TRAIN_PROMPTS // 64  # 50 epochs over the start states
    c.rl.lr = 3e-7
    c.rl.kl_coef = 0.05
    c.rl.kl_mode = "reward"
    c.rl.gamma = 1.0
    c.rl.lam = 0.95
    c.rl.clip_ratio = 0.2
    c.rl.value_clip = 0.2
    c.rl.vf_coef = 5.0
    c.rl.epochs = 2
    c.rl.minibatches = 1
    c.rl.grad_clip = 1.0
    c.rl.temperature = 1.0
    c.rl.max_new_tokens = 700
    c.rl.max_prompt_length = 512
    c.rl.logits_chunk = 128  # 64 x 128 x 32000 fp32 logits per chunk instead of 64 x 700 x 32000
    c.rl.separate_critic = False
    c.rl.eval_every = 500
    c.rl.eval_examples = 300
    c.rl.checkpoint_every = 100

    c.eval.split = "test"
    c.eval.batch_size = 64
    c.eval.max_new_tokens = 700
    return c
