"""The paper's GSM8K CoT recipe (R^3 on Llama-2-7B), the same as `configs/paper.py:gsm8k`; only the
model path is needed:

    python -m r3jax.main --config=configs/gsm8k.py --config.model.path=/path/to/llama-2-7b-hf

The values and where they come from: configs/paper.py.
"""
import os
import runpy


def get_config():
    paper = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper.py"))
    return paper["get_config"]("gsm8k")
