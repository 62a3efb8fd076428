"""GroupAverager and the robust all-reduce between real hivemind peers on 127.0.0.1 (in this process)."""

from __future__ import annotations

import math
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import torch
from hivemind.compression import Float16Compression, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from swarm.averaging.btard import commit_round
from swarm.averaging.group import AveragingOutcome, GroupAverager
from swarm.averaging.reducers import get_reducer
from swarm.averaging.robust import RobustAllReduceRunner, RobustDecentralizedAverager
from swarm.averaging.statements import digest, signing_key_of
from swarm.dht.factory import create_dht

NUM_DHTS = 4
KEYS: dict[int, object] = {}  # id(dht) -> its identity key (robust rounds sign with it)
FAST = dict(min_matchmaking_time=1.0, request_timeout=0.5, next_chunk_timeout=2.0)


def _descendants() -> set[int]:
    # torch_shm_manager is torch's own per-process helper for shared-memory tensors (the averager's tensors
    # are shared with its process); torch starts it once and it lives as long as this process: not ours
    return {p.pid for p in psutil.Process().children(recursive=True) if p.name() != "torch_shm_manager"}


@pytest.fixture(scope="module")
def dhts():
    """4 DHT peers bootstrapped from the first; at the end, no process they or the tests started is left."""
    before = _descendants()
    peers = []
    try:
        first, signer = create_dht()
        peers.append(first)
        KEYS[id(first)] = signing_key_of(signer)
        maddrs = [str(m) for m in first.get_visible_maddrs()]
        for _ in range(NUM_DHTS - 1):
            dht, signer = create_dht(maddrs)
            peers.append(dht)
            KEYS[id(dht)] = signing_key_of(signer)
        _wait_until_connected(peers)
        yield peers
    finally:
        for dht in reversed(peers):
            dht.shutdown()
    deadline = time.monotonic() + 15
    while (left := _descendants() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left behind: {[psutil.Process(pid).cmdline() for pid in left]}"


def _wait_until_connected(peers, timeout: float = 15.0) -> None:
    """Every peer can read a record stored by every other (hivemind issue #624: DHTs that split at start)."""
    tag = uuid.uuid4().hex[:8]
    for i, dht in enumerate(peers):
        assert dht.store(f"probe_{tag}_{i}", i, expiration_time=time.time() + 60)
    deadline = time.monotonic() + timeout
    for reader in peers:
        for i in range(len(peers)):
            while (found := reader.get(f"probe_{tag}_{i}", latest=True)) is None:
                assert time.monotonic() < deadline, "DHT peers do not see each other"
                time.sleep(0.2)
            assert found.value == i


def _prefix(name: str) -> str:
    return f"test_{name}_{uuid.uuid4().hex[:8]}"


def _averagers(dhts, n: int, templates, **kwargs) -> list[GroupAverager]:
    prefix = _prefix(kwargs.pop("name", "group"))
    return [GroupAverager(dht, prefix, templates, **{**FAST, **_signed(dht, kwargs)}) for dht in dhts[:n]]


def _signed(dht, options: dict) -> dict:
    """`options` plus the peer's signing key when its aggregator is robust."""
    if options.get("aggregator", "mean") == "mean":
        return options
    return {**options, "signing_key": KEYS[id(dht)]}


def _run_parallel(calls) -> tuple[list[AveragingOutcome], list[float]]:
    """Run (averager, tensors, weight, expected, timeout) rounds at once; outcomes and each call's seconds."""

    def one(call):
        averager, tensors, weight, expected, timeout = call
        start = time.monotonic()
        outcome = averager.average(tensors, weight, expected, timeout)
        return outcome, time.monotonic() - start

    with ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(one, calls))
    return [r[0] for r in results], [r[1] for r in results]


def _weighted_mean(inputs, weights) -> list[torch.Tensor]:
    total = sum(weights)
    return [
        sum(w * tensors[k].double() for tensors, w in zip(inputs, weights, strict=True)) / total
        for k in range(len(inputs[0]))
    ]


def _assert_close(actual, expected, tol: float = 1e-6) -> None:
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        assert torch.allclose(a.double(), e.double(), rtol=tol, atol=tol), (a - e).abs().max()


def _shutdown(averagers) -> None:
    for averager in averagers:
        averager.shutdown()


def test_three_peers_get_the_exact_weighted_average(dhts):
    templates = [torch.zeros(3, 4), torch.zeros(10)]
    averagers = _averagers(dhts, 3, templates, name="exact")
    try:
        gen = torch.Generator().manual_seed(0)
        inputs = [[torch.randn(3, 4, generator=gen), torch.randn(10, generator=gen)] for _ in range(3)]
        weights = [1.0, 2.0, 5.0]
        originals = [[t.clone() for t in ts] for ts in inputs]
        calls = [(a, x, w, 3, 10.0) for a, x, w in zip(averagers, inputs, weights, strict=True)]
        outcomes, seconds = _run_parallel(calls)

        expected = _weighted_mean(inputs, weights)
        for outcome in outcomes:
            assert outcome.ok and outcome.group_size == 3
            _assert_close(outcome.tensors, expected)
            _assert_close(outcome.tensors, outcomes[0].tensors)  # every peer ends with the same values
        for ts, orig in zip(inputs, originals, strict=True):
            assert all(torch.equal(t, o) for t, o in zip(ts, orig, strict=True)), "inputs were modified"
        # the group filled up, so the round did not wait out a longer matchmaking window
        assert max(seconds) < 8.0, seconds
    finally:
        _shutdown(averagers)


def test_expected_group_size_one_returns_the_inputs_without_a_round(dhts):
    (averager,) = _averagers(dhts, 1, [torch.zeros(5)], name="alone")
    try:
        x = torch.arange(5.0)
        start = time.monotonic()
        outcome = averager.average([x], weight=3.0, expected_group_size=1, timeout=10.0)
        elapsed = time.monotonic() - start
        assert elapsed < 0.5  # no matchmaking (which takes min_matchmaking_time = 1 s at least)
        assert not outcome.ok and outcome.group_size == 1
        assert torch.equal(outcome.tensors[0], x)
        outcome.tensors[0] += 1  # a copy, not the caller's tensor
        assert torch.equal(x, torch.arange(5.0))
        with pytest.raises(ValueError):
            averager.average(
                [torch.zeros(6)], 1.0, 1, 10.0
            )  # wrong shape is a caller error, not a failed round
    finally:
        averager.shutdown()


def test_bad_arguments_raise_value_error(dhts):
    for prefix in ("run.stage0", "", "has space"):
        with pytest.raises(ValueError, match="prefix"):
            GroupAverager(dhts[0], prefix, [torch.zeros(2)])
    with pytest.raises(ValueError, match="aggregator"):
        GroupAverager(dhts[0], _prefix("bad"), [torch.zeros(2)], aggregator="krum")
    (averager,) = _averagers(dhts, 1, [torch.zeros(2)], name="args")
    try:
        with pytest.raises(ValueError, match="min_matchmaking_time"):
            averager.average([torch.zeros(2)], 1.0, 2, timeout=0.5)  # can't even finish matchmaking
        with pytest.raises(ValueError, match="weight"):
            averager.average([torch.zeros(2)], math.nan, 2, timeout=5.0)
    finally:
        averager.shutdown()
    assert not averager._averager.is_alive()  # the averager process is gone, not just asked to stop


def test_creating_an_averager_keeps_sigint_and_works_off_the_main_thread(dhts):
    before = signal.getsignal(signal.SIGINT)
    prefix = _prefix("threads")
    main = GroupAverager(dhts[0], prefix, [torch.zeros(3)], **FAST)
    try:
        assert signal.getsignal(signal.SIGINT) is before  # hivemind alone leaves SIGINT ignored here
        with ThreadPoolExecutor(1) as pool:  # hivemind alone raises ValueError off the main thread
            other = pool.submit(lambda: GroupAverager(dhts[1], prefix, [torch.zeros(3)], **FAST)).result()
        try:
            calls = [(main, [torch.zeros(3)], 1.0, 2, 8.0), (other, [torch.full((3,), 6.0)], 2.0, 2, 8.0)]
            outcomes, _ = _run_parallel(calls)
            for outcome in outcomes:
                assert outcome.ok and torch.allclose(outcome.tensors[0], torch.full((3,), 4.0))
        finally:
            other.shutdown()
    finally:
        main.shutdown()


def test_round_with_a_missing_peer_ends_within_the_timeout(dhts):
    """3 peers expected, 1 never calls average: the 2 present average together once matchmaking times out."""
    averagers = _averagers(dhts, 3, [torch.zeros(8)], name="missing")
    try:
        inputs = [[torch.full((8,), 1.0)], [torch.full((8,), 4.0)]]
        timeout = 5.0
        calls = [(averagers[i], inputs[i], w, 3, timeout) for i, w in ((0, 1.0), (1, 2.0))]
        outcomes, seconds = _run_parallel(calls)

        # bounded: the round ends by its deadline (plus at most min_allreduce_time = 2 s for an all-reduce)
        assert max(seconds) < timeout + 2.0 + 1.0, seconds
        # what hivemind does: the leader waits for its declared expiration (min_matchmaking_time), then runs
        # the all-reduce with the group it has, as min_group_size (2) is met
        expected = _weighted_mean(inputs, [1.0, 2.0])
        for outcome in outcomes:
            assert outcome.ok and outcome.group_size == 2, outcome
            _assert_close(outcome.tensors, expected)
    finally:
        _shutdown(averagers)


def test_two_consecutive_rounds(dhts):
    averagers = _averagers(dhts, 2, [torch.zeros(4), torch.zeros(2, 2)], name="twice")
    try:
        for round_index in range(2):
            inputs = [
                [torch.full((4,), 10.0 * round_index + peer), torch.full((2, 2), -float(peer + round_index))]
                for peer in range(2)
            ]
            weights = [1.0 + round_index, 3.0]
            calls = [(a, x, w, 2, 8.0) for a, x, w in zip(averagers, inputs, weights, strict=True)]
            outcomes, _ = _run_parallel(calls)
            expected = _weighted_mean(inputs, weights)
            for outcome in outcomes:
                assert outcome.ok and outcome.group_size == 2, (round_index, outcome)
                _assert_close(outcome.tensors, expected)
    finally:
        _shutdown(averagers)


def _attack_round(dhts, aggregator: str, attacker_weight: float, **kwargs):
    """3 honest peers with values near 1.0 and one sending -1000; returns outcomes and the honest mean."""
    shapes = [(64, 32)]
    averagers = _averagers(dhts, 4, [torch.zeros(s) for s in shapes], name=aggregator, aggregator=aggregator)
    try:
        gen = torch.Generator().manual_seed(1)
        honest = [[1.0 + 0.01 * torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
        attacker = [torch.full(s, -1000.0) for s in shapes]
        inputs = [*honest, attacker]
        weights = [1.0, 1.0, 1.0, attacker_weight]
        calls = [(a, x, w, 4, 10.0) for a, x, w in zip(averagers, inputs, weights, strict=True)]
        outcomes, seconds = _run_parallel(calls)
        honest_mean = _weighted_mean(honest, [1.0, 1.0, 1.0])
        return outcomes, honest_mean, seconds
    finally:
        _shutdown(averagers)


def test_centered_clip_resists_a_sign_flip_attacker(dhts):
    # the attacker also claims 100x the samples: robust aggregation must ignore reported weights
    outcomes, honest_mean, _ = _attack_round(dhts, "centered_clip", attacker_weight=100.0)
    for outcome in outcomes[:3]:
        assert outcome.ok and outcome.group_size == 4
        pairs = zip(outcome.tensors, honest_mean, strict=True)
        deviation = max(float((t.double() - m).abs().max()) for t, m in pairs)
        # 1 attacker of 4 can pull the result by at most tau / 3 in norm (here over 2048 values: ~0.007 each)
        assert deviation < 0.05, deviation
    _assert_close(outcomes[0].tensors, outcomes[1].tensors)


def test_mean_is_dragged_by_the_attacker(dhts):
    """The same attack against the plain mean: shows the robust test above can fail."""
    outcomes, honest_mean, _ = _attack_round(dhts, "mean", attacker_weight=1.0)
    for outcome in outcomes:
        assert outcome.ok and outcome.group_size == 4
        for t, m in zip(outcome.tensors, honest_mean, strict=True):
            assert torch.allclose(t.double(), (3 * m - 1000.0) / 4, atol=1e-3)
            assert float(t.mean()) == pytest.approx(-249.25, abs=0.01)


class _CompressingRunner(RobustAllReduceRunner):
    """Signs float16-compressed parts (a cheater's modified code: honest runners never compress)."""

    @staticmethod
    def _serialized(part):
        return serialize_torch_tensor(part, runtime_pb2.CompressionType.FLOAT16)

    def _parts_for_reducer(self, parts, first):
        serialized = [self._serialized(part) for part in parts]
        return self._parts_statement(first, [digest(s.buffer) for s in serialized]), serialized


class _CompressingAverager(RobustDecentralizedAverager):
    def _make_runner(self, **kwargs):
        return _CompressingRunner(
            reducer=self.reducer, signing_key=self.signing_key, round_prefix=self.prefix, **kwargs
        )


def test_robust_peers_refuse_compressed_parts(dhts):
    """A peer sending float16-compressed parts is banned by every robust reducer; the others still finish."""
    prefix = _prefix("compressed")
    shapes = [(1000,)] * 4  # 4 separate chunks: every peer reduces at least one of them
    templates = [torch.zeros(s) for s in shapes]
    options = dict(FAST, aggregator="median")
    compressed = {"compression": Float16Compression()}
    with pytest.raises(ValueError, match="compress"):  # GroupAverager won't build a peer that always fails
        GroupAverager(dhts[3], prefix, templates, **_signed(dhts[3], options), averager_kwargs=compressed)
    honest = [GroupAverager(dht, prefix, templates, **_signed(dht, options)) for dht in dhts[:3]]
    # the cheater skips GroupAverager's check and drives a robust averager that compresses what it sends
    cheater = _CompressingAverager(
        [torch.full(s, 4.0) for s in shapes],
        dhts[3],
        start=True,
        prefix=prefix,
        min_matchmaking_time=1.0,
        request_timeout=0.5,
        next_chunk_timeout=2.0,
        reducer=get_reducer("median"),
        signing_key=KEYS[id(dhts[3])],
    )
    try:
        cheater.configure_round(4)
        commit, _ = commit_round(KEYS[id(dhts[3])], prefix, 0, [torch.full(s, 4.0) for s in shapes], 2**19)
        cheater_round = cheater.step(gather=commit, weight=1.0, timeout=4.0, wait=False)
        inputs = [[torch.full(s, float(peer + 1)) for s in shapes] for peer in range(3)]
        # the cheater's failed round is retried until its deadline: keep the timeout short
        calls = [(a, x, 1.0, 4, 4.0) for a, x in zip(honest, inputs, strict=True)]
        outcomes, seconds = _run_parallel(calls)
        assert max(seconds) < 4.0 + 2.0 + 1.0, seconds
        for outcome in outcomes:
            assert outcome.ok and outcome.group_size == 4
            # chunks reduced by honest peers: median of the 3 honest senders (1, 2, 3) = 2; the chunk the
            # cheater reduced itself took its own uncompressed part too: lower median of (1, 2, 3, 4) = 2
            for t in outcome.tensors:
                assert torch.equal(t, torch.full_like(t, 2.0)), t.unique()
        # its parts were refused by the honest reducers, so its round failed and its tensors are untouched
        with pytest.raises(Exception, match="could not find a group|not reduced"):
            cheater_round.result(timeout=10)
        with cheater.get_tensors() as tensors:
            assert all(torch.equal(t, torch.full_like(t, 4.0)) for t in tensors)
    finally:
        _shutdown(honest)
        cheater.shutdown()


def _btard_round(dhts, attack: str, step: int = 3):
    """4 centered_clip peers, the last one attacking; one round, the checks after it, and every accusation
    judged by a fresh BanList (re-checks go to the real peers). Returns (outcomes, bans, attacker id)."""
    import asyncio

    from swarm.averaging.accusations import BanList
    from swarm.averaging.btard import read_accusations, recheck_aggregate
    from swarm.testing.faults import parse_fault

    prefix = _prefix(attack)
    key = f"{prefix}_accusations"
    shapes = [(128, 64), (100,)]  # 9 chunks of 4 KiB: every one of the 4 reducers gets some to perturb
    options = dict(FAST, aggregator="centered_clip", tau=1.0, accusations_key=key)
    faults = [None, None, None, parse_fault(f"byzantine:{attack}")]
    averagers = [
        GroupAverager(dht, prefix, [torch.zeros(s) for s in shapes], **_signed(dht, options), fault=fault)
        for dht, fault in zip(dhts, faults, strict=True)
    ]
    try:
        gen = torch.Generator().manual_seed(2)
        inputs = [[0.5 + 0.1 * torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]
        outcomes = _run_parallel_keyed(
            [(a, x, 1.0, 4, 10.0, step) for a, x in zip(averagers, inputs, strict=True)]
        )
        filed = [averager.last_check.result(timeout=30) for averager in averagers[:3] if averager.last_check]
        blobs = read_accusations(dhts[0], key)
        assert sorted(blobs) == sorted(b for accusations in filed for b in accusations)

        async def judge_all():
            p2p = await dhts[0].replicate_p2p()
            reduce = get_reducer("centered_clip", tau=1.0)
            bans = BanList(
                recheck=lambda a: recheck_aggregate(p2p, dhts[0], a, lambda x: reduce(x, None), 1.0)
            )
            for blob in blobs:
                await bans.consider(blob)
            return bans

        bans = asyncio.run(judge_all())
        return outcomes, bans, dhts[3].peer_id.to_base58()
    finally:
        _shutdown(averagers)


def _run_parallel_keyed(calls) -> list[AveragingOutcome]:
    def one(call):
        averager, tensors, weight, expected, timeout, key = call
        return averager.average(tensors, weight, expected, timeout, round_key=key)

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(one, calls))


def test_btard_catches_an_equivocating_sender(dhts):
    """Its parts differ from its commitment: every honest reducer refuses them and can prove it."""
    outcomes, bans, attacker = _btard_round(dhts, "equivocate")
    for outcome in outcomes[:3]:
        assert outcome.ok and outcome.group_size == 4
    assert not outcomes[3].ok  # its round failed: its parts were refused
    _assert_close(outcomes[0].tensors, outcomes[1].tensors, tol=0)
    assert bans.banned() == {attacker}
    assert "equivocated" in bans.bans()[0].reason


def test_btard_catches_a_bad_reducer(dhts):
    """It perturbs the chunks it reduces: the projection check fails, the re-check from its own evidence
    convicts it, and no honest peer is banned."""
    outcomes, bans, attacker = _btard_round(dhts, "bad_reducer")
    assert all(outcome.ok for outcome in outcomes)
    assert bans.banned() == {attacker}
    assert "bad aggregate" in bans.bans()[0].reason
