"""Shared by the benchmarks: machine description and result writing."""
from __future__ import annotations

import json
import os
import platform
import sys

import jax


def device_name() -> str:
    device = jax.devices()[0]
    return "cpu" if device.platform == "cpu" else device.device_kind.lower().replace(" ", "-")


def machine() -> dict:
    import flax
    import optax

    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "device": jax.devices()[0].device_kind,
            "device_count": jax.device_count(), "python": sys.version.split()[0], "jax": jax.__version__,
            "flax": flax.__version__, "optax": optax.__version__}
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__,
                    torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return info


def write(name: str, payload: dict) -> str:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}-{device_name()}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
    return path
