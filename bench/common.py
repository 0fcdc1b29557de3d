"""Helpers every benchmark script shares: the results-folder name of a device, quantiles."""
from __future__ import annotations

import math
import os
import platform
import re
from pathlib import Path


def device_name(device: str) -> str:
    """A folder-safe name for the device: the GPU's name, or "cpu-<model>-<cores>c"."""
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = "cpu-" + (_cpu_model() or platform.machine())
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}-{os.cpu_count()}c"
    except OSError:
        pass
    return ""


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile of ``xs`` (q in [0, 1])."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
