"""A transformers `Cache` backed by a swarm inference session, so that transformers' own `generate()` drives
the swarm: every decoding strategy and logits processor it offers (beam search included) runs over it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache

if TYPE_CHECKING:
    from swarm.client.inference import InferenceSession


class SessionCache(Cache):
    """A transformers Cache whose keys and values live on the swarm's nodes, in an inference session.

    Beam search's `reorder_cache` is passed on with the next step as `hypo_ids`: every node reorders its
    rows, and the session reorders the history it would replay on a replacement node. `crop` (assisted and
    prompt-lookup decoding) truncates the session: the nodes overwrite the dropped positions next step.
    """

    def __init__(self, session: InferenceSession):
        super().__init__(layers=[])
        self.session = session
        self.pending_reorder: torch.Tensor | None = None
        self.seen_mask: torch.Tensor | None = None  # the attention mask of every token the nodes have seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.num_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        beam_idx = beam_idx.cpu()
        pending = self.pending_reorder
        self.pending_reorder = beam_idx if pending is None else pending[beam_idx]

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return True

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` tokens (or keep the first `tokens_to_remove`, the older
        convention): speculative decoding drops the drafted tokens the model rejected."""
        keep = self.session.num_tokens + tokens_to_remove if tokens_to_remove <= 0 else tokens_to_remove
        self.session.truncate(max(0, keep))
        if self.seen_mask is not None:
            self.seen_mask = self.seen_mask[:, : max(0, keep)]
