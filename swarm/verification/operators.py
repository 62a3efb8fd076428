"""The operators of a block whose outputs a span's trace commits to, in commitment order.

Kept free of torch so that the CLI's `--fault perturb` can check names without loading it.
"""

# Part of the protocol: changing the order changes every commitment.
OPERATORS: tuple[str, ...] = (
    "input_layernorm",
    "q_proj",
    "k_proj",
    "v_proj",
    "attention",
    "o_proj",
    "attn_residual",
    "post_attention_layernorm",
    "gate_proj",
    "up_proj",
    "act_mul",
    "down_proj",
    "mlp_residual",
)
