"""Peers of one group (a stage, or the trainers) step together once the group has processed the target batch.

Every member publishes its step and the samples it has accumulated toward the next step (in its DHT
record). When the samples of the members at our step reach the target, each of them takes its mean
gradients, averages them with the others (weighted by samples) and steps. A member whose round fails
steps on its own gradients and says so in the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from swarm.averaging import GroupAverager
from swarm.training.state import fetch_progress
from swarm.training.trainable import fingerprints_agree

logger = logging.getLogger(__name__)

MAX_ROUNDS = 3  # averaging attempts per step while other members are still at it


@dataclass(frozen=True)
class MemberProgress:
    """What a member of the group last announced."""

    peer_id: str
    step: int
    samples: int
    fingerprint: tuple[float, ...] = ()  # of its parameters at `step` (see trainable.fingerprints_agree)


class MemberView:
    """The other members as last read from the DHT, keeping a member that a read missed for a while.

    A DHT read under load can come back without records that are still alive; a member that vanished
    for one read would make us step alone and split the group. A member stays until it has been
    missing for `keep_for` seconds (about its records' expiration).
    """

    def __init__(self, keep_for: float):
        self.keep_for = keep_for
        self._members: dict[str, tuple[MemberProgress, float]] = {}

    def update(self, members: list[MemberProgress], gone: set[str] = frozenset()) -> None:
        """Fold in a fresh read; `gone` are members known to have left (OFFLINE)."""
        now = time.monotonic()
        for member in members:
            self._members[member.peer_id] = (member, now)
        for peer_id in list(self._members):
            if peer_id in gone or now - self._members[peer_id][1] > self.keep_for:
                del self._members[peer_id]

    def __call__(self) -> list[MemberProgress]:
        return [member for member, _ in self._members.values()]


async def poll_members(
    view: MemberView,
    p2p,
    run_hash: str,
    member_ids: Callable[[], list[str]],
    period: float = 0.1,
    timeout: float = 2.0,
) -> None:
    """Keep `view` fresh by asking each member for its progress directly, every `period` seconds.

    Membership comes from the DHT (it changes slowly); progress changes many times a second, and a DHT
    record of it lags by a step or two under load, which would split the group.
    """
    while True:
        ids = member_ids()
        results = await asyncio.gather(
            *(fetch_progress(p2p, peer, run_hash, timeout) for peer in ids), return_exceptions=True
        )
        view.update(
            [
                MemberProgress(peer, step, samples, tuple(fingerprint))
                for peer, result in zip(ids, results, strict=True)
                if not isinstance(result, BaseException)
                for step, samples, fingerprint in [result]
            ]
        )
        await asyncio.sleep(period)


@dataclass
class StepReport:
    """One step this member took."""

    step: int  # the step number after it
    samples: int  # this member's samples in it
    group_samples: int  # the group's samples in it, as announced when it started
    group_size: int  # members that averaged (1: alone)
    averaging_s: float


class Collaboration:
    """Decides when this member steps and runs the averaging round.

    `progress()` gives this member's (step, samples); `members()` the other members' last records;
    `take()` returns the mean gradients and their sample count (and starts a new accumulation);
    `apply(grads)` steps the optimizer. `take` and `apply` run where the parameters live.
    """

    def __init__(
        self,
        name: str,
        own_id: str,
        target_batch_size: int,
        progress: Callable[[], tuple[int, int]],
        members: Callable[[], list[MemberProgress]],
        take: Callable[[], Awaitable[tuple[list[torch.Tensor], int]]],
        apply: Callable[[list[torch.Tensor]], Awaitable[None]],
        averager: GroupAverager | None,
        averaging_timeout: float,
        own_fingerprint: Callable[[], list[float]] = list,
        resync: Callable[[str], Awaitable[None]] | None = None,
        corrupt: Callable[[list[torch.Tensor], int], list[torch.Tensor]] | None = None,
        banned: Callable[[], set[str]] = set,
        on_sent: Callable[[int, list[torch.Tensor]], None] | None = None,
        suspected: Callable[[], set[str]] = set,
    ):
        self.name, self.own_id, self.target = name, own_id, target_batch_size
        self.banned = banned  # peers banned from the run: never counted, waited for or averaged with
        self.progress, self.take, self.apply = progress, take, apply
        self.members = lambda: [m for m in members() if m.peer_id not in banned()]
        self.own_fingerprint, self.resync = own_fingerprint, resync
        self.suspected = suspected  # peers accused and not judged yet: never a donor of weights
        self.corrupt = corrupt  # a --fault's hook: what this member sends instead of its gradients
        self.on_sent = on_sent  # told (step, gradients) of what this member hands to the averager
        self.resyncs = 0
        self.averager, self.averaging_timeout = averager, averaging_timeout
        self._lock = asyncio.Lock()
        self.history: list[StepReport] = []
        self._last_step_time = 0.0

    def peers_at_step(self) -> tuple[int, list[MemberProgress]]:
        """Our step and the other members at it."""
        step, _ = self.progress()
        return step, [m for m in self.members() if m.step == step]

    def expected_peers(self) -> list[MemberProgress]:
        """Members that should average with us: at our step, or one behind in our view (their record may
        be older than their last step, which was ours too)."""
        step, _ = self.progress()
        return [m for m in self.members() if step - 1 <= m.step <= step]

    def group_samples(self) -> int:
        _, samples = self.progress()
        _, peers = self.peers_at_step()
        return samples + sum(m.samples for m in peers)

    def ready(self) -> bool:
        return self.group_samples() >= self.target

    async def maybe_step(self) -> StepReport | None:
        """Step if the group reached the target (at most one step at a time); first, catch up with the
        group if this member's parameters went astray."""
        if self._lock.locked():
            return None
        async with self._lock:
            await self._maybe_resync()
            if not self.ready():
                return None
            return await self._step()

    def reference(self) -> MemberProgress | None:
        """The member to copy from, or None when this member agrees with its group.

        Among members at our step, the weights most of them agree on win (ties: those of the smallest
        peer id). A member ahead of us stepped without us (our round failed or came too late): copy the
        furthest, so the group trains one set of weights again.
        """
        if self.resync is None:
            return None
        step, _ = self.progress()
        # an accused peer may be the one whose weights went astray (or one that serves poisoned state):
        # while its accusation is being judged, it is neither copied nor counted as agreeing
        suspected = self.suspected()
        members = [m for m in self.members() if m.peer_id not in suspected and m.fingerprint]
        ahead = [m for m in members if m.step > step]
        if ahead:
            return max(ahead, key=lambda m: (m.step, m.peer_id))
        mine = MemberProgress(self.own_id, step, 0, tuple(self.own_fingerprint()))
        group = [m for m in members if m.step == step] + [mine]
        if all(fingerprints_agree(list(m.fingerprint), list(mine.fingerprint)) for m in group):
            return None
        # clusters of members that agree with each other's weights; the biggest (then the smallest id) wins
        clusters: list[list[MemberProgress]] = []
        for member in sorted(group, key=lambda m: m.peer_id):
            for cluster in clusters:
                if fingerprints_agree(list(cluster[0].fingerprint), list(member.fingerprint)):
                    cluster.append(member)
                    break
            else:
                clusters.append([member])
        winner = max(clusters, key=lambda c: (len(c), [-ord(ch) for ch in c[0].peer_id]))
        if any(m.peer_id == self.own_id for m in winner):
            return None
        return winner[0]

    async def _maybe_resync(self) -> None:
        donor = self.reference()
        if donor is None:
            return
        logger.warning(
            "%s: parameters differ from the group's at step %d; loading them from %s (step %d)",
            self.name,
            self.progress()[0],
            donor.peer_id,
            donor.step,
        )
        try:
            await self.resync(donor.peer_id)
            self.resyncs += 1
        except Exception as e:
            logger.warning("%s: loading state from %s failed: %r", self.name, donor.peer_id, e)

    async def _step(self) -> StepReport:
        group_samples = self.group_samples()
        peers = self.expected_peers()
        grads, samples = await self.take()
        if self.corrupt is not None:
            grads = self.corrupt(grads, self.progress()[0])
        if self.on_sent is not None:
            self.on_sent(self.progress()[0], grads)
        started = time.perf_counter()
        group_size = 1
        for attempt in range(1, MAX_ROUNDS + 1):
            if self.averager is None or not peers:
                break
            outcome = await asyncio.to_thread(
                self.averager.average,
                grads,
                float(max(samples, 1e-3)),  # a member with no samples still steps with the group
                len(peers) + 1,
                self.averaging_timeout,
                self.progress()[0],  # members at other steps never join this round
                self.banned(),
            )
            if outcome.ok:
                grads, group_size = outcome.tensors, outcome.group_size
                break
            # a member that is still at our step will come (it saw the target late): try again; members
            # that are gone or moved on can't, and stepping alone keeps training going
            peers = self.expected_peers()
            logger.warning(
                "%s: averaging round %d failed; %s",
                self.name,
                attempt,
                f"{len(peers)} peers still at this step" if peers else "stepping alone",
            )
        averaging_s = time.perf_counter() - started
        await self.apply(grads)
        step, _ = self.progress()
        report = StepReport(step, samples, group_samples, group_size, averaging_s)
        self.history.append(report)
        now = time.monotonic()
        rate = samples / max(now - self._last_step_time, 1e-9) if self._last_step_time else 0.0
        self._last_step_time = now
        logger.info(
            "%s: step %d (%d of the group's %d samples here, %.1f samples/s; %d peers averaged in %.2f s)",
            self.name,
            step,
            samples,
            group_samples,
            rate,
            group_size,
            averaging_s,
        )
        return report
