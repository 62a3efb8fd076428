"""Small helpers the benchmark scripts share."""

from __future__ import annotations

import os
import platform

import torch


def device_name(device: str) -> str:
    """What the numbers were measured on, for the JSON rows: the GPU's name, or the CPU and its cores."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def release_memory(device: str) -> None:
    """Give cached GPU memory back after the local baseline, since the nodes share the GPU."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
