"""Sandboxed program execution: programs per second with 1 worker and with N workers, in one run.

    python bench/sandbox.py [--programs 64] [--workers 4]

Programs are the released GSM8K program-of-thought solutions ($R3JAX_DATA_DIR). Results:
bench/results/sandbox-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import time

from common import write
from r3jax import tasks
from r3jax.metrics import machine_info
from r3jax.tasks.sandbox import Limits, Sandbox


def programs_per_second(programs, workers: int) -> tuple[float, list]:
    with Sandbox(workers=workers, limits=Limits()) as sandbox:
        sandbox.run(programs[:workers])  # warm the pool's threads
        start = time.perf_counter()
        values = sandbox.run(programs)
        return len(programs) / (time.perf_counter() - start), values


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--programs", type=int, default=64)
    parser.add_argument("--workers", type=int, default=max(2, os.cpu_count() or 2))
    args = parser.parse_args()
    task = tasks.get("gsm8k_pot")
    demos = task.demonstrations("train")[:args.programs]
    programs = [d.response for d in demos]
    rows = []
    for workers in (1, args.workers):
        rate, values = programs_per_second(programs, workers)
        correct = sum(isinstance(v, float) and abs(v - float(d.answer)) <= 1e-2 for v, d in zip(values, demos))
        rows.append({"workers": workers, "programs_per_s": rate, "correct": correct, "programs": len(programs)})
        print(rows[-1], flush=True)
    write("sandbox", {"benchmark": "released GSM8K P-CoT programs through r3jax.tasks.sandbox",
                      "machine": machine_info(), "rows": rows,
                      "speedup_n_vs_1": rows[1]["programs_per_s"] / rows[0]["programs_per_s"]})


if __name__ == "__main__":
    main()
