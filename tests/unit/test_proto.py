"""The committed generated code must be what proto/ compiles to."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_proto_is_current():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_tensors_use_hivemind_runtime_tensor():
    from hivemind.proto import runtime_pb2

    from swarm.proto import swarm_pb2

    field = swarm_pb2.ForwardRequest.DESCRIPTOR.fields_by_name["tensors"]
    assert field.message_type.full_name == runtime_pb2.Tensor.DESCRIPTOR.full_name


def test_node_streaming_handlers_are_registered_as_streams():
    """hivemind only treats typing.AsyncIterator hints as streams; anything else silently becomes unary."""
    from swarm.node.handler import NodeServicer

    NodeServicer._collect_rpc_handlers()
    kinds = {h.method_name: (h.stream_input, h.stream_output) for h in NodeServicer._rpc_handlers}
    assert kinds["rpc_forward_stream"] == (True, True)
    assert kinds["rpc_inference"] == (True, True)
    assert kinds["rpc_forward"] == (False, False) and kinds["rpc_info"] == (False, False)
