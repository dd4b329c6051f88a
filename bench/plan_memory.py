"""The planner's per-device memory next to what the device really holds, for the SFT step and the
PPO update, on the device this runs on (meant for one accelerator).

    python bench/plan_memory.py [--config=configs/gsm8k.py] [--model=qwen2.5-0.5b] [--set KEY=VALUE ...]

Each phase runs in its own process (the allocator's peak only grows): `r3jax.plan.plan` for the
plan, then the real step on random weights and tokens of the planned shapes, reading the
allocator's `peak_bytes_in_use` after one call. Results: bench/results/plan_memory-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the peak is what a phase allocates

PHASES = ("plan", "sft_step", "ppo_update")


def setup(args):
    from r3jax import plan

    config = plan.load_config(args.config, args.set)
    return config, plan.model_config_for(config, args.model)


def real_peak(config, model_cfg, phase: str) -> int:
    """Peak bytes on device 0 after one real call of `phase` at the config's shapes."""
    import jax

    from r3jax import plan

    fn, args = plan.concrete_phase(config, model_cfg, phase)
    jax.block_until_ready(fn(*args))
    return int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])


def run_phase(args) -> dict:
    config, model_cfg = setup(args)
    if args.phase == "plan":
        from r3jax import plan

        result = plan.plan(config, model_cfg, progress=lambda message: print(message, file=sys.stderr))
        return {name: result["phases"][name]["peak_bytes"] for name in PHASES[1:]} | {
            "num_params": result["num_params"], "param_bytes_per_device": result["param_bytes_per_device"],
            "optimizer_state_bytes_per_device": result["optimizer_state_bytes_per_device"]}
    return {args.phase: real_peak(config, model_cfg, args.phase)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/gsm8k.py")
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--set", nargs="*", default=["mesh=(-1,1,1)"], metavar="KEY=VALUE")
    parser.add_argument("--phase", choices=PHASES, help="run one phase and print its JSON (internal)")
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args)))
        return
    command = [sys.executable, __file__, "--config", args.config, "--model", args.model, "--set", *args.set]
    measured = {}
    for phase in PHASES:
        print(f"{phase} ...", flush=True)
        output = subprocess.run(command + ["--phase", phase], check=True, capture_output=True, text=True).stdout
        measured[phase] = json.loads(output.strip().splitlines()[-1])

    from common import write
    from r3jax.metrics import machine_info

    planned = measured["plan"]
    rows = {name: {"planned_gb": planned[name] / 1e9, "real_gb": measured[name][name] / 1e9,
                   "planned_over_real": planned[name] / measured[name][name]} for name in PHASES[1:]}
    for name, row in rows.items():
        print(f"{name}: planned {row['planned_gb']:.2f} GB, real peak {row['real_gb']:.2f} GB "
              f"(planned / real {row['planned_over_real']:.2f})")
    write("plan_memory", {"benchmark": "planned peak bytes per device vs the allocator's real peak",
                          "config": args.config, "model": args.model, "overrides": args.set,
                          "num_params": planned["num_params"], "phases": rows, "machine": machine_info()})


if __name__ == "__main__":
    main()
