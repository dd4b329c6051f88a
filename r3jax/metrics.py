"""Metrics to JSONL and TensorBoard, and PNG curves (reward and accuracy per start stage)."""
from __future__ import annotations

import json
import math
import os
from typing import Iterable

import numpy as np


def _scalar(value) -> float:
    return float(np.asarray(value))


class MetricsWriter:
    """Appends `{"step": s, ...}` lines to `<workdir>/<name>.jsonl` and TensorBoard scalars.

    On resume from `resume_step`, lines past it are dropped so the log matches the checkpoint.
    """

    def __init__(self, workdir: str, name: str, resume_step: int | None = None):
        from tensorboardX import SummaryWriter

        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, f"{name}.jsonl")
        kept = [r for r in read_jsonl(self.path) if resume_step is not None and r["step"] <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self.file = open(self.path, "a")
        self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard", name))

    def write(self, step: int, metrics: dict) -> dict:
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and math.isfinite(value):
                self.tensorboard.add_scalar(key, value, step)
        return record

    def close(self) -> None:
        self.file.close()
        self.tensorboard.close()


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window <= 1:
        return values
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_curves(records: Iterable[dict], path: str, prefixes: Iterable[str] = ("reward", "accuracy"),
                title: str = "", window: int = 5) -> str:
    """One panel per prefix; a line per key `<prefix>` or `<prefix>/...` (e.g. per stage), smoothed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    prefixes = list(prefixes)
    fig, axes = plt.subplots(1, len(prefixes), figsize=(6 * len(prefixes), 4), squeeze=False)
    for ax, prefix in zip(axes[0], prefixes):
        keys = sorted({k for r in records for k in r if k == prefix or k.startswith(prefix + "/")})
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
            if not points:
                continue
            steps, values = map(np.asarray, zip(*points))
            w = window if len(points) > 2 * window else 1
            ax.plot(steps[w - 1:], _smooth(values, w), label=key)
        ax.set_xlabel("step")
        ax.set_title(prefix)
        if keys:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
