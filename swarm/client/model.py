"""DistributedModelForCausalLM: a Hugging Face-style model whose blocks run on the swarm."""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING

import torch
from hivemind.p2p import P2P
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from swarm.client.autograd import RemoteBlocksFunction, SwarmBlocks
from swarm.client.bans import BanList
from swarm.client.config import ClientConfig
from swarm.client.generation import DEFAULT_MAX_NEW_TOKENS, generate, positions_from_mask
from swarm.client.inference import InferenceSession, SessionPrompts
from swarm.client.prompts_file import SavedPrompts, load_prompts, save_prompts
from swarm.client.routing import RemoteSpan
from swarm.client.session_cache import SessionCache
from swarm.client.swarm_client import SwarmClient
from swarm.models.checkpoint import Checkpoint, all_block_hashes, resolve_checkpoint
from swarm.models.head import load_client_head, load_generation_config

if TYPE_CHECKING:
    from swarm.models.span import LlamaSpan


# what the swarm's own decoding loop does exactly as transformers would; anything else goes to transformers'
SWARM_LOOP_SETTINGS = frozenset(
    {"do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "max_length", "eos_token_id"}
    | {"pad_token_id", "bos_token_id", "use_cache", "transformers_version", "_from_model_config"}
)
DECODING_LOOPS = ("auto", "swarm", "transformers")


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    """A transformers causal LM whose embeddings and LM head run here and whose transformer blocks run on
    nodes found through the DHT. `generate()` is transformers' own (every decoding strategy, logits
    processor and pipeline), over an inference session whose KV cache lives on the nodes."""

    _supports_sdpa = True  # attention runs on the nodes; nothing here to dispatch
    _supports_attention_backend = True

    def __init__(
        self,
        checkpoint: Checkpoint,
        config: ClientConfig,
        dtype: torch.dtype = torch.float32,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        device: str | torch.device = "cpu",
        swarm_key: str | os.PathLike | None = None,
    ):
        # transformers may annotate its config (attention implementation): keep the checkpoint's untouched
        super().__init__(copy.deepcopy(checkpoint.config))
        # checked before the DHT starts, so a bad argument leaves no process behind
        if tuning_mode not in (None, "ptune", "deep_ptune"):
            raise ValueError(f"tuning_mode must be None, 'ptune' or 'deep_ptune', got {tuning_mode!r}")
        if tuning_mode and pre_seq_len < 1:
            raise ValueError("prompt tuning needs pre_seq_len >= 1")
        if config.verify_rate > 0:  # spot checks settle disagreements on an operator trace of the blocks
            from swarm.verification.trace import check_traceable

            check_traceable(checkpoint.config)
        self.checkpoint = checkpoint
        # the head computes on `device`; what crosses the network, and the session's bookkeeping, is on CPU
        self.head = load_client_head(checkpoint, dtype=dtype).to(device)
        self.generation_config = load_generation_config(
            checkpoint.path
        ) or GenerationConfig.from_model_config(checkpoint.config)
        self.num_blocks = checkpoint.num_blocks
        self.swarm = SwarmClient(
            checkpoint.name,
            self.num_blocks,
            config,
            self._local_block_hashes,
            referee_span=self.local_span,
            swarm_key=swarm_key,
        )
        self.blocks = SwarmBlocks(self.swarm)
        self.tuning_mode, self.pre_seq_len = tuning_mode, pre_seq_len
        if tuning_mode:
            hidden_size = self.config.hidden_size
            self.prompt_embeddings = torch.nn.Embedding(pre_seq_len, hidden_size, dtype=dtype, device=device)
            torch.nn.init.normal_(self.prompt_embeddings.weight, std=self.config.initializer_range)
            if tuning_mode == "deep_ptune":
                self.intermediate_prompt_embeddings = torch.nn.Embedding(
                    pre_seq_len, self.num_blocks * hidden_size, dtype=dtype, device=device
                )
                torch.nn.init.zeros_(self.intermediate_prompt_embeddings.weight)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        initial_peers: list[str] | tuple[str, ...] = (),
        *,
        model_name: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.float32,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        prompts: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        swarm_key: str | os.PathLike | None = None,
        **config_kwargs,
    ) -> DistributedModelForCausalLM:
        """Load the client-side parts of a model (same names and paths as `swarm node`) and join the swarm.

        `prompts`: a file written by `save_prompts`; its tuning mode and prompt length are used (they must
        agree with `tuning_mode` and `pre_seq_len` when those are given too). `swarm_key`: a private
        swarm's key file (default: $SWARM_KEY_FILE; neither: a public swarm).
        """
        checkpoint = resolve_checkpoint(name_or_path, cache_dir, model_name)
        saved = None
        if prompts is not None:
            saved = load_prompts(prompts)
            tuning_mode, pre_seq_len = _agree_with_saved(saved, prompts, tuning_mode, pre_seq_len)
            _check_saved_widths(saved, prompts, checkpoint.config.hidden_size, checkpoint.num_blocks)
        config = ClientConfig(initial_peers=list(initial_peers), **config_kwargs)
        model = cls(
            checkpoint,
            config,
            dtype=dtype,
            tuning_mode=tuning_mode,
            pre_seq_len=pre_seq_len,
            device=device,
            swarm_key=swarm_key,
        )
        if saved is not None:
            try:
                model._load_prompt_tensors(saved.tensors, prompts)
            except BaseException:
                model.close()
                raise
        return model

    # ---- trained prompts ----------------------------------------------------------------------------------

    def save_prompts(self, path: str | os.PathLike) -> None:
        """Write only the trained prompts (safetensors, with the tuning mode) to `path`."""
        if not self.tuning_mode:
            raise ValueError("this model has no trained prompts (tuning_mode is None)")
        save_prompts(path, self.tuning_mode, self._prompt_tensors())

    def _prompt_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"prompt_embeddings": self.prompt_embeddings.weight}
        if self.tuning_mode == "deep_ptune":
            tensors["intermediate_prompt_embeddings"] = self.intermediate_prompt_embeddings.weight
        return tensors

    def _load_prompt_tensors(self, tensors: dict[str, torch.Tensor], source) -> None:
        own = self._prompt_tensors()
        if set(tensors) != set(own):
            raise ValueError(
                f"{source} holds {sorted(tensors)}, a {self.tuning_mode} model needs {sorted(own)}"
            )
        for name, weight in own.items():
            if tensors[name].shape != weight.shape:
                raise ValueError(
                    f"{source}: {name} has shape {tuple(tensors[name].shape)}, this model's is "
                    f"{tuple(weight.shape)} (another model or prompt length?)"
                )
            with torch.no_grad():
                weight.copy_(tensors[name])

    def session_prompts(self) -> SessionPrompts | None:
        """The trained prompts as they are now, for an inference session (None without prompt tuning)."""
        if not self.tuning_mode:
            return None
        embeddings = self.prompt_embeddings.weight.detach().cpu()
        deep = None
        if self.tuning_mode == "deep_ptune":
            weight = self.intermediate_prompt_embeddings.weight.detach().cpu()  # (prefix, blocks * hidden)
            deep = weight.view(self.pre_seq_len, self.num_blocks, -1).permute(1, 0, 2).contiguous()
        return SessionPrompts(embeddings, deep)

    # ---- the swarm (delegated to the SwarmClient) -------------------------------------------------------

    def _local_block_hashes(self) -> list[str] | None:
        """Hashes of this checkpoint's blocks when it holds them (it may hold only the head)."""
        return all_block_hashes(self.checkpoint) if self.checkpoint.block_tensor_names(0) else None

    def local_span(self, start: int, end: int) -> LlamaSpan | None:
        """Blocks [start, end) of this checkpoint in fp32, to referee a dispute (None without blocks)."""
        if not self.checkpoint.block_tensor_names(start):
            return None
        from swarm.models.span import load_span  # the span code loads only when there is a dispute

        return load_span(self.checkpoint, start, end, dtype=torch.float32)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the local embeddings and head (what `from_pretrained(dtype=...)` asked for)."""
        return self.head.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the embeddings and head compute (what `from_pretrained(device=...)` asked for)."""
        return self.head.embed_tokens.weight.device

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.head.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head.lm_head

    @property
    def client_config(self) -> ClientConfig:
        return self.swarm.config

    @property
    def p2p(self) -> P2P:
        return self.swarm.p2p

    @property
    def bans(self) -> BanList:
        return self.swarm.bans

    @property
    def last_route(self) -> list[RemoteSpan]:
        """The route the first chunk of the last forward pass took."""
        return self.blocks.last_route

    def find_route(self, start: int = 0, end: int | None = None, mode: str = "inference") -> list[RemoteSpan]:
        """A chain of nodes covering blocks [start, end) (see SwarmClient.find_route)."""
        return self.swarm.find_route(start, end, mode)

    def run_async(self, coro, timeout: float | None = None):
        """Run a coroutine on the client's event loop thread and wait for its result."""
        return self.swarm.run_async(coro, timeout)

    # ---- forward ------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: SessionCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits for `input_ids` (or `inputs_embeds`), as transformers' LlamaForCausalLM computes them
        (positions 0..n-1); with `labels`, also its loss (the next token's cross-entropy, -100 ignored).

        With prompt tuning, the trainable prompts go before the tokens; logits are returned for the
        tokens only, and gradients flow back to the prompts through the swarm.

        With a `SessionCache` (what `generate()` passes): only the new tokens, through its inference
        session; `attention_mask` then covers every token of the session.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if cache is not None:
            return self._step_session(cache, input_ids, inputs_embeds, attention_mask)
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if inputs_embeds is not None and (
            inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size
        ):
            expected = f"(batch, seq, {self.config.hidden_size})"
            raise ValueError(f"inputs_embeds must be {expected}, got {tuple(inputs_embeds.shape)}")
        batch, seq_len = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        if labels is not None and tuple(labels.shape) != (batch, seq_len):
            raise ValueError(f"labels must have shape {(batch, seq_len)}, got {tuple(labels.shape)}")
        prefix = self.pre_seq_len if self.tuning_mode else 0
        if attention_mask is not None and prefix:
            attention_mask = torch.cat([attention_mask.new_ones(batch, prefix), attention_mask], dim=1)
        if position_ids is None:
            position_ids = torch.arange(prefix + seq_len).unsqueeze(0).expand(batch, -1)
        elif prefix:
            position_ids = torch.cat([torch.arange(prefix).expand(batch, -1), position_ids + prefix], dim=1)
        if attention_mask is not None:
            attention_mask = attention_mask.cpu()
        position_ids = position_ids.cpu()
        if inputs_embeds is not None:
            hidden = inputs_embeds.to(self.device, self.dtype)
        else:
            hidden = self.head.embed(input_ids.to(self.device))
        deep_prompts = None
        if self.tuning_mode:
            prompts = self.prompt_embeddings.weight.unsqueeze(0).expand(batch, -1, -1)
            hidden = torch.cat([prompts.to(hidden.dtype), hidden], dim=1)
            if self.tuning_mode == "deep_ptune":
                weight = self.intermediate_prompt_embeddings.weight  # (prefix, blocks * hidden)
                deep_prompts = weight.view(prefix, self.num_blocks, -1).permute(1, 0, 2).unsqueeze(1)
        needs_grad = hidden.requires_grad or (deep_prompts is not None and deep_prompts.requires_grad)
        if torch.is_grad_enabled() and needs_grad:
            prompts_arg = deep_prompts if deep_prompts is not None else hidden.new_zeros(0)
            hidden = RemoteBlocksFunction.apply(
                hidden, prompts_arg, self.blocks, attention_mask, position_ids
            )
        else:
            with torch.no_grad():
                hidden, _ = self.blocks.forward(
                    hidden.detach(),
                    None if deep_prompts is None else deep_prompts.detach(),
                    attention_mask,
                    position_ids,
                )
        logits = self.head.logits(hidden[:, prefix:])
        loss = None
        if labels is not None:
            from transformers.loss.loss_utils import ForCausalLMLoss  # 0.3 s of imports: only when asked

            loss = ForCausalLMLoss(logits, labels.to(logits.device), vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _step_session(
        self,
        cache: SessionCache,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> CausalLMOutputWithPast:
        """One step of transformers' decoding loop: the new tokens through the cache's session."""
        if not isinstance(cache, SessionCache):
            raise TypeError(
                f"the swarm keeps its cache on the nodes: expected a SessionCache, got {type(cache)}"
            )
        hidden = self.head.embed(input_ids.to(self.device)) if inputs_embeds is None else inputs_embeds
        positions, mask = None, None
        if attention_mask is not None:
            mask = attention_mask.cpu()
            positions = positions_from_mask(mask)[:, -hidden.shape[1] :]
            cache.seen_mask = mask
            mask = mask if bool((mask == 0).any()) else None  # a full mask is the default
        hypo_ids, cache.pending_reorder = cache.pending_reorder, None
        out = cache.session.step(hidden, position_ids=positions, attention_mask=mask, hypo_ids=hypo_ids)
        return CausalLMOutputWithPast(logits=self.head.logits(out.to(self.device)).float(), cache=cache)

    # ---- generation ---------------------------------------------------------------------------------------

    def inference_session(self, max_length: int) -> InferenceSession:
        """A session with a KV cache for up to `max_length` tokens on every node of its route; with prompt
        tuning, the prompts as they are now go in front of the tokens (the caches hold them too)."""
        return InferenceSession(self.swarm, max_length, self.session_prompts())

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        session: InferenceSession | None = None,
        streamer=None,
        generator: torch.Generator | None = None,
        decoding_loop: str = "auto",
        **kwargs,
    ) -> torch.Tensor:
        """transformers' `generate()` over an inference session: every argument it takes, with the
        checkpoint's generation config as defaults. Returns the whole sequence (prompt and new tokens).

        `session`: continue that session (its tokens so far come first; `inputs` may then be None).
        `decoding_loop`: "auto" runs the swarm's own loop when the settings are ones it covers (greedy or
        sampling with temperature, top-k, top-p; EOS; `generator`; a `logits_processor` list), which gives
        the same tokens, is lighter per token and runs spot checks beside the next steps instead of waiting
        for them; anything else (beam search, repetition penalty, stop strings...) goes to transformers' loop.
        "swarm" or "transformers" force one. Without max_new_tokens or max_length, 20 new tokens.
        """
        if decoding_loop not in DECODING_LOOPS:
            raise ValueError(f"decoding_loop must be one of {DECODING_LOOPS}, got {decoding_loop!r}")
        config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        other_arguments = config.update(**kwargs)  # not generation settings: processors, a tokenizer...
        logits_processor = other_arguments.pop("logits_processor", None)
        beyond_swarm_loop = _settings_beyond_swarm_loop(config) + sorted(other_arguments)
        use_swarm_loop = decoding_loop == "swarm" or (decoding_loop == "auto" and not beyond_swarm_loop)
        if use_swarm_loop:
            if beyond_swarm_loop:
                raise ValueError(f"the swarm's own decoding loop cannot apply {beyond_swarm_loop}")
            return generate(
                self,
                input_ids,
                max_new_tokens=config.max_new_tokens,
                max_length=config.max_length,
                do_sample=bool(config.do_sample),
                temperature=config.temperature,
                top_k=config.top_k,
                top_p=config.top_p,
                attention_mask=attention_mask,
                eos_token_id=config.eos_token_id,
                pad_token_id=config.pad_token_id,
                session=session,
                streamer=streamer,
                generator=generator,
                logits_processor=logits_processor,
            )
        if logits_processor is not None:
            other_arguments["logits_processor"] = logits_processor
        if generator is not None:
            raise ValueError(
                "generator= is for the swarm's own decoding loop; transformers' samples from torch's global "
                "generator (seed it with torch.manual_seed)"
            )
        if config.max_new_tokens is None and config.max_length is None:
            config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        return self._generate_with_transformers(
            input_ids, attention_mask, config, session, streamer, other_arguments
        )

    def _generate_with_transformers(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        config: GenerationConfig,
        session: InferenceSession | None,
        streamer,
        other_arguments: dict,
    ) -> torch.Tensor:
        """transformers' decoding loop over `session`, or over a session sized for this call."""
        if input_ids is None and (session is None or session.output_ids is None):
            raise ValueError("generate() needs input_ids unless it continues a session that has tokens")
        if session is not None and session.output_ids is not None:
            if (config.num_beams or 1) > 1 or (config.num_return_sequences or 1) > 1:
                raise ValueError("a session continues one row per sequence: no beams or extra sequences")
            # transformers feeds what the session's cache has not seen: its last token and the new ones
            history, history_mask = session.output_ids, session.attention_mask
            if input_ids is not None:
                input_ids = input_ids.cpu()
                mask = attention_mask.cpu() if attention_mask is not None else torch.ones_like(input_ids)
                history = torch.cat([history, input_ids], dim=1)
                history_mask = torch.cat([history_mask, mask.to(history_mask.dtype)], dim=1)
            input_ids, attention_mask = history, history_mask
        prompt_len = input_ids.shape[1]
        max_new_tokens = config.max_new_tokens
        max_length = prompt_len + max_new_tokens if max_new_tokens is not None else config.max_length
        if config.prompt_lookup_num_tokens or other_arguments.get("assistant_model") is not None:
            # drafts are verified in one step that may run past the end before they are cut back
            max_length += max(config.prompt_lookup_num_tokens or 0, config.num_assistant_tokens or 20) + 1
        own_session = session is None
        if own_session:
            session = self.inference_session(max_length=max_length)
        try:
            cache = SessionCache(session)
            out = GenerationMixin.generate(
                self,
                input_ids,
                generation_config=config,
                attention_mask=attention_mask,
                cache=cache,
                streamer=streamer,
                **other_arguments,
            )
            if not own_session:
                _record_session_tokens(session, out, cache)
            return out
        finally:
            if own_session:
                session.close()

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the swarm: stop the P2P replica, the DHT process and the event loop."""
        self.swarm.close()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _settings_beyond_swarm_loop(config: GenerationConfig) -> list[str]:
    """The generation settings that differ from transformers' defaults and that the swarm's own loop does
    not apply (a setting left off, False or None, counts as its default)."""
    defaults = GenerationConfig()
    return sorted(
        key
        for key in config.to_diff_dict()
        if key not in SWARM_LOOP_SETTINGS and (getattr(config, key, None) or getattr(defaults, key, None))
    )


def _record_session_tokens(session: InferenceSession, sequences: torch.Tensor, cache: SessionCache) -> None:
    """After transformers' loop over a caller's session: the tokens so far as the session keeps them (the
    last one is returned but not yet fed), with the mask its nodes saw, so that the session continues."""
    if not torch.is_tensor(sequences) or session.batch_size not in (None, sequences.shape[0]):
        return
    sequences = sequences.cpu()
    seen = cache.seen_mask if cache.seen_mask is not None else session.attention_mask
    if seen is None:
        seen = torch.ones(sequences.shape[0], 0, dtype=torch.long)
    pending = sequences.shape[1] - seen.shape[1]
    session.output_ids = sequences.clone()
    session.attention_mask = torch.cat([seen, seen.new_ones(seen.shape[0], pending)], dim=1)


def _agree_with_saved(
    saved: SavedPrompts, source, tuning_mode: str | None, pre_seq_len: int
) -> tuple[str, int]:
    """The tuning mode and prompt length of saved prompts, checked against those asked for (if any)."""
    if tuning_mode not in (None, saved.tuning_mode):
        raise ValueError(f"{source} holds {saved.tuning_mode} prompts, not {tuning_mode}")
    if pre_seq_len not in (0, saved.pre_seq_len):
        raise ValueError(f"{source} holds {saved.pre_seq_len} prompt positions, not {pre_seq_len}")
    return saved.tuning_mode, saved.pre_seq_len


def _check_saved_widths(saved: SavedPrompts, source, hidden_size: int, num_blocks: int) -> None:
    """Saved prompts must be of this model's size (checked before joining the swarm)."""
    widths = {"prompt_embeddings": hidden_size, "intermediate_prompt_embeddings": hidden_size * num_blocks}
    for name, tensor in saved.tensors.items():
        if tensor.shape[1] != widths[name]:
            raise ValueError(
                f"{source}: {name} has width {tensor.shape[1]}, this model's is {widths[name]} "
                "(prompts trained for another model?)"
            )
