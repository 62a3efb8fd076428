"""A trainer's gradients (embeddings, final norm, LM head), and their recomputation by other trainers.

The trainer computes them in two parts per microbatch: the loss part (norm and head, from the last
stage's output) and the embedding part (from the first stage's input gradient). Both are kept in the
trainer's contribution log with the stage peers' signed reply receipts, so that another trainer can
recompute the trainer's gradient of a round with the same functions (`swarm.training.validation`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import torch
import torch.nn.functional as F

from swarm.training.trainable import TrainableParameters
from swarm.training.validation import (
    EMBED_MICROBATCH,
    HEAD_MICROBATCH,
    ContributionLog,
    Microbatch,
    check_reply,
    recompute_mean_gradient,
)


def loss_gradients(
    head, params: list[torch.Tensor], ids: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(sum over samples of the mean token cross-entropy, d(loss)/d(hidden), d(loss)/d(params))."""
    with torch.enable_grad():
        hidden = hidden.detach().requires_grad_(True)
        logits = head.logits(hidden)[:, :-1].float()
        losses = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
        ).view(ids.shape[0], -1)
        loss = losses.mean(dim=1).sum()
        grads = torch.autograd.grad(loss, [hidden, *params], allow_unused=True)
    param_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads[1:], strict=True)]
    return loss.detach(), grads[0], param_grads


def embedding_gradients(head, params: list[torch.Tensor], ids: torch.Tensor, grad: torch.Tensor) -> list:
    """d(loss)/d(params) through the embeddings, given d(loss)/d(embedded ids)."""
    with torch.enable_grad():
        embedded = head.embed(ids)
        (grad_embed,) = torch.autograd.grad(embedded, [head.embed_tokens.weight], grad_outputs=grad)
    return [grad_embed if p is head.embed_tokens.weight else torch.zeros_like(p) for p in params]


class TrainerRecomputer:
    """A trainer's side of gradient validation (`swarm.training.validation.Recomputer`): its log, the
    checks of another trainer's microbatches, and their recomputation with this trainer's weights.

    :param on_compute: runs a function on the trainer's compute thread (where its head lives)
    """

    def __init__(
        self,
        head,
        trainable: TrainableParameters,
        run_hash: str,
        num_stages: int,
        on_compute: Callable[..., Awaitable],
    ):
        self.head, self.trainable, self.run_hash, self.num_stages = head, trainable, run_hash, num_stages
        self.on_compute = on_compute
        self.log = ContributionLog()
        self.log.snapshot(trainable.step, trainable.params)

    def gradient_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in self.trainable.params]

    def check_microbatch(self, microbatch: Microbatch) -> None:
        """Token ids with the stage reply they were trained on, signed by the stage peer that sent it."""
        ids = microbatch.tensors.get("ids")
        if ids is None or ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[1] < 2:
            raise ValueError("a trainer's microbatch needs 2-D int64 token ids of 2 tokens or more")
        vocab = self.head.embed_tokens.weight.shape[0]
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError("token ids outside the vocabulary")
        if microbatch.kind == HEAD_MICROBATCH:
            tensor, stage, call = microbatch.tensors["hidden"], self.num_stages - 1, "forward"
        elif microbatch.kind == EMBED_MICROBATCH:
            tensor, stage, call = microbatch.tensors["grad"], 0, "backward"
        else:
            raise ValueError(f"a trainer's microbatch can't be a {microbatch.kind!r} one")
        hidden_size = self.head.embed_tokens.weight.shape[1]
        if tuple(tensor.shape) != (*ids.shape, hidden_size) or not tensor.is_floating_point():
            raise ValueError(f"a {call} reply of shape {tuple(tensor.shape)} for ids of {tuple(ids.shape)}")
        # the signer may have been banned since: the reply was still what the stage returned then
        check_reply(microbatch.receipts[0], self.run_hash, stage, call, tensor)

    async def recompute(
        self, microbatches: list[Microbatch], weights: dict[int, list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        return await self.on_compute(self.recompute_mean_gradient, microbatches, weights)

    def recompute_mean_gradient(
        self, microbatches: list[Microbatch], weights: dict[int, list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        """The mean gradient of another trainer's microbatches, each part with the weights of its step and
        the true labels (the ids shifted by one). Restores the weights."""
        params = self.trainable.params

        def gradients_of(microbatch: Microbatch) -> tuple[list[torch.Tensor], int]:
            ids = microbatch.tensors["ids"]
            if microbatch.kind == HEAD_MICROBATCH:  # the loss part: its samples count with the embeddings
                return loss_gradients(self.head, params, ids, microbatch.tensors["hidden"], ids[:, 1:])[2], 0
            return embedding_gradients(self.head, params, ids, microbatch.tensors["grad"]), ids.shape[0]

        return recompute_mean_gradient(params, microbatches, weights, gradients_of)
