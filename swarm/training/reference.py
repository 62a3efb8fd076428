"""Plain local training with a run's optimizer settings: what swarm training is compared against."""

from __future__ import annotations

import torch

from swarm.training.run import OptimizerSettings


def local_optimizer(model: torch.nn.Module, settings: OptimizerSettings) -> torch.optim.AdamW:
    """AdamW over the whole model with the run's hyperparameters (as every stage and trainer uses)."""
    return torch.optim.AdamW(
        model.parameters(),
        lr=settings.lr,
        betas=tuple(settings.betas),
        eps=settings.eps,
        weight_decay=settings.weight_decay,
    )


def local_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, clip_grad_norm: float
) -> float:
    """One step on `batch` (mean token cross-entropy, clipped like the run when clip_grad_norm > 0)."""
    loss = model(input_ids=batch, labels=batch).loss
    optimizer.zero_grad()
    loss.backward()
    if clip_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    optimizer.step()
    return float(loss.detach())
