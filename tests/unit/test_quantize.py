"""Quantized blocks (bitsandbytes int8 / nf4 on CPU), measured memory, and what a quantized node announces."""

from functools import partial

import pytest
import torch

from swarm.client.config import ClientConfig
from swarm.dht.records import RecordError, check_message
from swarm.models.checkpoint import resolve_checkpoint
from swarm.models.span import load_span
from swarm.node.config import parse_memory
from swarm.node.memory import kv_cache_bytes_per_block, loaded_bytes
from swarm.node.quantize import QuantError, check_quant_name, check_quant_runs, quantize_linears
from swarm.proto import swarm_pb2
from swarm.verification.determinism import determinism_profile, same_profile


@pytest.fixture(scope="module")
def checkpoint(tiny_model):
    return resolve_checkpoint(tiny_model)


@pytest.mark.parametrize("quant, max_ratio, max_error", [("int8", 0.35, 0.02), ("nf4", 0.2, 0.1)])
def test_quantized_span_is_smaller_and_close(checkpoint, quant, max_ratio, max_error):
    full = load_span(checkpoint, 0, 6)
    prepare = partial(quantize_linears, quant=quant, dtype=torch.float32, device="cpu")
    quantized = load_span(checkpoint, 0, 6, prepare_layer=prepare)
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules())
    hidden = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = full(hidden), quantized(hidden)
    error = float((got - expected).norm() / expected.norm())
    assert 0 < error < max_error
    assert loaded_bytes(quantized.layers) <= max_ratio * loaded_bytes(full.layers)


def test_loaded_bytes_counts_storages_not_shapes():
    layer = torch.nn.Linear(64, 32, bias=False)
    assert loaded_bytes(layer) == 64 * 32 * 4
    quantize_linears(wrapper := torch.nn.Sequential(layer), "int8", torch.float32, "cpu")
    # int8 weights plus one float32 scale per output row (bitsandbytes' SCB, not a parameter)
    assert loaded_bytes(wrapper) == 64 * 32 + 32 * 4
    with torch.no_grad():
        wrapper(torch.randn(1, 64))  # bitsandbytes moves the scales from the weight to the layer's state
    assert loaded_bytes(wrapper) == 64 * 32 + 32 * 4
    shared = torch.nn.Module()
    shared.a = shared.b = torch.nn.Linear(8, 8, bias=False)  # one storage, counted once
    assert loaded_bytes(shared) == 8 * 8 * 4


def test_bad_quant_names_and_sizes_are_refused():
    with pytest.raises(QuantError, match="unknown --quant 'int4'"):
        check_quant_name("int4")
    with pytest.raises(QuantError, match="unknown --quant"):
        check_quant_runs("fp8", torch.float32, "cpu")
    check_quant_runs("int8", torch.float32, "cpu")  # runs here: bitsandbytes' CPU backend
    assert parse_memory("512MB") == 512 * 2**20 and parse_memory("1.5GiB") == int(1.5 * 2**30)
    for text in ("lots", "-1GB", "0", "1PB"):
        with pytest.raises(ValueError, match="--max-memory"):
            parse_memory(text)
    with pytest.raises(ValueError, match="allowed_quant: unknown"):
        ClientConfig(allowed_quant=["int4"])
    with pytest.raises(ValueError, match="allowed_quant must be"):
        ClientConfig(allowed_quant="none")


def test_kv_cache_budget_per_block(checkpoint):
    # keys and values: 2 x tokens x 2 KV heads x head dim 16 x 4 bytes
    assert kv_cache_bytes_per_block(checkpoint.config, 100, torch.float32) == 2 * 100 * 2 * 16 * 4


def test_quant_is_part_of_the_profile_and_of_server_info():
    full = determinism_profile(torch.float32, "cpu")
    int8 = determinism_profile(torch.float32, "cpu", quant="int8")
    assert full["quant"] == "none" and int8["quant"] == "int8" and not same_profile(full, int8)
    info = swarm_pb2.ServerInfo(
        peer_id="p", model="m", start_block=0, end_block=1, block_hashes=["0" * 64], quant="int8"
    )
    check_message(info)
    info.quant = "int3"
    with pytest.raises(RecordError, match="unknown quant"):
        check_message(info)
