"""What error replies say, and whom the client blames for them."""

from __future__ import annotations

import logging

import pytest
import torch

from swarm.client.errors import RemoteError, blame, check_finite
from swarm.node.errors import RequestError, error_reply, to_error_proto
from swarm.proto import swarm_pb2
from swarm.utils.tensors import TensorTooLargeError

E = swarm_pb2.Error


class _Context:
    remote_id = "QmCaller"


def test_internal_errors_keep_their_text_in_the_node_log(caplog):
    secret = "/home/operator/.cache/model.safetensors: other client's session 1234"
    error = to_error_proto(RuntimeError(secret))
    assert error.code == E.INTERNAL
    assert secret not in error.message and "RuntimeError" not in error.message
    assert error.message.startswith("internal error ")
    with caplog.at_level(logging.ERROR):
        reply = error_reply(
            swarm_pb2.ForwardResponse, RuntimeError(secret), _Context(), "forward", logging.getLogger("t")
        )
    assert secret not in reply.error.message
    incident = reply.error.message.split()[2]
    assert any(secret in record.getMessage() and incident in record.getMessage() for record in caplog.records)
    # refusals say why: they are about the caller's own request
    assert to_error_proto(RequestError(E.BAD_REQUEST, "batch 3 differs")).message == "batch 3 differs"
    assert to_error_proto(TensorTooLargeError("too big")).code == E.TOO_LARGE


def test_blame_follows_the_error_code():
    def remote(code):
        return RemoteError("QmNode", E(code=code, message="m"))

    assert blame(remote(E.TOO_LARGE)) == blame(remote(E.BAD_REQUEST)) == "request"
    assert blame(remote(E.OVERLOADED)) == blame(remote(E.TIMEOUT)) == "busy"
    assert blame(remote(E.UNKNOWN_BLOCKS)) == "busy"  # it moved since we read its record: no ban
    assert blame(remote(E.INTERNAL)) == blame(remote(E.FORBIDDEN)) == "node"
    assert blame(TimeoutError()) == blame(ConnectionError()) == "node"  # no answer at all


def test_a_reply_with_nan_or_inf_is_the_nodes_fault():
    check_finite("QmNode", [torch.ones(2), torch.arange(3)])
    for bad in (float("nan"), float("inf")):
        with pytest.raises(RemoteError, match="NaN or inf") as info:
            check_finite("QmNode", [torch.tensor([1.0, bad])])
        assert blame(info.value) == "node" and info.value.peer_id == "QmNode"
