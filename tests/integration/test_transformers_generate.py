"""The swarm model is a transformers model: its generate() gives token for token what transformers gives
locally on the same weights, for greedy, beam search, repetition penalty, seeded sampling, left-padded
batches, stop strings and a text-generation pipeline; beam search survives a node killed mid-way; the
swarm's own decoding loop and transformers' give the same tokens, in new sessions, continued sessions and
with trained prompts."""

import shutil

import pytest
import torch
from transformers import AutoTokenizer, pipeline

from swarm.client import DistributedModelForCausalLM
from swarm.local import LocalSwarm
from swarm.models.tiny import write_tiny_tokenizer

IDS = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_model(tiny_model, tiny_swarm):
    with DistributedModelForCausalLM.from_pretrained(tiny_model, tiny_swarm.initial_peers) as model:
        yield model


@pytest.mark.parametrize(
    "decoding",
    [
        dict(do_sample=False),
        dict(do_sample=False, num_beams=3),
        dict(do_sample=False, num_beams=3, num_return_sequences=2),
        dict(do_sample=False, repetition_penalty=1.3),
        dict(do_sample=True, top_k=20, temperature=1.5),
    ],
    ids=["greedy", "beams", "beams-2-returned", "repetition-penalty", "sampling"],
)
def test_generate_equals_local_transformers(hf_model, local_model, decoding):
    torch.manual_seed(5)
    out = hf_model.generate(IDS, max_new_tokens=12, pad_token_id=0, **decoding)
    torch.manual_seed(5)
    expected = local_model.generate(IDS, max_new_tokens=12, pad_token_id=0, **decoding)
    assert out.tolist() == expected.tolist()


def test_it_is_a_transformers_model(hf_model, local_model):
    from transformers import GenerationMixin, PreTrainedModel

    assert isinstance(hf_model, PreTrainedModel) and isinstance(hf_model, GenerationMixin)
    assert hf_model.can_generate()
    assert hf_model.dtype == torch.float32 and hf_model.device == torch.device("cpu")
    assert hf_model.get_input_embeddings().weight.shape == local_model.get_input_embeddings().weight.shape
    assert hf_model.generation_config.eos_token_id == local_model.generation_config.eos_token_id


@pytest.mark.parametrize(
    "decoding",
    [dict(do_sample=False), dict(do_sample=True, top_k=20, top_p=0.9, temperature=1.5)],
    ids=["greedy", "sampling"],
)
def test_the_swarm_loop_and_transformers_loop_give_the_same_tokens(hf_model, decoding):
    ids = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    outputs = {}
    for loop in ("swarm", "transformers"):
        torch.manual_seed(11)
        outputs[loop] = hf_model.generate(ids, max_new_tokens=10, decoding_loop=loop, **decoding).tolist()
    assert outputs["swarm"] == outputs["transformers"]


def test_the_swarm_loop_refuses_what_it_cannot_apply(hf_model):
    with pytest.raises(ValueError, match="repetition_penalty"):
        hf_model.generate(IDS, max_new_tokens=2, repetition_penalty=1.2, decoding_loop="swarm")
    with pytest.raises(ValueError, match="generator"):
        hf_model.generate(IDS, max_new_tokens=2, num_beams=2, generator=torch.Generator())
    with pytest.raises(ValueError, match="decoding_loop"):
        hf_model.generate(IDS, max_new_tokens=2, decoding_loop="fast")


def test_a_session_continues_through_either_loop_with_the_same_tokens(hf_model, local_model):
    more = torch.randint(3, 256, (1, 3), generator=torch.Generator().manual_seed(4))
    results = {}
    for loop in ("swarm", "transformers"):
        with hf_model.inference_session(max_length=40) as session:
            first = hf_model.generate(IDS, session=session, max_new_tokens=5, decoding_loop=loop)
            # continue with nothing new, then with new tokens; the repetition penalty needs transformers' loop
            second = hf_model.generate(None, session=session, max_new_tokens=4, decoding_loop=loop)
            third = hf_model.generate(more, session=session, max_new_tokens=4, decoding_loop=loop)
            results[loop] = (first.tolist(), second.tolist(), third.tolist())
            penalized = hf_model.generate(None, session=session, max_new_tokens=3, repetition_penalty=1.3)
            results[loop] += (penalized.tolist(),)
    assert results["swarm"] == results["transformers"]
    # and all of it is what one local generation over the whole text gives
    first, second, third, penalized = results["swarm"]
    assert second[0][: len(first[0])] == first[0] and third[0][: len(second[0])] == second[0]
    local = local_model.generate(IDS, max_new_tokens=9, do_sample=False)
    assert second == local.tolist()
    local_third = local_model.generate(torch.cat([local, more], 1), max_new_tokens=4, do_sample=False)
    assert third == local_third.tolist()
    local_penalized = local_model.generate(local_third, max_new_tokens=3, repetition_penalty=1.3)
    assert penalized == local_penalized.tolist()


def test_trained_prompts_generate_the_same_through_either_loop(tiny_model, tiny_swarm):
    with DistributedModelForCausalLM.from_pretrained(
        tiny_model, tiny_swarm.initial_peers, tuning_mode="deep_ptune", pre_seq_len=3
    ) as model:
        with torch.no_grad():
            model.prompt_embeddings.weight.normal_(0, 1)
            model.intermediate_prompt_embeddings.weight.normal_(0, 0.5)
        plain = model.generate(IDS, max_new_tokens=8, decoding_loop="swarm")
        assert model.generate(IDS, max_new_tokens=8, decoding_loop="transformers").tolist() == plain.tolist()
        # the prompts change what comes out, and the swarm model's own forward agrees with its steps
        logits = model(plain[:, :-1]).logits
        assert logits[:, IDS.shape[1] - 1 :].argmax(-1).tolist() == plain[:, IDS.shape[1] :].tolist()
        beams = model.generate(IDS, max_new_tokens=8, num_beams=2)
        assert beams.shape == plain.shape


def test_left_padded_batch_equals_local(hf_model, local_model):
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = local_model.generate(
        ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0
    )
    assert out.tolist() == expected.tolist()


@pytest.fixture(scope="module")
def tokenizer(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer") / tiny_model.name
    shutil.copytree(tiny_model, folder)
    write_tiny_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


def test_stop_strings_end_generation_where_they_do_locally(hf_model, local_model, tokenizer):
    free = local_model.generate(IDS, max_new_tokens=12, do_sample=False, pad_token_id=0)
    pieces = [tokenizer.decode([token]) for token in free[0, IDS.shape[1] :].tolist()]
    # two tokens greedy decoding says, as text (the tiny tokenizer's bytes do not always decode alone)
    first = next(i for i in range(1, len(pieces) - 1) if (pieces[i - 1] + pieces[i]).isprintable())
    stop = pieces[first - 1] + pieces[first]
    kwargs = dict(
        max_new_tokens=12, do_sample=False, pad_token_id=0, stop_strings=[stop], tokenizer=tokenizer
    )
    out = hf_model.generate(IDS, **kwargs)
    assert out.tolist() == local_model.generate(IDS, **kwargs).tolist()
    assert out.shape[1] < free.shape[1]  # it stopped early


def test_a_text_generation_pipeline(hf_model, local_model, tokenizer):
    swarm_pipe = pipeline("text-generation", model=hf_model, tokenizer=tokenizer)
    local_pipe = pipeline("text-generation", model=local_model, tokenizer=tokenizer)
    kwargs = dict(max_new_tokens=10, do_sample=False)
    assert swarm_pipe("the swarm says", **kwargs) == local_pipe("the swarm says", **kwargs)


def test_beam_search_survives_a_node_killed_mid_way(tiny_model, local_model, tmp_path):
    with LocalSwarm(workdir=tmp_path) as swarm:
        swarm.start_bootstrap()
        nodes = swarm.start_nodes(str(tiny_model), ["0:3", "3:6", "3:6"])
        with DistributedModelForCausalLM.from_pretrained(
            tiny_model, swarm.initial_peers, max_retries=5
        ) as model:
            killed = []
            original_step = model.inference_session

            def session_that_kills(max_length):
                session = original_step(max_length)

                def kill_after_a_few_steps(position):
                    if position >= IDS.shape[1] + 4 and not killed:
                        victim = next(p for p in nodes if p.peer_id == session.route[-1].peer_id)
                        victim.kill()
                        killed.append(session)

                session.on_step = kill_after_a_few_steps
                return session

            model.inference_session = session_that_kills
            out = model.generate(IDS, max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=0)
            assert killed and killed[0].num_recoveries >= 1
    expected = local_model.generate(IDS, max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=0)
    assert out.tolist() == expected.tolist()


@pytest.mark.parametrize("drafting", ["prompt-lookup", "assistant"])
def test_speculative_decoding_gives_greedys_tokens(hf_model, local_model, drafting):
    """Drafted tokens are checked in one step and the rejected ones cropped from the nodes' caches."""
    ids = torch.cat([IDS, IDS, IDS], dim=1)  # repetitive, so that prompt lookup finds drafts
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    expected = local_model.generate(ids, **kwargs)
    if drafting == "prompt-lookup":
        kwargs["prompt_lookup_num_tokens"] = 3
    else:
        kwargs["assistant_model"] = local_model  # a local draft model (here the same weights)
    steps, dropped = [], []
    original = hf_model.inference_session

    def counting_session(max_length):
        session = original(max_length)
        session.on_step = steps.append
        truncate = session.truncate

        def counting_truncate(num_tokens):
            dropped.append(session.num_tokens - num_tokens)
            truncate(num_tokens)

        session.truncate = counting_truncate
        return session

    hf_model.inference_session = counting_session
    try:
        out = hf_model.generate(ids, **kwargs)
    finally:
        del hf_model.inference_session
    assert out.tolist() == expected.tolist()
    assert len(steps) < 16  # drafts were accepted: fewer steps than tokens
    if drafting == "prompt-lookup":
        assert any(dropped), "no draft was rejected: the crop path went untested"
