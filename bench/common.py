"""Shared by the benchmarks: where results are written."""
from __future__ import annotations

import json
import os

import jax


def device_name() -> str:
    device = jax.devices()[0]
    return "cpu" if device.platform == "cpu" else device.device_kind.lower().replace(" ", "-")


def write(name: str, payload: dict) -> str:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}-{device_name()}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
    return path
