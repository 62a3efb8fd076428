"""Prompt-tuned clients of the tiny swarm and their reference: transformers' model with the same prompts."""

import torch

from swarm.client import DistributedModelForCausalLM

PRE_SEQ_LEN = 3


def local_logits(local_model, input_ids, prompts, deep_prompts=None, attention_mask=None):
    """The reference: transformers' own model with the prompts prepended and, for deep prompts, added
    to each decoder layer's input by forward pre-hooks."""
    batch = input_ids.shape[0]
    embeds = local_model.model.embed_tokens(input_ids)
    inputs = torch.cat([prompts.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
    hooks = []
    if deep_prompts is not None:
        for index, layer in enumerate(local_model.model.layers):

            def add_prompt(module, args, kwargs, index=index):
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                hidden = torch.cat(
                    [hidden[:, :PRE_SEQ_LEN] + deep_prompts[index], hidden[:, PRE_SEQ_LEN:]], 1
                )
                if "hidden_states" in kwargs:
                    kwargs["hidden_states"] = hidden
                    return args, kwargs
                return (hidden, *args[1:]), kwargs

            hooks.append(layer.register_forward_pre_hook(add_prompt, with_kwargs=True))
    try:
        mask = None
        if attention_mask is not None:
            mask = torch.cat([attention_mask.new_ones(batch, PRE_SEQ_LEN), attention_mask], dim=1)
        return local_model(inputs_embeds=inputs, attention_mask=mask).logits[:, PRE_SEQ_LEN:]
    finally:
        for hook in hooks:
            hook.remove()


def make_client(tiny_model, swarm, mode, seed=0, **config):
    torch.manual_seed(seed)
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_model, swarm.initial_peers, tuning_mode=mode, pre_seq_len=PRE_SEQ_LEN, max_retries=5, **config
    )
    if mode == "deep_ptune":  # start from non-zero deep prompts so their gradients matter
        with torch.no_grad():
            model.intermediate_prompt_embeddings.weight.normal_(std=0.5)
    return model


def deep_prompts_of(model):
    weight = model.intermediate_prompt_embeddings.weight
    return weight.view(PRE_SEQ_LEN, model.num_blocks, -1).permute(1, 0, 2)
