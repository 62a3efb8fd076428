"""The model-family registry: one entry per model_type, one error for the rest, and the installed
transformers' layer interface (a renamed keyword fails the suite instead of warning)."""

import json

import pytest
import torch

from swarm.models.checkpoint import load_config
from swarm.models.families import (
    FULL,
    SLIDING,
    SUPPORTED_MODEL_TYPES,
    UnsupportedModelError,
    cache_argument,
    get_family,
)
from swarm.models.span import BlockSpan
from swarm.models.tiny import tiny_family_config, tiny_llama_config

EXPECTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen3_moe")


def test_registry_holds_the_tested_families_and_resolves_their_classes():
    assert set(SUPPORTED_MODEL_TYPES) == set(EXPECTED)
    for model_type in SUPPORTED_MODEL_TYPES:
        family = get_family(model_type)
        for cls in (family.decoder_layer, family.rotary_embedding, family.norm):
            assert issubclass(cls, torch.nn.Module)
        # the installed transformers (5.2x) takes the KV cache as `cache`
        assert cache_argument(family.decoder_layer) == "cache"


def test_unsupported_family_gets_one_error_naming_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    with pytest.raises(UnsupportedModelError) as error:
        load_config(tmp_path)
    message = str(error.value)
    assert "'bloom'" in message and all(name in message for name in SUPPORTED_MODEL_TYPES)


def test_layer_types_follow_each_familys_config():
    gemma = tiny_family_config("gemma2", num_blocks=4)
    assert get_family("gemma2").layer_types(gemma) == [SLIDING, FULL, SLIDING, FULL]
    mistral = tiny_family_config("mistral", num_blocks=2)
    assert get_family("mistral").layer_types(mistral) == [SLIDING, SLIDING]
    assert get_family("llama").layer_types(tiny_llama_config(num_blocks=2)) == [FULL, FULL]
    span = BlockSpan(tiny_family_config("gemma3_text", num_blocks=4), 1, 3)
    assert span.layer_types == [FULL, SLIDING] and span.view(1, 2).layer_types == [SLIDING]


def test_embedding_scale_and_logit_softcap_come_from_the_family():
    gemma, llama = tiny_family_config("gemma2"), tiny_llama_config()
    assert get_family("gemma2").embed_scale(gemma) == pytest.approx(gemma.hidden_size**0.5)
    assert get_family("gemma2").logit_softcap(gemma) == 30.0
    assert get_family("llama").embed_scale(llama) == 1.0 and get_family("llama").logit_softcap(llama) is None


def test_renamed_transformers_keyword_fails_the_suite():
    """tests/conftest.py makes transformers' deprecated-keyword warnings errors: the old name raises."""
    span = BlockSpan(tiny_llama_config(num_blocks=1, hidden_size=32), 0, 1).eval()
    hidden = torch.randn(1, 3, 32)
    positions = torch.arange(3).unsqueeze(0)
    rotary = span.rotary_emb(hidden, position_ids=positions)
    with pytest.raises(FutureWarning, match="past_key_values"):
        span.layers[0](hidden, position_embeddings=rotary, past_key_values=None)
    span(hidden)  # the span itself calls its layers by the installed names
