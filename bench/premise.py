"""R^3's premise for a trained SFT model: its success rate at the RL temperature from every start
stage, per chain length, on the validation split (`compare.premise_table`, as the comparison
reports it), at T 1.3 (the main job's) and 1.0.

    python bench/premise.py runs/arith/sft/best [--config configs/arith.py]

Results: bench/results/arith-default-premise.json.
"""
from __future__ import annotations

import argparse
import os

import jax

from r3jax import config as config_lib, files, sharding, tasks, tokenizer as tokenizer_lib
from r3jax.train import compare, job

TEMPERATURES = (1.3, 1.0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("sft", help="the SFT model's HF directory")
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "arith.py"))
    args = parser.parse_args()
    config = config_lib.load_config_file(args.config)
    task = tasks.get(config.task.name, **config.task.options.to_dict())
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tokenizer = tokenizer_lib.load(args.sft)
    policy = job.load_policy(args.sft, config, tokenizer, mesh)
    demos = task.demonstrations("validation")
    tables = {}
    for temperature in TEMPERATURES:
        config.rl.temperature = temperature
        tables[str(temperature)] = compare.premise_table(policy, task, demos, config)
        ten = tables[str(temperature)]["steps_10"]
        print(f"T {temperature}: 10-step chains solved from stage 0 {ten['stage_0']:.2f}, "
              f"from the last stage {ten[max(ten)]:.2f}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "arith-default-premise.json")
    files.write_json(path, {"sft": args.sft, "split": "validation", "problems": len(demos), "by_temperature": tables})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
