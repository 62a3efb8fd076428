"""Parameters that sum per-sample gradients and step with AdamW: a stage's blocks or a trainer's head.

Gradients are kept as sums over samples (not means), so microbatches of any size and from any number of
trainers add up; a step divides by the samples behind it, averages with the group weighted by samples,
clips and calls AdamW. All methods run on one thread (the owner's compute thread), so a forward or
backward never sees half-updated weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from swarm.training.state import TrainState, state_hash

FINGERPRINT_SEED = 20261124
FINGERPRINT_PROJECTIONS = 2
FINGERPRINT_TOLERANCE = 1e-4  # relative to the parameters' RMS
GRAD_NORM_EMA = 0.5  # weight of the newest step in `recent_grad_norm`


def fingerprints_agree(a: list[float], b: list[float]) -> bool:
    """Whether two members hold the same weights up to all-reduce rounding (see `_fingerprint`)."""
    if not a or not b or len(a) != len(b):
        return not a and not b
    tolerance = FINGERPRINT_TOLERANCE * max(a[-1], b[-1], 1e-12)
    return all(abs(x - y) <= tolerance for x, y in zip(a[:-1], b[:-1], strict=True))


class TrainableParameters:
    """Named parameters with an AdamW optimizer, gradient sums, the sample count and the step."""

    def __init__(
        self,
        named_parameters: Sequence[tuple[str, torch.nn.Parameter]],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        clip_grad_norm: float,
    ):
        unique: dict[int, tuple[str, torch.nn.Parameter]] = {}
        for name, param in named_parameters:
            unique.setdefault(id(param), (name, param))  # tied weights are one parameter
        self.names = [name for name, _ in unique.values()]
        self.params = [param.requires_grad_(True) for _, param in unique.values()]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
        )
        self.clip_grad_norm = clip_grad_norm
        self.grad_sums = [torch.zeros_like(p) for p in self.params]
        self.samples = 0  # behind grad_sums
        self.stepping_samples = 0  # taken for the step in progress, not applied yet
        self.step = 0
        self.last_grad_norm = 0.0
        self.recent_grad_norm = 0.0  # EMA over steps of the applied gradients' norm (before clipping)
        self.base_lr = lr
        self.boosted_steps = 0  # steps left at a raised learning rate (see boost_lr)
        self._patterns: list[torch.Tensor] | None = None
        self._refresh_identity()

    def _refresh_identity(self) -> None:
        self.params_hash = self._hash_params()
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> list[float]:
        """Two projections of all parameters onto fixed random +-1 patterns, and the parameters' RMS.

        Members of a group apply the same averaged gradients, but an all-reduce returns each of them its
        own rounding of the average, so their weights drift apart by a few ulps and exact hashes differ.
        The projections differ by about that much; a member that stepped alone differs by about the
        learning rate, which `fingerprints_agree` tells apart.
        """
        if self._patterns is None:
            generator = torch.Generator().manual_seed(FINGERPRINT_SEED)
            self._patterns = [
                torch.randint(
                    0, 2, (FINGERPRINT_PROJECTIONS, p.numel()), generator=generator, dtype=torch.int8
                )
                * 2
                - 1
                for p in self.params
            ]
        projections = torch.zeros(FINGERPRINT_PROJECTIONS, dtype=torch.float64)
        squares, count = 0.0, 0
        for param, pattern in zip(self.params, self._patterns, strict=True):
            flat = param.detach().reshape(-1).double().cpu()
            projections += (pattern.double() * flat).sum(dim=1)
            squares += float((flat * flat).sum())
            count += flat.numel()
        scale = max(count, 1) ** 0.5
        return [float(v) / scale for v in projections] + [(squares / max(count, 1)) ** 0.5]

    @property
    def announced_samples(self) -> int:
        """Samples toward the next step, counting those of a step in progress (the group sees them)."""
        return self.samples + self.stepping_samples

    def _hash_params(self) -> str:
        tensors = {name: param.detach() for name, param in zip(self.names, self.params, strict=True)}
        return state_hash(self.step, tensors)

    def accumulate(self, grads: Sequence[torch.Tensor], samples: int) -> None:
        """Add gradients of a loss summed over `samples` samples; refuses non-finite ones (nothing added)."""
        if not all(torch.isfinite(g).all() for g in grads):
            raise ValueError("gradients are not finite")
        for total, grad in zip(self.grad_sums, grads, strict=True):
            total.add_(grad)
        self.samples += samples

    def take_mean_gradients(self) -> tuple[list[torch.Tensor], int]:
        """The mean per-sample gradients so far and their sample count; starts a new accumulation."""
        samples = self.samples
        grads = [total / max(samples, 1) for total in self.grad_sums]
        self.grad_sums = [torch.zeros_like(p) for p in self.params]
        self.samples = 0
        self.stepping_samples = samples
        return grads, samples

    def apply(self, grads: Sequence[torch.Tensor]) -> None:
        """One optimizer step with these (already averaged) gradients."""
        for param, grad in zip(self.params, grads, strict=True):
            param.grad = grad.to(param.device, param.dtype).clone()
        if self.clip_grad_norm > 0:
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm))
        else:
            norms = [param.grad.detach().norm() for param in self.params]
            self.last_grad_norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        if math.isfinite(self.last_grad_norm):
            self.recent_grad_norm = (
                self.last_grad_norm
                if not self.recent_grad_norm
                else (1 - GRAD_NORM_EMA) * self.recent_grad_norm + GRAD_NORM_EMA * self.last_grad_norm
            )
        self.optimizer.step()
        for param in self.params:
            param.grad = None
        self.step += 1
        self.stepping_samples = 0
        if self.boosted_steps:
            self.boosted_steps -= 1
            if not self.boosted_steps:
                self._set_lr(self.base_lr)
        self._refresh_identity()

    def boost_lr(self, factor: float, steps: int) -> None:
        """Take the next `steps` steps at `factor` x the run's learning rate (a rebuilt stage catching up)."""
        self.boosted_steps = steps
        self._set_lr(self.base_lr * factor if steps else self.base_lr)

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ---- state -------------------------------------------------------------------------------------------

    def state(self, with_optimizer: bool) -> TrainState:
        """Copies of the parameters (and AdamW moments and per-parameter step counts)."""
        tensors = {
            name: param.detach().clone().cpu() for name, param in zip(self.names, self.params, strict=True)
        }
        if with_optimizer:
            for name, param in zip(self.names, self.params, strict=True):
                moments = self.optimizer.state.get(param)
                if not moments:
                    continue
                tensors[f"optimizer.exp_avg.{name}"] = moments["exp_avg"].detach().clone().cpu()
                tensors[f"optimizer.exp_avg_sq.{name}"] = moments["exp_avg_sq"].detach().clone().cpu()
                tensors[f"optimizer.step.{name}"] = torch.as_tensor(moments["step"]).detach().clone().cpu()
        return TrainState(self.step, tensors)

    def load(self, state: TrainState) -> None:
        """Take a donor's parameters, optimizer moments and step; raise if any name or shape differs."""
        missing = [name for name in self.names if name not in state.tensors]
        if missing:
            raise ValueError(f"the state lacks parameters {missing[:5]}")
        with torch.no_grad():
            for name, param in zip(self.names, self.params, strict=True):
                tensor = state.tensors[name]
                if tensor.shape != param.shape:
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(param.shape)}")
                param.copy_(tensor)
        self.optimizer.state.clear()
        for name, param in zip(self.names, self.params, strict=True):
            if f"optimizer.exp_avg.{name}" in state.tensors:
                self.optimizer.state[param] = {
                    "step": state.tensors[f"optimizer.step.{name}"].clone().float(),
                    "exp_avg": state.tensors[f"optimizer.exp_avg.{name}"].clone().to(param.device),
                    "exp_avg_sq": state.tensors[f"optimizer.exp_avg_sq.{name}"].clone().to(param.device),
                }
        self.step = state.step
        self.grad_sums = [torch.zeros_like(p) for p in self.params]
        self.samples = self.stepping_samples = 0
        self._refresh_identity()
