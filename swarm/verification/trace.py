"""Every operator's output of a span's forward, in a fixed order, and the recomputation of any one of them.

transformers is not patched: the tensors are taken with torch hooks on each decoder layer's submodules.
A value transformers computes inline, between two modules (the attention itself, act(gate) * up, the
residual after attention), is taken as the input of the module that consumes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PretrainedConfig

from swarm.models.families import FULL, position_embeddings_by_type
from swarm.models.span import LlamaSpan, default_position_ids
from swarm.verification.operators import OPERATORS

TRACED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""Families whose decoder layer is the one the operators below describe: Llama's submodules, arithmetic
and residuals (sliding-window attention and q/k norms run inside the attention operator, so they change
nothing here). Gemma's extra norms sit between the same modules with other meanings, Phi-3 fuses its
projections and MoE blocks route tokens through experts: a trace of those would name the wrong tensors, and
a dispute could convict an honest node, so their nodes refuse to commit (a spot check then blames nobody)."""


class UntraceableModel(ValueError):
    """The model's family has no operator trace here yet."""


def check_traceable(config: PretrainedConfig) -> None:
    """Raise UntraceableModel unless `config`'s family is one of TRACED_FAMILIES."""
    if config.model_type not in TRACED_FAMILIES:
        raise UntraceableModel(
            f"verification traces {', '.join(TRACED_FAMILIES)} blocks; {config.model_type!r} blocks are not "
            "traced yet"
        )


BLOCK_INPUT = "block_input"
"""The block's input: the span's input for block 0, else the previous block's mlp_residual."""

OPERATOR_INPUTS: dict[str, tuple[str, ...]] = {
    "input_layernorm": (BLOCK_INPUT,),
    "q_proj": ("input_layernorm",),
    "k_proj": ("input_layernorm",),
    "v_proj": ("input_layernorm",),
    # plus the forward's public context: the attention mask and the positions (see ForwardContext)
    "attention": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("attention",),
    "attn_residual": (BLOCK_INPUT, "o_proj"),
    "post_attention_layernorm": ("attn_residual",),
    "gate_proj": ("post_attention_layernorm",),
    "up_proj": ("post_attention_layernorm",),
    "act_mul": ("gate_proj", "up_proj"),
    "down_proj": ("act_mul",),
    "mlp_residual": ("attn_residual", "down_proj"),
}
"""Which tensors each operator is computed from (names of earlier operators of the same block, or
BLOCK_INPUT). Weights are not listed: they come from the layer, whose weights are committed separately."""

# Where each operator's output is visible: (submodule path in the layer, True when it is that module's
# input rather than its output). "" is the layer itself.
_SITES: dict[str, tuple[str, bool]] = {
    "input_layernorm": ("input_layernorm", False),
    "q_proj": ("self_attn.q_proj", False),
    "k_proj": ("self_attn.k_proj", False),
    "v_proj": ("self_attn.v_proj", False),
    "attention": ("self_attn.o_proj", True),
    "o_proj": ("self_attn.o_proj", False),
    "attn_residual": ("post_attention_layernorm", True),
    "post_attention_layernorm": ("post_attention_layernorm", False),
    "gate_proj": ("mlp.gate_proj", False),
    "up_proj": ("mlp.up_proj", False),
    "act_mul": ("mlp.down_proj", True),
    "down_proj": ("mlp.down_proj", False),
    "mlp_residual": ("", False),
}

# operators that are one call of one submodule, so recomputing them is calling it again
_MODULE_OPERATORS = {op: path for op, (path, is_input) in _SITES.items() if not is_input and path}


def operator_ancestors(op: str) -> tuple[str, ...]:
    """Every operator of the same block that `op` depends on, directly or not, in OPERATORS order."""
    found: set[str] = set()
    pending = list(OPERATOR_INPUTS[op])
    while pending:
        name = pending.pop()
        if name != BLOCK_INPUT and name not in found:
            found.add(name)
            pending.extend(OPERATOR_INPUTS[name])
    return tuple(name for name in OPERATORS if name in found)


@dataclass(frozen=True)
class ForwardContext:
    """What a span's layers get besides hidden states; public, derived from the request alone."""

    attention_mask: torch.Tensor | None  # the mask as the layers see it (None when attention is causal)
    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]


def forward_context(
    span: LlamaSpan,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    layer_type: str = FULL,
) -> ForwardContext:
    """The context BlockSpan.forward gives its layers of `layer_type` (full or sliding-window attention; no
    KV cache). Only hidden_states' shape, dtype and device are used, so a placeholder of the right shape
    will do."""
    batch, seq_len, _ = hidden_states.shape
    if position_ids is None:
        position_ids = default_position_ids(attention_mask, batch, seq_len, 0, hidden_states.device)
    mask = span.masks(hidden_states, attention_mask, None, position_ids, [layer_type])[layer_type]
    # the span's own rotary module: its buffers follow the span's dtype, a fresh one's would not
    embeddings = position_embeddings_by_type(span.rotary_emb, hidden_states, position_ids, [layer_type])
    return ForwardContext(mask, position_ids, embeddings[layer_type])


@dataclass
class SpanTrace:
    """A span's input, each block's operator outputs in OPERATORS order, and the span's output."""

    input: torch.Tensor
    blocks: list[list[tuple[str, torch.Tensor]]]
    output: torch.Tensor

    def tensor(self, block: int, name: str) -> torch.Tensor:
        """Block `block`'s output of operator `name`, or its input when name is BLOCK_INPUT."""
        if name == BLOCK_INPUT:
            return self.input if block == 0 else self.blocks[block - 1][-1][1]
        return self.blocks[block][OPERATORS.index(name)][1]


def trace_span(
    span: LlamaSpan,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> SpanTrace:
    """Run span(hidden_states, ...) without gradients and keep a copy of every operator's output.
    Raises UntraceableModel for a family outside TRACED_FAMILIES."""
    check_traceable(span.config)
    records: list[dict[str, torch.Tensor]] = [{} for _ in span.layers]

    def record(block: int, op: str, tensor: torch.Tensor) -> None:
        if op in records[block]:
            raise RuntimeError(f"{op} ran twice in block {block}: the trace would not be well defined")
        records[block][op] = tensor.detach().clone()

    handles = []
    for block, layer in enumerate(span.layers):
        for op, (path, is_input) in _SITES.items():
            module = layer.get_submodule(path)
            if is_input:
                hook = _input_recorder(record, block, op)
                handles.append(module.register_forward_pre_hook(hook))
            else:
                hook = _output_recorder(record, block, op)
                handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            output = span(hidden_states, attention_mask=attention_mask, position_ids=position_ids)
    finally:
        for handle in handles:
            handle.remove()
    for block, found in enumerate(records):
        if missing := [op for op in OPERATORS if op not in found]:
            raise RuntimeError(f"block {block} never ran {missing}: the layer is not the one traced here")
    blocks = [[(op, found[op]) for op in OPERATORS] for found in records]
    return SpanTrace(input=hidden_states.detach().clone(), blocks=blocks, output=output)


def _input_recorder(record: Callable, block: int, op: str) -> Callable:
    def hook(module: nn.Module, args: tuple) -> None:
        record(block, op, args[0])

    return hook


def _output_recorder(record: Callable, block: int, op: str) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        record(block, op, output)

    return hook


def recompute_operator(
    layer: nn.Module, op: str, inputs: Mapping[str, torch.Tensor], context: ForwardContext | None = None
) -> torch.Tensor:
    """Compute one operator of `layer` (a LlamaDecoderLayer) from its inputs, as the layer's forward does.

    `inputs` maps each name in OPERATOR_INPUTS[op] to its tensor; weights come from the layer. Attention
    also needs the forward's context (mask and positions); no other operator does.
    """
    if op not in OPERATOR_INPUTS:
        raise ValueError(f"unknown operator {op!r}; expected one of {OPERATORS}")
    if missing := [name for name in OPERATOR_INPUTS[op] if name not in inputs]:
        raise ValueError(f"{op} needs {missing}")
    with torch.no_grad():
        if op in _MODULE_OPERATORS:
            (name,) = OPERATOR_INPUTS[op]
            return layer.get_submodule(_MODULE_OPERATORS[op])(inputs[name])
        if op == "attention":
            if context is None:
                raise ValueError("attention needs the forward's context (mask and positions)")
            return _recompute_attention(layer, inputs["q_proj"], inputs["k_proj"], inputs["v_proj"], context)
        # the rest mirror the inline arithmetic of LlamaDecoderLayer.forward and LlamaMLP.forward, operand
        # order included; the tests check them against traced values bit for bit
        if op == "attn_residual":
            return inputs[BLOCK_INPUT] + inputs["o_proj"]
        if op == "act_mul":
            return layer.mlp.act_fn(inputs["gate_proj"]) * inputs["up_proj"]
        if op == "mlp_residual":
            return inputs["attn_residual"] + inputs["down_proj"]
    raise AssertionError(f"no recomputation for {op}")


def _recompute_attention(
    layer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: ForwardContext
) -> torch.Tensor:
    """Run the layer's own attention (rotary, GQA, mask, kernel) on given q/k/v projections.

    Hooks swap the projections' results for q/k/v and catch what reaches o_proj, so the arithmetic is
    exactly transformers' and nothing of it is copied here.
    """
    attention = layer.self_attn
    caught: list[torch.Tensor] = []
    handles = [
        attention.q_proj.register_forward_hook(lambda module, args, output: q),
        attention.k_proj.register_forward_hook(lambda module, args, output: k),
        attention.v_proj.register_forward_hook(lambda module, args, output: v),
        attention.o_proj.register_forward_pre_hook(lambda module, args: caught.append(args[0])),
    ]
    try:
        # the projections of this placeholder are computed and thrown away: the hooks replace them
        placeholder = q.new_zeros(*q.shape[:-1], layer.hidden_size)
        attention(
            hidden_states=placeholder,
            attention_mask=context.attention_mask,
            position_ids=context.position_ids,
            position_embeddings=context.position_embeddings,
        )
    finally:
        for handle in handles:
            handle.remove()
    return caught[0]


def perturb_operator(span: LlamaSpan, block: int, op: str, ulps: int = 1) -> RemovableHandle:
    """Make span.layers[block] move every element of `op`'s output by `ulps` units in the last place.

    A fault injector: about the smallest lie a dishonest node can tell that still reaches the span's output
    (one element moved by one ulp is often rounded away by the next residual add), and a dispute must pin
    it to this block and operator. Everything downstream computes on the moved values. Remove the handle
    to undo.
    """
    if ulps == 0:
        raise ValueError("ulps must be non-zero")
    path, is_input = _SITES[op]
    module = span.layers[block].get_submodule(path)
    if is_input:

        def nudge_input(module: nn.Module, args: tuple) -> None:
            # in place, because transformers keeps other references to this tensor (attn_residual is
            # also the residual added after the MLP) and they must see the same lie
            with torch.no_grad():
                args[0].copy_(_nextafter(args[0], ulps))

        # prepend: a recorder registered before or after must see the moved values
        return module.register_forward_pre_hook(nudge_input, prepend=True)

    def nudge_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # the moved values, with the gradient of the true ones, so training through the fault still works
        return _nextafter(output.detach(), ulps) + (output - output.detach())

    return module.register_forward_hook(nudge_output, prepend=True)


def _nextafter(value: torch.Tensor, ulps: int) -> torch.Tensor:
    target = torch.full_like(value, math.inf if ulps > 0 else -math.inf)
    for _ in range(abs(ulps)):
        value = torch.nextafter(value, target)
    return value
