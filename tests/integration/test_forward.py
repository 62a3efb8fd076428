"""A full forward pass through 3 node processes equals local transformers on the same weights."""

import pytest
import torch

from swarm.client import DistributedModelForCausalLM, MissingBlocksError
from swarm.models.tiny import write_tiny_llama


@pytest.fixture(scope="module")
def client(tiny_model, tiny_swarm):
    with DistributedModelForCausalLM.from_pretrained(tiny_model, tiny_swarm.initial_peers) as model:
        yield model


def test_logits_match_local_transformers(client, local_model):
    input_ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    logits = client(input_ids).logits
    with torch.no_grad():
        expected = local_model(input_ids).logits
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    spans = [(span.start, span.end) for span in client.last_route]
    assert spans == [(0, 2), (2, 5), (5, 6)]


def test_labels_give_transformers_loss_and_inputs_embeds_the_same_logits(client, local_model):
    input_ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    labels = input_ids.clone()
    labels[0, :4] = -100  # ignored positions, as a prompt's are in supervised fine-tuning
    out = client(input_ids, labels=labels)
    with torch.no_grad():
        expected = local_model(input_ids, labels=labels)
    assert out.loss is not None and out.loss.dim() == 0
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=1e-5)
    assert client(input_ids).loss is None  # no labels, no loss

    embeds = client.head.embed(input_ids)
    torch.testing.assert_close(client(inputs_embeds=embeds).logits, out.logits, rtol=0, atol=1e-6)
    assert client.dtype == torch.float32 == local_model.dtype

    # wrong arguments are refused before anything is sent
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        client(input_ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        client()
    with pytest.raises(ValueError, match="labels must have shape"):
        client(input_ids, labels=labels[:, :3])
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        client(inputs_embeds=embeds[..., :10])


def test_an_empty_batch_is_refused_clearly(client):
    with pytest.raises(ValueError, match="empty"):
        client(torch.zeros(0, 5, dtype=torch.long))


def test_micro_batches_pipelined_through_the_spans_give_the_same_logits(tiny_model, tiny_swarm, local_model):
    input_ids = torch.randint(0, 256, (5, 13), generator=torch.Generator().manual_seed(3))
    with DistributedModelForCausalLM.from_pretrained(
        tiny_model, tiny_swarm.initial_peers, max_chunk_rows=1
    ) as model:
        logits = model(input_ids).logits
    with torch.no_grad():
        expected = local_model(input_ids).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_logits_with_padding_mask_match(client, local_model):
    input_ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding, as generate() uses for batches
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = client(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    with torch.no_grad():
        expected = local_model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    # padded positions are don't-care; compare the real tokens
    torch.testing.assert_close(logits[0], expected[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1, 3:], expected[1, 3:], rtol=0, atol=1e-5)


def test_node_with_different_weights_is_skipped(tiny_model, tiny_swarm, local_model, tmp_path):
    """An impostor announces the whole model under the same name; its hashes give it away."""
    impostor = write_tiny_llama(tmp_path / "impostor", seed=1)
    process = tiny_swarm.start_node(str(impostor), "0:6", "--model-name", "tiny-llama")
    try:
        with DistributedModelForCausalLM.from_pretrained(tiny_model, tiny_swarm.initial_peers) as model:
            input_ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))
            logits = model(input_ids).logits
            assert process.peer_id not in {span.peer_id for span in model.last_route}
            with torch.no_grad():
                torch.testing.assert_close(logits, local_model(input_ids).logits, rtol=0, atol=1e-5)
            # routed only through the impostor: refused while the check is on...
            model.client_config.allowed_servers = [process.peer_id]
            model.client_config.wait_for_blocks = 1.0
            with pytest.raises(MissingBlocksError):
                model(input_ids)
            # ...and without the check its output is wrong: the check is what kept it out
            model.client_config.verify_weights = False
            wrong = model(input_ids).logits
            assert [span.peer_id for span in model.last_route] == [process.peer_id]
            assert not torch.allclose(wrong, logits, atol=1e-3)
    finally:
        process.terminate()


def test_blocked_servers_leave_named_missing_blocks(tiny_model, tiny_swarm):
    node_2_5 = next(p for p in tiny_swarm.processes if p.span == (2, 5) and p.alive())
    with DistributedModelForCausalLM.from_pretrained(
        tiny_model, tiny_swarm.initial_peers, blocked_servers=[node_2_5.peer_id], wait_for_blocks=1.0
    ) as model:
        with pytest.raises(MissingBlocksError) as error:
            model(torch.zeros(1, 3, dtype=torch.long))
        assert error.value.missing == [2, 3, 4]
        assert "[2, 3, 4]" in str(error.value)
