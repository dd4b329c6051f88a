"""Sandboxed program execution: programs per second under bubblewrap against the plain limited
process (the executor without OS isolation), with 1 worker and with N workers, in one run.

    python bench/sandbox.py [--programs 64] [--workers 4]

Programs are the released GSM8K program-of-thought solutions ($R3JAX_DATA_DIR). Results:
bench/results/sandbox-<device>.json.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import time

from common import write
from r3jax import tasks
from r3jax.metrics import machine_info
from r3jax.tasks.sandbox import Limits, probe_bwrap, run_program


def programs_per_second(programs, workers: int, isolated: bool) -> tuple[float, list]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda code: run_program(code, Limits(), isolated), programs[:workers]))  # warm up
        start = time.perf_counter()
        values = list(pool.map(lambda code: run_program(code, Limits(), isolated), programs))
        return len(programs) / (time.perf_counter() - start), values


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--programs", type=int, default=64)
    parser.add_argument("--workers", type=int, default=max(2, os.cpu_count() or 2))
    args = parser.parse_args()
    bwrap, reason = probe_bwrap()
    if bwrap is None:
        raise SystemExit(f"bubblewrap cannot isolate programs here: {reason}")
    task = tasks.get("gsm8k_pot")
    demos = task.demonstrations("train")[:args.programs]
    programs = [d.response for d in demos]
    rows = []
    for workers in (1, args.workers):
        for isolation in ("process", "bubblewrap"):
            rate, values = programs_per_second(programs, workers, isolation == "bubblewrap")
            correct = sum(isinstance(v, float) and abs(v - float(d.answer)) <= 1e-2 for v, d in zip(values, demos))
            rows.append({"isolation": isolation, "workers": workers, "programs_per_s": rate, "correct": correct,
                         "programs": len(programs)})
            print(rows[-1], flush=True)
    rate = {(r["isolation"], r["workers"]): r["programs_per_s"] for r in rows}
    write("sandbox", {"benchmark": "released GSM8K P-CoT programs through r3jax.tasks.sandbox",
                      "machine": machine_info(), "bwrap": bwrap, "rows": rows,
                      "bubblewrap_over_process": {w: rate["bubblewrap", w] / rate["process", w]
                                                  for w in (1, args.workers)}})


if __name__ == "__main__":
    main()
