"""The run's bans: accusations that robust averaging rounds file, judged by every member for itself.

Every stage peer, trainer and `swarm run status` reads the run's accusations from the DHT and re-checks
each one before honouring it (`swarm.averaging.accusations`): a proven accusation bans the accused, a
false one bans the accuser. A "bad_gradient" accusation takes a recomputation with the stage's weights:
the members of the accused's group recompute it and publish signed verdicts, and everyone else follows
the majority of the verdicts of that group's other members: the round's, and those live in the group now
(a member that missed the round still holds the weights to recompute it; `swarm.training.validation`).
A banned peer is left out of averaging, its calls are refused and trainers stop routing to it.
"""

from __future__ import annotations

import asyncio
import logging

from hivemind.dht import DHT

from swarm.averaging.accusations import BAD_GRADIENT, GOOD_FAITH, BanList, Verdict
from swarm.averaging.btard import (
    ACCUSATION_TTL,
    EvidenceUnavailable,
    read_accusations,
    read_statements,
    recheck_aggregate,
    store_statement,
)
from swarm.averaging.reducers import get_reducer
from swarm.averaging.statements import InvalidStatement, digest, open_statement
from swarm.dht.swarm_view import read_stage, read_trainers
from swarm.proto import swarm_pb2
from swarm.training.run import TRAINERS_GROUP, LoadedRun, group_of_prefix
from swarm.training.validation import (
    CANNOT_JUDGE,
    VERDICT_TAG,
    CannotJudge,
    ContributionUnavailable,
    NotOurGroup,
    majority_verdict,
    round_members,
    verdict_statement,
)

logger = logging.getLogger(__name__)

REFRESH_PERIOD = 2.0  # seconds between reads of the run's accusations
DHT_TIMEOUT = 10.0  # seconds a read of a group's members may take
MAX_RECHECK_ATTEMPTS = 5  # an accused reducer that can't show its evidence this many times is guilty


def accused_in(blob: bytes) -> str:
    """Whom a signed accusation accuses ("" if it is not one)."""
    try:
        _, payload = open_statement(blob)
    except InvalidStatement:
        return ""
    accused = payload.get("accused") if payload.get("kind") == "accusation" else None
    return accused if isinstance(accused, str) else ""


def accusations_key(run: LoadedRun) -> str:
    """The DHT key of a run's accusations (one per run file: other runs' quarrels are not ours)."""
    return f"{run.config.run_id}_{run.sha256[:16]}_accusations"


class RunBans:
    """Judges the run's accusations and keeps the resulting bans (for as long as this process lives).

    :param p2p: a hivemind P2P of this process (re-checks ask the accused reducer for its evidence)
    :param signing_key: this peer's identity key, to sign its verdicts on "bad_gradient" accusations
    """

    def __init__(self, dht: DHT, p2p, run: LoadedRun, own_id: str = "", signing_key=None):
        self.dht, self.p2p, self.key, self.own_id = dht, p2p, accusations_key(run), own_id
        self.training_run = run
        self.signing_key = signing_key
        # stage peers: recomputes the gradient a "bad_gradient" accusation is about, returning (guilty or
        # None, why); raises CannotJudge (not this stage, weights gone) or ContributionUnavailable
        self.gradient_judge = None
        # stage peers and trainers: holds the weights an accusation about its group's rounds needs, from when
        # this peer first sees it, so that they don't roll out while it is judged
        self.gradient_hold = None
        averaging = run.config.averaging
        self.tau = float(averaging.tau) if averaging.aggregator == "centered_clip" else None
        options = {"tau": averaging.tau} if averaging.aggregator == "centered_clip" else {}
        reducer = get_reducer(averaging.aggregator, **options) if averaging.aggregator != "mean" else None
        self._reduce = (lambda x: reducer(x, None)) if reducer is not None else None
        self.list = BanList(recheck=self._recheck)
        self._attempts: dict[tuple, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        # accusations this peer filed, judged even before the DHT has them
        self._local: dict[bytes, bytes] = {}
        self._suspected: set[str] = set()  # accused in accusations not judged yet
        # accusation (hex digest) -> this member's signed "can't judge" (b"": unsigned), until it is settled
        self._unable: dict[str, bytes] = {}

    def _attempt(self, accusation: dict) -> int:
        key = (accusation.get("accuser"), accusation["accused"], accusation["step"], accusation["chunk"])
        self._attempts[key] = self._attempts.get(key, 0) + 1
        return self._attempts[key]

    async def _recheck(self, accusation: dict) -> tuple[str | None, str]:
        if accusation["reason"] == BAD_GRADIENT:
            return await self._recheck_gradient(accusation)
        if self._reduce is None:
            raise EvidenceUnavailable("this run averages with the plain mean: nothing to re-check")
        if accusation["accused"] == self.own_id:  # libp2p can't dial itself; the other members judge it
            logger.warning("this peer is accused of a bad aggregate of chunk %s", accusation["chunk"])
            return GOOD_FAITH, "a peer does not judge accusations against itself"
        attempt = self._attempt(accusation)
        try:
            return await recheck_aggregate(self.p2p, self.dht, accusation, self._reduce, self.tau)
        except EvidenceUnavailable as e:
            if attempt >= MAX_RECHECK_ATTEMPTS and "did not answer" in str(e):
                return accusation["accused"], f"did not show the evidence of chunk {accusation['chunk']}"
            raise

    async def _recheck_gradient(self, accusation: dict) -> tuple[str | None, str]:
        accused = accusation["accused"]
        if self.gradient_hold is not None:
            self.gradient_hold(accusation)  # as accused too: judges ask it for its contribution and traces
        if accused == self.own_id:
            logger.warning("this peer is accused of a bad gradient at step %s", accusation["step"])
            return GOOD_FAITH, "a peer does not judge accusations against itself"
        unable = self._unable.get(accusation["accusation"])
        if self.gradient_judge is not None and unable is None:
            try:
                guilty, why = await self.gradient_judge(accusation)
            except NotOurGroup:
                pass
            except CannotJudge as e:
                logger.info("following the verdicts of the round's members on %s: %s", accused, e)
                # said once: followers then know this member's verdict is not coming
                unable = await asyncio.to_thread(self._publish_verdict, accusation, CANNOT_JUDGE)
                self._unable[accusation["accusation"]] = unable or b""
            except ContributionUnavailable as e:
                # busy, or hiding it from this member: the verdicts of the group's other members decide
                # as soon as they are in, instead of after this member's own attempts run out
                found = await self._group_verdict(accusation)
                if found is None:
                    raise EvidenceUnavailable(f"{e}; no majority of the group's verdicts yet") from e
                logger.info("%s did not show its contribution; following its group's verdicts", accused)
                return found
            else:
                await asyncio.to_thread(self._publish_verdict, accusation, guilty)
                return guilty, why
        found = await self._group_verdict(accusation, unable or None)
        if found is None:
            raise EvidenceUnavailable("waiting for the verdicts of the group's other members")
        self._unable.pop(accusation["accusation"], None)
        if found[0] == GOOD_FAITH:
            logger.warning("settling the accusation against %s without a ban: %s", accused, found[1])
        return found

    async def _group_verdict(
        self, accusation: dict, own: bytes | None = None
    ) -> tuple[str | None, str] | None:
        """The majority of the published verdicts of the accused group's other members (the accused
        round's, and those live in the group now), or None while there is none. `own`: this member's
        verdict, counted whether or not its DHT store went through."""
        tag = f"{VERDICT_TAG}-{accusation['accusation'][:16]}"
        verdicts = await asyncio.to_thread(read_statements, self.dht, self.key, tag)
        if own is not None:
            verdicts[self.own_id] = own
        voters = round_members(accusation)
        if verdicts:
            voters |= await asyncio.to_thread(self._live_members, accusation["prefix"])
        return majority_verdict(accusation, verdicts, voters)

    def _live_members(self, prefix: str) -> set[str]:
        """The peers announced live in the averaging group `prefix` names (empty: not a group of this run)."""
        group = group_of_prefix(self.training_run, prefix)
        try:
            if group == TRAINERS_GROUP:
                records = read_trainers(self.dht, self.training_run.config.run_id, DHT_TIMEOUT)
            elif group is not None and group.startswith("stage") and group[5:].isdigit():
                records = read_stage(self.dht, self.training_run.config.run_id, int(group[5:]), DHT_TIMEOUT)
            else:
                return set()
        except Exception as e:
            logger.debug("reading the members of %s failed: %r", prefix, e)
            return set()
        online = swarm_pb2.ServerInfo.ONLINE
        return {
            peer_id
            for peer_id, info in records.items()
            if info.state == online
            and info.run_hash == self.training_run.sha256
            and not self.list.is_banned(peer_id)
        }

    def _publish_verdict(self, accusation: dict, guilty: str | None) -> bytes | None:
        """Sign and store this member's verdict (the guilty peer, or CANNOT_JUDGE); returns it."""
        if self.signing_key is None:
            return None
        blob = verdict_statement(self.signing_key, accusation["accusation"], guilty or accusation["accuser"])
        tag = f"{VERDICT_TAG}-{accusation['accusation'][:16]}"
        try:
            store_statement(self.dht, self.key, tag, self.signing_key, blob, ACCUSATION_TTL)
        except Exception as e:
            logger.warning("publishing a verdict failed: %r", e)
        return blob

    async def refresh(self) -> list[Verdict]:
        """Judge accusations not judged yet; returns the new bans."""
        try:
            blobs = await asyncio.to_thread(read_accusations, self.dht, self.key)
        except Exception as e:
            logger.debug("reading accusations failed: %r", e)
            blobs = []
        stored = {digest(blob) for blob in blobs}
        blobs += [blob for key, blob in list(self._local.items()) if key not in stored]
        verdicts, suspected = [], set()
        for blob in blobs:
            try:
                verdict = await self.list.consider(blob)
            except EvidenceUnavailable as e:
                logger.info("accusation not judged yet: %s", e)
                suspected.add(accused_in(blob))
                continue
            except Exception as e:
                logger.warning("judging an accusation failed: %r", e)
                continue
            if verdict is not None:
                verdicts.append(verdict)
                if verdict.guilty == self.own_id:
                    logger.error("this peer was banned from the run: %s", verdict.reason)
        self._suspected = suspected - {"", self.own_id}
        return verdicts

    async def run(self, period: float = REFRESH_PERIOD) -> None:
        """Refresh forever (a background task): every `period` seconds, or at once after `wake()`."""
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        while True:
            self._wake.clear()
            await self.refresh()
            try:
                await asyncio.wait_for(self._wake.wait(), period)
            except TimeoutError:
                pass

    def add_local(self, accusations: list[bytes]) -> None:
        """Judge accusations this peer filed now, whether or not their DHT stores went through yet
        (thread-safe; e.g. a robust round's checks filed them)."""
        for blob in accusations:
            self._local[digest(blob)] = blob
        self.wake()

    def wake(self, *_: object) -> None:
        """Judge new accusations now (thread-safe; e.g. right after this member filed some)."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def banned(self) -> set[str]:
        return self.list.banned()

    def suspected(self) -> set[str]:
        """Peers accused in accusations this member could not judge yet (waiting for evidence or for the
        verdicts of the accused's group): not banned, but not a peer to copy weights from either."""
        return set(self._suspected)

    def refusal(self, peer_id: str) -> str | None:
        """Why `peer_id` may not talk to this member (None: it may)."""
        if not self.list.is_banned(peer_id):
            return None
        return f"{peer_id} is banned from this run"

    def as_json(self) -> list[dict]:
        """The bans as `swarm run status --json` shows them."""
        return [{"peer_id": v.guilty, "reason": v.reason, "round": v.step} for v in self.list.bans()]
