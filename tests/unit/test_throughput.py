"""Start-up throughput is measured once per model, span length, device and dtype, then read from the cache."""

from swarm.models.checkpoint import resolve_checkpoint
from swarm.node.throughput import cached_rps


def test_measurement_is_cached(tiny_model, tmp_path):
    checkpoint = resolve_checkpoint(tiny_model)
    calls = []

    def measure():
        calls.append(1)
        return 123.0, 45.0

    assert cached_rps(checkpoint, 2, "cpu", "float32", tmp_path, measure) == (123.0, 45.0)
    assert cached_rps(checkpoint, 2, "cpu", "float32", tmp_path, measure) == (123.0, 45.0)
    assert len(calls) == 1
    cached_rps(checkpoint, 3, "cpu", "float32", tmp_path, measure)  # another span length: measured anew
    cached_rps(checkpoint, 2, "cpu", "bfloat16", tmp_path, measure)  # another dtype too
    assert len(calls) == 3
