"""What a node's blocks take in memory, measured: loaded bytes, the process's peak, the free memory."""

from __future__ import annotations

import resource

import torch
from torch import nn
from transformers import PretrainedConfig

from swarm.node.kv_cache import kv_bytes_per_token


def loaded_bytes(module: nn.Module) -> int:
    """Bytes the module's tensors take as loaded: its parameters and buffers, plus the quantization state
    bitsandbytes keeps beside a weight (int8 row scales, nf4 block scales). Each storage counts once, with
    the bytes it holds, not what shapes and dtypes would suggest."""
    seen: set[tuple[str, int]] = set()
    total = 0
    tensors = [*module.parameters(), *module.buffers()]
    for layer in module.modules():
        weight, state = getattr(layer, "weight", None), getattr(layer, "state", None)
        # an int8 layer's row scales sit on its weight until its first call, then on its state
        extras = [getattr(weight, "SCB", None), getattr(weight, "quant_state", None)]
        extras += [getattr(state, "CB", None), getattr(state, "SCB", None)]
        for extra in extras:
            if isinstance(extra, torch.Tensor):
                tensors.append(extra)
            elif extra is not None:
                tensors += [t for t in vars(extra).values() if isinstance(t, torch.Tensor)]
                nested = getattr(extra, "state2", None)
                if nested is not None:
                    tensors += [t for t in vars(nested).values() if isinstance(t, torch.Tensor)]
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def peak_memory_bytes(device: str) -> int:
    """The most memory this process has held so far: GPU memory allocated by torch on a CUDA device, else
    the process's peak resident set size."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def free_memory_bytes(device: str) -> int:
    """Memory free for new blocks on `device`: free GPU memory, or the RAM available to new processes."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def kv_cache_bytes_per_block(config: PretrainedConfig, cache_tokens: int, dtype: torch.dtype) -> int:
    """Bytes of keys and values one block holds when the node's whole --cache-tokens budget is in use."""
    return cache_tokens * kv_bytes_per_token(config, 1, dtype)
