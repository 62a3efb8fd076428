"""Average a fixed list of tensors with the other members of one named group over hivemind.

`GroupAverager` knows nothing about models: tensors in, tensors out. It drives one hivemind
`DecentralizedAverager` (a background process) per group and adds what a training step needs from it:

- a round starts as soon as the group is full (`target_group_size` is set per call to the number of
  peers the caller expects), instead of waiting for the whole matchmaking window;
- the whole round, matchmaking and all-reduce, is bounded by the call's `timeout`;
- results are all-or-nothing: hivemind keeps a peer's own values for any part whose reducer failed and
  still reports success; here such a round counts as failed and the inputs come back unchanged;
- a failed round never raises: it returns copies of the inputs with ok=False.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import signal
import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.averaging.averager import DecentralizedAverager
from hivemind.averaging.control import StepControl
from hivemind.averaging.group_info import GroupInfo
from hivemind.dht import DHT
from hivemind.proto import averaging_pb2
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.timed_storage import get_dht_time

from swarm.averaging.commitments import DEFAULT_PART_SIZE_BYTES
from swarm.averaging.reducers import all_finite
from swarm.utils.pipes import BlockingReads

logger = logging.getLogger(__name__)

# hivemind's group keys are "{prefix}.0b{bits}" and its RPC namespaces are the prefix: no dots, no spaces
_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")
AGGREGATORS = ("mean", "median", "trimmed_mean", "centered_clip")


ROUND_KEY_BITS = 16  # group-key bits that carry a round key (a step modulo 2**16)


@dataclass
class AveragingOutcome:
    """What one `GroupAverager.average` call produced."""

    tensors: list[torch.Tensor]  # the group's weighted average, or copies of the inputs when the round failed
    group_size: int  # peers that took part (1 when it failed or nobody else came)
    ok: bool  # True when an all-reduce with at least one other peer completed
    excluded: list[str] = field(
        default_factory=list
    )  # robust rounds: members left out (banned, no commitment)


def validate_prefix(prefix: str) -> str:
    """Return `prefix` if hivemind accepts it as an averager prefix, else raise ValueError."""
    if not isinstance(prefix, str) or not _PREFIX_PATTERN.fullmatch(prefix):
        raise ValueError(
            f"averaging prefix {prefix!r} must be a non-empty string of letters, digits, '_' and '-' "
            "(hivemind builds group keys as '<prefix>.0b<bits>', so no dots; e.g. 'myrun_stage0')"
        )
    return prefix


class SwarmDecentralizedAverager(DecentralizedAverager):
    """hivemind's averager with per-round settings and all-or-nothing results.

    Differences from `DecentralizedAverager` (the all-reduce itself is hivemind's, via `runner_class`):
    - `configure_round(target_group_size)` changes the group size that ends matchmaking early, per round;
    - the all-reduce of a round must finish by the step's deadline (at least `min_allreduce_time` seconds
      once a group has formed), so `step(timeout=...)` bounds the whole round, not only matchmaking;
    - results are applied only when every part was reduced: hivemind's runner substitutes the local part
      for a failed reducer's part (partition.py `register_failed_reducer`) and the step still succeeds.
    """

    runner_class: type[AllReduceRunner] = AllReduceRunner

    def __init__(self, *args: Any, min_allreduce_time: float = 2.0, **kwargs: Any):
        self.min_allreduce_time = float(min_allreduce_time)
        self._round_deadline = float("inf")  # only read and written in the averager process
        self._banned: frozenset[str] = frozenset()  # likewise
        super().__init__(*args, **kwargs)

    def run_in_background(self, await_ready: bool = True, timeout: float | None = None) -> None:
        """Start the averager process, leaving the caller's SIGINT handler as it was.

        hivemind sets SIGINT to "ignore" in the *calling* process so that the forked child inherits it
        (averager.py, run_in_background) and never restores it: Ctrl+C would then stop working in the
        caller, and the call raises ValueError outside the main thread. Here the handler is restored
        right after the fork; off the main thread the child simply inherits the current handler.
        """
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child must leave Ctrl+C to its parent
            try:
                self.start()
            finally:
                signal.signal(signal.SIGINT, previous)
        else:
            self.start()
        if await_ready:
            self.wait_until_ready(timeout)

    def run(self) -> None:
        # the background process reads whole messages from its command pipe (see swarm.utils.pipes)
        self._inner_pipe = BlockingReads(self._inner_pipe)
        # its tensor work is per part and already runs in parallel across parts; torch's intra-op threads
        # would only fight the node's compute for the cores (a CenteredClip of one 2^19-byte chunk from 4
        # peers: 34 ms on one thread, 0.8 s on two threads of a busy 2-core machine)
        torch.set_num_threads(1)
        super().run()

    def configure_round(
        self,
        target_group_size: int | None,
        timeout: float | None = 10.0,
        group_bits: str = "",
        banned: Collection[str] = (),
    ) -> None:
        """Set the group size at which the next rounds' matchmaking stops waiting (None: wait it out),
        the group key's bits (peers whose bits differ never meet, e.g. members at different steps) and
        the peers this averager refuses to group with (banned: neither leader nor follower)."""
        future = MPFuture()
        self._outer_pipe.send(
            (
                "_configure_round",
                [],
                dict(
                    target_group_size=target_group_size,
                    group_bits=group_bits,
                    banned=frozenset(map(str, banned)),
                    future=future,
                ),
            )
        )
        future.result(timeout=timeout)

    async def _configure_round(
        self, *, target_group_size: int | None, group_bits: str, banned: frozenset[str], future: MPFuture
    ) -> None:
        try:
            self._banned = banned
            self._refuse_banned_peers()
            self._matchmaking.group_key_manager.group_bits = group_bits
            self._matchmaking.target_group_size = target_group_size
            self._matchmaking.potential_leaders.target_group_size = target_group_size
            # The key manager uses target_group_size only to re-bucket group bits after a round, and its
            # rng.sample(range(target), group_size) raises when a leader with a larger target put us in a
            # bigger group; with no group bits (our case) the bucket is irrelevant: let it use the group size.
            self._matchmaking.group_key_manager.target_group_size = None
            future.set_result(None)
        except Exception as e:  # surfaced to the caller of configure_round
            future.set_exception(e)

    def _refuse_banned_peers(self) -> None:
        """Make matchmaking skip banned leaders and turn away banned followers.

        hivemind builds its Matchmaking inside the averager's own loop with no hook for this, so the two
        methods are wrapped on that instance, once.
        """
        matchmaking = self._matchmaking
        if getattr(matchmaking, "_swarm_refuses_banned", False):
            return
        check_request, request_join = matchmaking._check_reasons_to_reject, matchmaking._request_join_group

        def check_reasons_to_reject(request, context):
            if context.remote_id.to_base58() in self._banned:
                return averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return check_request(request, context)

        async def request_join_group(leader):
            if leader.to_base58() in self._banned:
                return None  # try the next potential leader
            return await request_join(leader)

        matchmaking._check_reasons_to_reject = check_reasons_to_reject
        matchmaking._request_join_group = request_join_group
        matchmaking._swarm_refuses_banned = True

    async def _step(self, *, step: StepControl, future_for_init: MPFuture) -> None:
        self._round_deadline = step.deadline  # GroupAverager runs one step at a time
        await super()._step(step=step, future_for_init=future_for_init)

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any) -> Any:
        budget = max(self._round_deadline - get_dht_time(), self.min_allreduce_time)
        try:
            return await asyncio.wait_for(
                self._aggregate_in_group(group_info, min_vector_size, **kwargs), budget
            )
        except TimeoutError:
            # _step retries (or gives up) on AllreduceException, but lets a TimeoutError escape as a crash
            raise AllreduceException(f"all-reduce did not finish within {budget:.1f} s") from None

    async def _aggregate_in_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any) -> Any:
        """One all-reduce in an assembled group (hivemind's; subclasses decide who sends and reduces)."""
        return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)

    def _make_runner(self, **kwargs: Any) -> AllReduceRunner:
        """Build the runner for one all-reduce (subclasses swap the reducer here)."""
        return self.runner_class(**kwargs)

    async def _run_allreduce_inplace_(
        self,
        tensors: Sequence[torch.Tensor],
        group_info: GroupInfo,
        group_id: bytes | None = None,
        **kwargs: Any,
    ) -> AllReduceRunner:
        """Run one all-reduce and write its results into `tensors` (all or nothing); returns the runner."""
        group_id = group_info.group_id if group_id is None else group_id
        runner = self._make_runner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        assert group_id in self._running_groups, f"group {group_id} was not registered"
        self._running_groups[group_id].set_result(runner)

        if runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            async for _ in runner:
                raise ValueError("auxiliary peers should not receive averaged tensors")
            return runner

        # drained to the end (hivemind stops at the last tensor): the runner then finalizes itself normally
        deltas = [delta async for delta in runner]
        failed = runner.tensor_part_container.failed_size
        if failed or len(deltas) != len(tensors):
            # all-or-nothing: a half-averaged update is worse than none; a retry must start from the inputs
            raise AllreduceException(
                f"{failed} of {runner.tensor_part_container.total_size} values were not reduced by their peer"
            )
        for tensor, output in zip(tensors, deltas, strict=True):
            if getattr(runner, "returns_aggregates", False):
                tensor.copy_(output)  # bit for bit what the reducers signed
            else:
                tensor.add_(output, alpha=self._averaging_alpha)
        self.last_updated = get_dht_time()
        self._state_updated.set()
        return runner


MAX_PENDING_CHECKS = 2  # rounds whose checks may wait behind a running one (each takes seconds at most)
MIN_ROBUST_CHUNKS = 64  # robust rounds cut small models finer, so that every reducer gets chunks to check


def robust_part_size(templates: Sequence[torch.Tensor]) -> int:
    """Chunk size for robust rounds: hivemind's 2^19 bytes, or less for a small model so that it has at
    least MIN_ROBUST_CHUNKS chunks (every member reduces some, and a check's verdict is finer-grained).
    Depends on the tensors' sizes only, so every member computes the same before it knows its group."""
    total = sum(t.numel() * t.element_size() for t in templates)
    return max(4096, min(DEFAULT_PART_SIZE_BYTES, total // MIN_ROBUST_CHUNKS // 64 * 64))


class GroupAverager:
    """Averages a fixed list of tensors with the other members of one named group.

    :param dht: a running hivemind DHT (in this project, from `swarm.dht.factory.create_dht`)
    :param prefix: the group's name, shared by all members, e.g. "myrun_stage0" (no dots)
    :param templates: tensors whose shapes and dtypes every later `average` call must match; they are
      copied (the caller's tensors are never shared with the averager process)
    :param aggregator: "mean" (hivemind's weighted mean) or a robust rule from `swarm.averaging.reducers`
      ("median", "trimmed_mean", "centered_clip"); robust rules ignore the weights peers report and run
      per all-reduce chunk (2^19 bytes, smaller for small models: `robust_part_size`), with BTARD's
      commitments and checks (see `swarm.averaging.robust` and `swarm.averaging.btard`)
    :param tau: CenteredClip's clipping radius per chunk (only for aggregator="centered_clip")
    :param min_matchmaking_time: how long a round waits for peers when the group does not fill up
    :param request_timeout: how long to wait for a potential leader's reply (< min_matchmaking_time)
    :param next_chunk_timeout: during an all-reduce, a peer that sends nothing for this long is dropped
    :param min_allreduce_time: an all-reduce that starts close to the round's deadline still gets this long
    :param reducer_options: extra keyword options for the robust reducer (e.g. trim_fraction, max_iter)
    :param signing_key: this peer's identity key (the DHT's, see `statements.signing_key_of`); robust
      aggregators need it: members sign their commitments, parts and results (BTARD)
    :param accusations_key: where robust rounds file accusations (the run's key); None: no checks after
      rounds (commitments are still enforced during them)
    :param check_timeout: how long the checks after a robust round wait for each phase's statements
    :param on_accusations: called (from the checks' thread) with the accusations a round's checks filed,
      e.g. to judge them at once rather than at the next periodic read
    :param on_round: called (from the checks' thread) with each robust round's `btard.RoundRecord` as soon
      as the round's random seed is known, e.g. to validate other members' gradients
    :param fault: a --fault whose `tamper_part` / `tamper_aggregate` hooks run inside the all-reduce
    :param averager_kwargs: extra keyword arguments for hivemind's `DecentralizedAverager`
    """

    def __init__(
        self,
        dht: DHT,
        prefix: str,
        templates: Sequence[torch.Tensor],
        *,
        aggregator: str = "mean",
        tau: float = 1.0,
        min_matchmaking_time: float = 1.0,
        request_timeout: float = 0.5,
        next_chunk_timeout: float | None = None,
        min_allreduce_time: float = 2.0,
        reducer_options: dict[str, Any] | None = None,
        signing_key: Any = None,
        accusations_key: str | None = None,
        check_timeout: float = 15.0,
        on_accusations: Callable[[list[bytes]], None] | None = None,
        on_round: Callable[[Any], None] | None = None,
        fault: Any = None,
        averager_kwargs: dict[str, Any] | None = None,
    ):
        validate_prefix(prefix)
        if aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {aggregator!r}; known: {', '.join(AGGREGATORS)}")
        if not templates:
            raise ValueError("GroupAverager needs at least one template tensor")
        if not request_timeout < min_matchmaking_time:
            # hivemind only warns; matchmaking can deadlock otherwise (matchmaking.py, Matchmaking docstring)
            raise ValueError("request_timeout must be smaller than min_matchmaking_time")
        self.prefix, self.aggregator = prefix, aggregator
        self.min_matchmaking_time = float(min_matchmaking_time)
        self._shapes = [tuple(t.shape) for t in templates]
        self._lock = threading.Lock()
        self._closed = False
        self._signing_key: Any = None
        self._checker: Any = None
        self._part_size_bytes = DEFAULT_PART_SIZE_BYTES
        self._checks = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{prefix}-checks")
        # checks submitted (by rounds, under self._lock) and finished (by the checks' thread): each counter
        # has one writer, so their difference is the backlog without another lock
        self._checks_submitted = self._checks_finished = 0
        self.on_accusations, self.on_round = on_accusations, on_round
        self.last_check: Future | None = None  # the checks after the last robust round: its accusations

        kwargs: dict[str, Any] = dict(
            start=True,
            prefix=prefix,
            min_group_size=2,
            initial_group_bits="",  # one bucket: every member of the group meets every other
            min_matchmaking_time=min_matchmaking_time,
            request_timeout=request_timeout,
            next_chunk_timeout=next_chunk_timeout,
            min_allreduce_time=min_allreduce_time,
            # hivemind defaults to dht.client_mode too, but hivemind.Optimizer gets it backwards: be explicit
            client_mode=dht.client_mode,
            allow_state_sharing=False,  # state download is not this class's job; saves periodic DHT stores
        )
        kwargs.update(averager_kwargs or {})
        averager_class: Callable[..., SwarmDecentralizedAverager] = SwarmDecentralizedAverager
        if aggregator != "mean":
            from hivemind.compression import NoCompression

            from swarm.averaging.reducers import get_reducer
            from swarm.averaging.robust import RobustDecentralizedAverager

            options = dict(reducer_options or {})
            if aggregator == "centered_clip":
                options.setdefault("tau", tau)
            if not isinstance(kwargs.get("compression", NoCompression()), NoCompression):
                # robust reducers refuse compressed parts: every round of this peer would fail
                raise ValueError(f"aggregator {aggregator!r} needs uncompressed parts (no compression)")
            if signing_key is None:
                raise ValueError(
                    f"aggregator {aggregator!r} needs this peer's signing_key (BTARD signs every part)"
                )
            reducer = get_reducer(aggregator, **options)
            averager_class = RobustDecentralizedAverager
            kwargs.update(reducer=reducer, signing_key=signing_key)
            if fault is not None:
                kwargs.update(tamper_part=fault.tamper_part, tamper_aggregate=fault.tamper_aggregate)
            self._signing_key = signing_key
            kwargs.setdefault("part_size_bytes", robust_part_size(templates))
            self._part_size_bytes = int(kwargs["part_size_bytes"])
            if accusations_key is not None:
                from swarm.averaging.btard import RoundChecker

                self._checker = RoundChecker(
                    dht,
                    signing_key,
                    accusations_key,
                    float(options["tau"]) if aggregator == "centered_clip" else None,
                    self._part_size_bytes,
                    timeout=check_timeout,
                    on_seed=on_round,
                )
        local = [t.detach().to("cpu", copy=True) for t in templates]
        self._averager = averager_class(local, dht, **kwargs)

    @property
    def part_size_bytes(self) -> int:
        """The chunk size robust rounds hash and reduce (commitments cover chunks of this size)."""
        return self._part_size_bytes

    @property
    def peer_id(self) -> Any:
        """This averager's libp2p peer id (the DHT's)."""
        return self._averager.peer_id

    def average(
        self,
        tensors: Sequence[torch.Tensor],
        weight: float,
        expected_group_size: int,
        timeout: float,
        round_key: int | None = None,
        banned: Collection[str] = (),
    ) -> AveragingOutcome:
        """Average `tensors` with the group in one round; blocks, never raises on a failed round.

        :param tensors: same shapes as the templates; not modified
        :param weight: the number of samples behind `tensors` (the mean is weighted by it; robust
          aggregators ignore it)
        :param expected_group_size: how many peers the caller believes are in the group now, itself
          included; the round starts as soon as that many have met. <= 1 returns the inputs at once.
        :param timeout: seconds for the whole round (matchmaking plus all-reduce); an all-reduce that starts
          just before the deadline may overrun it by up to `min_allreduce_time`
        :param round_key: only peers that pass the same key meet in this round (e.g. their optimizer step,
          so that members at different steps never average their gradients together); robust rounds
          commit to it
        :param banned: peers this averager refuses to group with, and excludes if they come anyway
        :raises ValueError: on arguments that could never work (wrong shapes, bad weight or timeout)
        """
        inputs = self._check_inputs(tensors)
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight must be a finite number >= 0, got {weight}")
        if expected_group_size <= 1:
            return AveragingOutcome([t.clone() for t in inputs], 1, False)
        if not timeout > self.min_matchmaking_time:
            # hivemind asserts scheduled_time (now + min_matchmaking_time) < deadline (now + timeout)
            raise ValueError(
                f"timeout ({timeout}) must exceed min_matchmaking_time ({self.min_matchmaking_time})"
            )
        if self._closed:
            raise RuntimeError("GroupAverager is shut down")

        with self._lock:
            bits = "" if round_key is None else format(round_key % 2**ROUND_KEY_BITS, f"0{ROUND_KEY_BITS}b")
            return self._run_round(
                inputs, float(weight), int(expected_group_size), float(timeout), bits, round_key or 0, banned
            )

    def _run_round(
        self,
        inputs: list[torch.Tensor],
        weight: float,
        expected_group_size: int,
        timeout: float,
        bits: str,
        step: int,
        banned: Collection[str],
    ) -> AveragingOutcome:
        averager = self._averager
        control = None
        gather, secret = None, b""
        try:
            if self._signing_key is not None:
                from swarm.averaging.btard import commit_round

                gather, secret = commit_round(
                    self._signing_key, self.prefix, step, inputs, self._part_size_bytes
                )
            averager.configure_round(expected_group_size, group_bits=bits, banned=banned)
            with averager.get_tensors() as local:
                for dst, src in zip(local, inputs, strict=True):
                    dst.copy_(src)
            control = averager.step(gather=gather, weight=weight, timeout=timeout, wait=False)
            # the averager process ends the round by itself (deadline + min_allreduce_time): a backstop
            gathered = control.result(timeout=timeout + averager.min_allreduce_time + 5.0)
        except BaseException as e:
            if control is not None and not control.done():
                control.cancel()
            if not isinstance(e, Exception):
                raise
            logger.warning("averaging round in group %s failed: %r", self.prefix, e)
            return AveragingOutcome([t.clone() for t in inputs], 1, False)

        transcript = gathered if self._signing_key is not None else None
        if transcript is not None:
            group_size = len(transcript.senders)
        else:
            group_size = len(gathered) if isinstance(gathered, dict) else 1
        if group_size < 2:
            logger.warning("averaging round in group %s found no other peer", self.prefix)
            return AveragingOutcome([t.clone() for t in inputs], 1, False)
        with averager.get_tensors() as local:
            results = [t.clone() for t in local]
        if not all(all_finite(r) for r in results if r.is_floating_point()):
            # a peer's NaN (or all-zero weights) poisons a plain mean: don't hand that to an optimizer
            logger.warning(
                "averaging round in group %s produced non-finite values; keeping the inputs", self.prefix
            )
            return AveragingOutcome([t.clone() for t in inputs], 1, False)
        results = [r.to(device=x.device, dtype=x.dtype) for r, x in zip(results, inputs, strict=True)]
        if transcript is not None and self._checker is not None:
            from swarm.averaging.btard import RoundRecord

            record = RoundRecord(
                self.prefix, transcript, [t.clone() for t in inputs], [r.clone() for r in results], secret
            )
            if self._checks_submitted - self._checks_finished > MAX_PENDING_CHECKS:
                logger.warning(
                    "BTARD checks of group %s fall behind: skipping those of step %d", self.prefix, step
                )
            else:
                self._checks_submitted += 1
                self.last_check = self._checks.submit(self._check_round, record)
                self.last_check.add_done_callback(self._check_done)
        excluded = list(transcript.excluded) if transcript is not None else []
        return AveragingOutcome(results, group_size, True, excluded)

    def _check_round(self, record: Any) -> list[bytes]:
        accusations = self._checker(record)
        if accusations and self.on_accusations is not None:
            self.on_accusations(accusations)
        return accusations

    def _check_done(self, _: Future) -> None:
        self._checks_finished += 1

    def _check_inputs(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(tensors) != len(self._shapes):
            raise ValueError(f"expected {len(self._shapes)} tensors, got {len(tensors)}")
        inputs = []
        for i, (tensor, shape) in enumerate(zip(tensors, self._shapes, strict=True)):
            if tuple(tensor.shape) != shape:
                raise ValueError(f"tensor {i} has shape {tuple(tensor.shape)}, expected {shape}")
            inputs.append(tensor.detach())
        return inputs

    def shutdown(self) -> None:
        """Stop the averager process (idempotent). The DHT is the caller's and stays up."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            averager = self._averager
            if self._checker is not None:
                self._checker.stopped.set()
            self._checks.shutdown(wait=False, cancel_futures=True)
            if averager.is_alive():
                averager.shutdown()
            averager.join(timeout=averager.shutdown_timeout)

    def __enter__(self) -> GroupAverager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
