"""Shared by the benchmarks: where results are written."""
from __future__ import annotations

import os

import jax

from r3jax import files


def device_name() -> str:
    device = jax.devices()[0]
    return "cpu" if device.platform == "cpu" else device.device_kind.lower().replace(" ", "-")


def write(name: str, payload: dict) -> str:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}-{device_name()}.json")
    files.write_json(path, payload)
    print(f"wrote {path}")
    return path
