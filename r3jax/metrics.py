"""Metrics to JSONL and TensorBoard, and PNG curves (reward and accuracy per start stage)."""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
from typing import Iterable

import numpy as np

from r3jax import files
from r3jax.errors import InputError, RecordError
from r3jax.sharding import is_primary


def cpu_model(cpuinfo: str) -> dict:
    """The processor's name and widest x86 vector extension, from /proc/cpuinfo's text (its first
    processor's block): CPU timings of one code differ between hosts of the same core count
    (docs/experiments.md, run 23)."""
    fields = dict(line.split(":", 1) for line in cpuinfo.split("\n\n", 1)[0].splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    vectors = next((name for name in ("avx512f", "avx2", "avx") if name in flags), None)
    return {"cpu_model": fields.get("model name"), "cpu_vectors": vectors}


def machine_info() -> dict:
    """Where a result was measured: host, processor, devices and library versions."""
    import platform
    import sys

    import flax
    import jax
    import optax

    try:
        with open("/proc/cpuinfo") as f:
            processor = cpu_model(f.read())
    except OSError:  # not Linux
        processor = {}
    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(), **processor,
            "cpu_count": os.cpu_count(), "device": jax.devices()[0].device_kind,
            "device_count": jax.device_count(), "process_count": jax.process_count(),
            "python": sys.version.split()[0], "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__}
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__,
                    torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return info


def _scalar(value) -> float:
    return float(np.asarray(value))


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """config.metrics: what goes beside the JSONL log."""
    sample_completions: int = 4  # per evaluation, as TensorBoard text (and a W&B table)
    wandb: str = ""  # "" off, "offline" (written under the workdir, `wandb sync` later) or "online"
    wandb_project: str = "r3jax"


def _wandb_run(options: MetricsConfig, workdir: str, name: str, run_config: dict | None):
    """A W&B run whose id is fixed by the log's path, so a resumed phase continues its run."""
    try:
        import wandb
    except ImportError:
        raise InputError("config.metrics.wandb: wandb is not installed (pip install wandb)") from None
    path = os.path.abspath(os.path.join(workdir, name))
    run_id = hashlib.sha1(path.encode()).hexdigest()[:16]
    return wandb.init(project=options.wandb_project, dir=workdir, mode=options.wandb, id=run_id, resume="allow",
                      name=f"{os.path.basename(os.path.dirname(path))}/{name}", config=run_config)


def _sample_markdown(sample: dict) -> str:
    """A sample as TensorBoard markdown: the verdict, then the prompt's end and the completion verbatim."""
    body = (sample["prompt"][-300:] + sample["completion"]).replace("\n", "\n    ")
    return f"**{'correct' if sample['correct'] else 'wrong'}** (gold {sample['answer']})\n\n    {body}"


class MetricsWriter:
    """Appends `{"step": s, ...}` lines to `<workdir>/<name>.jsonl`, TensorBoard scalars, and with
    `options.wandb` the same to Weights & Biases; `write_samples` adds a few evaluated completions.

    On resume from `resume_step`, lines past it are dropped so the log matches the checkpoint.
    In a multi-host run only process 0 writes; the others keep the path and write nothing.
    """

    def __init__(self, workdir: str, name: str, resume_step: int | None = None,
                 options: MetricsConfig = MetricsConfig(), run_config: dict | None = None):
        from tensorboardX import SummaryWriter

        self.path = os.path.join(workdir, f"{name}.jsonl")
        self.active = is_primary()
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        kept = [r for r in read_jsonl(self.path) if resume_step is not None and r["step"] <= resume_step]
        files.write_jsonl(self.path, kept)
        self.file = open(self.path, "a")
        self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard", name))
        self.options = options
        self.wandb = _wandb_run(options, workdir, name, run_config) if options.wandb else None

    def write(self, step: int, metrics: dict) -> dict:
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if not self.active:
            return record
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        finite = {key: value for key, value in record.items() if key != "step" and math.isfinite(value)}
        for key, value in finite.items():
            self.tensorboard.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(finite, step=int(step))
        return record

    def write_samples(self, step: int, samples: list[dict]) -> None:
        """The first `options.sample_completions` of `samples` ({"prompt", "completion", "answer",
        "correct"}) as TensorBoard text under `samples` (and a W&B table)."""
        if not self.active:
            return
        samples = samples[:self.options.sample_completions]
        if not samples:
            return
        self.tensorboard.add_text("samples", "\n\n".join(_sample_markdown(s) for s in samples), step)
        if self.wandb:
            import wandb

            columns = ["prompt", "completion", "answer", "correct"]
            self.wandb.log({"samples": wandb.Table(columns=columns, data=[[s[c] for c in columns] for s in samples])},
                           step=int(step))

    def close(self) -> None:
        if not self.active:
            return
        self.file.close()
        self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def read_jsonl(path: str) -> list[dict]:
    """The records of a metrics log ([] when it does not exist yet). A last line with no newline
    that does not parse is a write cut short by a kill, and is left out."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.readlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines) and not line.endswith("\n"):
                break
            raise RecordError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    return records


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
    files.save_figure(fig, path)
    plt.close(fig)
    return path


def plot_heatmap(records: Iterable[dict], path: str, prefix: str, title: str = "") -> str:
    """A stage x step heat-map of the keys `<prefix>/stage_<j>` (e.g. each stage's share of the
    start points), 0 where a step has no such key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if any(k.startswith(prefix + "/stage_") for k in r)]
    stages = sorted({int(k.rsplit("_", 1)[1]) for r in records for k in r if k.startswith(prefix + "/stage_")})
    grid = np.array([[r.get(f"{prefix}/stage_{stage}", 0.0) for r in records] for stage in stages])
    fig, ax = plt.subplots(figsize=(8, 3))
    image = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest",
                      extent=(records[0]["step"] - 0.5, records[-1]["step"] + 0.5, -0.5, len(stages) - 0.5))
    ax.set_yticks(range(len(stages)), [str(stage) for stage in stages])
    ax.set_xlabel("step")
    ax.set_ylabel("stage (0 = full task)")
    fig.colorbar(image, ax=ax, label="share")
    ax.set_title(title or prefix)
    fig.tight_layout()
    files.save_figure(fig, path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Curves on demand, also of a run still in progress:
    `python -m r3jax.metrics runs/arith/rl/rl.jsonl [--out FILE.png] [--keys reward accuracy kl]`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m r3jax.metrics", description=main.__doc__)
    parser.add_argument("log", help="a metrics .jsonl file written by a run")
    parser.add_argument("--out", help="PNG path (default: next to the log, <name>_curves_on_demand.png, "
                                      "beside and never over the run's own curves)")
    parser.add_argument("--keys", nargs="+", help="one panel per metric prefix, e.g. reward accuracy kl entropy "
                                                  "(default: reward and accuracy where logged, else loss)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.log):
        print(f"error: {args.log}: no such metrics file", file=sys.stderr)
        return 2
    try:
        records = read_jsonl(args.log)
        prefixes = panels(records, args.keys, args.log)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = args.out or os.path.splitext(args.log)[0] + "_curves_on_demand.png"
    print(plot_curves(records, out, prefixes, title=os.path.basename(args.log)))
    return 0


def panels(records: list[dict], asked: list[str] | None, log: str) -> list[str]:
    """The metric prefixes to draw from `records`: those `asked` (InputError for one that `log`
    lacks, with the closest logged keys), else reward and accuracy where logged, else loss (an
    SFT log). InputError where there is nothing to draw."""
    if not records:
        raise InputError(f"{log}: no step logged yet (a run writes one line per step; try again after its first)")
    logged = sorted({key for record in records for key in record})
    has = lambda prefix: any(key == prefix or key.startswith(prefix + "/") for key in logged)
    if asked:
        for prefix in asked:
            if not has(prefix):
                closest = ", ".join(difflib.get_close_matches(prefix, logged, n=3, cutoff=0.0))
                raise InputError(f"--keys {prefix}: not logged in {log} (closest logged: {closest})")
        return asked
    drawn = [prefix for prefix in ("reward", "accuracy") if has(prefix)] or (["loss"] if has("loss") else [])
    if not drawn:
        raise InputError(f"{log}: logs none of reward, accuracy or loss: name what to draw with --keys "
                         f"(logged: {', '.join(logged)})")
    return drawn


if __name__ == "__main__":
    raise SystemExit(main())
