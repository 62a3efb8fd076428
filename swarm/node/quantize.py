"""Quantized weights for a node's blocks (bitsandbytes), and what the loaded blocks really take in memory.

`--quant int8` swaps every `nn.Linear` inside the loaded decoder layers for bitsandbytes' `Linear8bitLt`
(int8 weights with one fp32 scale per output row; on GPUs LLM.int8()'s matmul with outlier features above
6.0 kept in 16 bits, on CPUs a dequantize-and-matmul, see _cpu_int8_class), `--quant nf4` for
`Linear4bit` (4-bit NormalFloat, blockwise scales). The modules are swapped
on this node's own layer instances, the way bitsandbytes is meant to be used; transformers' classes are
not touched. Fused MoE expert weights are not `nn.Linear` and stay in the node's dtype.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator

import torch
from torch import nn

from swarm.dht.records import QUANT_NAMES

logger = logging.getLogger(__name__)

INT8_OUTLIER_THRESHOLD = 6.0  # LLM.int8()'s default: inputs above it go through the fp16/fp32 path


class QuantError(ValueError):
    """A --quant this node cannot run (bitsandbytes missing, or not supporting the device)."""


@contextlib.contextmanager
def _offline_quiet_import() -> Iterator[None]:
    """bitsandbytes looks for an optional CPU kernel on the Hugging Face Hub when imported (through the
    `kernels` package); a node downloads nothing at run time, so the lookup runs offline and its
    "not in the local cache" warning is kept out of the node's log."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def _bitsandbytes():
    try:
        with _offline_quiet_import():
            import bitsandbytes
    except ImportError as e:
        raise QuantError(
            f"--quant int8/nf4 needs bitsandbytes ({e}); install it with: pip install 'swarm[quant]'"
        ) from None
    # LLM.int8() quantizes activations in float16 and says so at warning level on every call from float32
    # or bfloat16 inputs: that is the method, not news, and it would flood the node's log
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return bitsandbytes


def check_quant_name(quant: str) -> str:
    if quant not in QUANT_NAMES:
        raise QuantError(f"unknown --quant {quant!r}; choose from {list(QUANT_NAMES)}")
    return quant


def quantized_linear(linear: nn.Linear, quant: str, dtype: torch.dtype, device: str) -> nn.Module:
    """A bitsandbytes layer computing `linear` with `quant` weights on `device` (activations in `dtype`)."""
    bnb = _bitsandbytes()
    has_bias = linear.bias is not None
    with torch.device("meta"):  # the layer's own weight is replaced right away: allocate none
        if quant == "int8":
            # on a CPU, dequantize-and-matmul (see _cpu_int8_class); on GPUs, LLM.int8()'s int8 kernels
            linear_class = _cpu_int8_class(bnb) if torch.device(device).type == "cpu" else bnb.nn.Linear8bitLt
            layer = linear_class(
                linear.in_features,
                linear.out_features,
                bias=has_bias,
                has_fp16_weights=False,
                threshold=INT8_OUTLIER_THRESHOLD,
            )
        else:
            layer = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, bias=has_bias, compute_dtype=dtype, quant_type="nf4"
            )
    weight = linear.weight.data.to("cpu")
    if quant == "int8":
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data.to(device=device, dtype=dtype), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes the weight as it moves to the device


@functools.cache
def _cpu_int8_class(bnb) -> type:
    class DequantizingLinear8bitLt(bnb.nn.Linear8bitLt):
        """bitsandbytes' int8 layer (its weights, row scales and state dict), computing on a CPU as its own
        CPU kernel for training does (MatMul8bitFp): weight = int8 x row scale / 127 in the input's dtype,
        then one matmul. Its inference path there rounds the activations to int8 through float16 as well
        (LLM.int8(), made for GPUs' int8 matmuls), which measured 0.13 relative logit error on SmolLM2-135M
        against 0.045 for this, and is slower on a CPU."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.weight.CB is not None:  # first call: bitsandbytes moves the quantized weight to state
                self.init_8bit_state()
            state = self.state
            weight = state.CB.to(x.dtype).mul_(state.SCB.to(x.dtype).unsqueeze(1) / 127.0)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return nn.functional.linear(x, weight, bias)

    return DequantizingLinear8bitLt


def quantize_linears(module: nn.Module, quant: str, dtype: torch.dtype, device: str) -> int:
    """Replace every nn.Linear under `module` with its `quant` version, in place; returns how many."""
    check_quant_name(quant)
    if quant == "none":
        return 0
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, quantized_linear(child, quant, dtype, device))
                count += 1
    return count


def check_quant_runs(quant: str, dtype: torch.dtype, device: str) -> None:
    """Fail early, with a clear QuantError, where `quant` cannot run: bitsandbytes missing or the device
    not supported by it. Runs a small quantized layer once on `device`."""
    check_quant_name(quant)
    if quant == "none":
        return
    bnb = _bitsandbytes()
    probe = nn.Linear(128, 64, bias=False, dtype=torch.float32)
    try:
        layer = quantized_linear(probe, quant, dtype, device)
        with torch.no_grad():
            out = layer(torch.ones(1, 128, dtype=dtype, device=device))
        if not torch.isfinite(out).all():
            raise RuntimeError("a test layer gave NaN or inf")
    except QuantError:
        raise
    except Exception as e:
        raise QuantError(
            f"--quant {quant} does not run on {device} ({dtype}) with bitsandbytes {bnb.__version__}: "
            f"{type(e).__name__}: {e}; use --quant none or int8, or a device bitsandbytes supports for "
            f"{quant} (CUDA, or a CPU build of bitsandbytes >= 0.49)"
        ) from None
