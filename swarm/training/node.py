"""A training node: `swarm node --train run.toml` serves one stage of a run with trainable blocks.

It is the same Node (DHT, P2P, handlers, limits, announcer, clean shutdown) with a trainable backend,
a stage record instead of block records, a state servicer for joiners and exports, and the loop that
steps the stage's optimizer together with the stage's other peers.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from swarm.averaging import GroupAverager
from swarm.dht.announcer import RecordAnnouncer, store_records
from swarm.dht.keys import stage_key
from swarm.dht.swarm_view import live_records, read_stage
from swarm.models.span import load_span
from swarm.node.config import NodeConfig
from swarm.node.handler import NodeServicer
from swarm.node.server import Node
from swarm.proto import swarm_pb2
from swarm.testing.faults import Fault
from swarm.training.bans import RunBans, accusations_key
from swarm.training.collaboration import Collaboration, MemberView, poll_members
from swarm.training.disputes import CannotSettle, GradientDisputeService, settle
from swarm.training.run import LoadedRun, group_prefix
from swarm.training.stage import TrainableSpanBackend
from swarm.training.state import TrainState, TrainStateServicer, fetch_state
from swarm.training.validation import GradientValidator, GroupValidation, sign_reply
from swarm.verification.gradient_dispute import describe

logger = logging.getLogger(__name__)

STEP_CHECK_PERIOD = 0.1  # seconds between checks whether the stage reached its target batch
VIEW_REFRESH_PERIOD = 0.3  # seconds between re-reads of the stage's records
PROGRESS_INTERVAL = 0.2  # the stage record is re-published at most this often while samples come in
STATE_TIMEOUT = 120.0
MEMBER_KEEP_FOR = 3.0  # seconds a stage peer that stopped answering still counts as a member
DISPUTE_TIMEOUT = 30.0  # seconds a party of a gradient dispute has to commit or answer a round


class TrainingNode(Node):
    """Serves stage `stage` of a run (or the stage with the least throughput when None)."""

    def __init__(
        self, config: NodeConfig, run: LoadedRun, stage: int | None = None, fault: Fault | None = None
    ):
        super().__init__(config)
        self.fault = fault
        if config.dtype != "float32":
            raise ValueError("training nodes keep fp32 weights: use --dtype float32")
        if stage is not None and not 0 <= stage < run.config.num_stages:
            raise ValueError(f"--stage {stage} is outside the run's {run.config.num_stages} stages")
        self.training_run, self.stage = run, stage
        self.collaboration: Collaboration | None = None
        self.averager: GroupAverager | None = None
        self._members = MemberView(keep_for=MEMBER_KEEP_FOR)
        self._member_ids: list[str] = []
        self.validation: GroupValidation | None = None
        self._loaded_from: tuple[int, str] | None = None  # (step, donor) of the state this peer joined with
        self._loop: asyncio.AbstractEventLoop | None = None

    @staticmethod
    def _check_placement(config: NodeConfig) -> None:
        if config.blocks is not None or config.num_blocks is not None:
            raise ValueError("a training node serves its run's stage: no --blocks or --num-blocks")

    @property
    def run_config(self):
        return self.training_run.config

    # ---- joining ------------------------------------------------------------------------------------------

    def _read_stage(self, stage: int, records: dict | None = None) -> list[swarm_pb2.StageInfo]:
        records = read_stage(self.dht, self.run_config.run_id, stage) if records is None else records
        return [
            info for info in live_records(records, self.training_run.sha256) if info.peer_id != self.peer_id
        ]

    def _choose_stage(self) -> int:
        """The stage with the least total throughput (then the fewest peers, then the lowest index)."""
        totals = []
        for stage in range(self.run_config.num_stages):
            peers = self._read_stage(stage)
            totals.append((sum(p.throughput for p in peers), len(peers), stage))
        return min(totals)[2]

    async def _join(self) -> None:
        run = self.run_config
        if self.block_hashes != list(run.model.block_hashes):
            raise ValueError(
                f"the checkpoint's block hashes differ from the run file's: {self.config.model} is not the "
                "model this run starts from"
            )
        if self.stage is None:
            self.stage = await asyncio.to_thread(self._choose_stage)
            logger.info("joining stage %d, the one with the least throughput", self.stage)
        self.blocks = tuple(run.stages[self.stage])
        donors = await asyncio.to_thread(self._read_stage, self.stage)
        self.backend = await asyncio.to_thread(self._load_trainable_backend)
        if donors:
            await self._load_state_from(donors)
        else:
            logger.info("no live peer in stage %d: starting from the checkpoint's weights", self.stage)

    def _load_trainable_backend(self) -> TrainableSpanBackend:
        start, end = self.blocks
        span = load_span(self.checkpoint, start, end, dtype=torch.float32, device=self.config.device)
        return TrainableSpanBackend(
            span,
            self.config.limits,
            self.config.device,
            self.run_config.optimizer,
            run_hash=self.training_run.sha256,
            stage=self.stage,
            fault=self.fault,
        )

    async def _load_state_from(self, donors: list[swarm_pb2.StageInfo]) -> None:
        """Take parameters, optimizer state and step from a live peer; refuse to train if none answers."""
        errors = []
        for donor in sorted(donors, key=lambda d: -d.step):
            try:
                state = await fetch_state(
                    self.p2p, donor.peer_id, self.training_run.sha256, True, STATE_TIMEOUT
                )
                await self.backend.run_on_compute_thread(self.backend.load, state)
                loaded = await self.backend.run_on_compute_thread(self.backend.trainable.state, True)
                if loaded.hash() != state.hash():
                    raise RuntimeError("the loaded state's hash differs from the donor's")
                logger.info("loaded stage %d at step %d from %s", self.stage, state.step, donor.peer_id)
                self._loaded_from = (state.step, donor.peer_id)
                return
            except Exception as e:
                logger.warning("loading state from %s failed: %r", donor.peer_id, e)
                errors.append(f"{donor.peer_id}: {e}")
        raise RuntimeError(
            f"stage {self.stage} has live peers but none sent its state ({'; '.join(errors)}); "
            "refusing to train from this node's own weights"
        )

    async def _referee(
        self, accused: str, accuser: str, contribution, weights
    ) -> tuple[str | None, str] | None:
        """Settle a "bad_gradient" accusation in this stage by the bisection game (None: it couldn't be
        played; the validator recomputes the whole gradient instead)."""
        try:
            verdict, layout = await settle(
                self.backend,
                self.p2p,
                self.training_run.sha256,
                accused,
                accuser,
                contribution,
                weights,
                DISPUTE_TIMEOUT,
            )
        except CannotSettle as e:
            logger.info("the dispute between %s and %s is settled by recomputation: %s", accuser, accused, e)
            return None
        where = describe(verdict, layout, self.blocks[0], self.backend.trainable.names)
        cost = f"{verdict.rounds} rounds, {verdict.bytes_moved} bytes"
        if "a" in verdict.losers:
            why = f"lost the gradient dispute: {_lost(verdict.reasons['a'], where, 'a')}; {cost}"
            logger.warning("bisection: %s %s", accused, why)
            return accused, why
        why = f"its accusation lost the gradient dispute: {_lost(verdict.reasons['b'], where, 'b')}; {cost}"
        logger.warning("bisection: %s %s", accuser, why)
        return None, why

    # ---- serving ------------------------------------------------------------------------------------------

    def stage_info(self, state: int | None = None) -> swarm_pb2.StageInfo:
        start, end = self.blocks
        backend: TrainableSpanBackend | None = self.backend
        return swarm_pb2.StageInfo(
            state=self.state if state is None else state,
            peer_id=self.peer_id,
            run_id=self.run_config.run_id,
            run_hash=self.training_run.sha256,
            stage=self.stage,
            start_block=start,
            end_block=end,
            throughput=backend.throughput if backend else 0.0,
            queue_length=backend.queue_length if backend else 0,
            step=backend.trainable.step if backend else 0,
            samples=backend.trainable.announced_samples if backend else 0,
            state_hash=backend.trainable.params_hash if backend else "",
            fingerprint=backend.trainable.fingerprint if backend else [],
        )

    def _publish(self, expiration: float, final: bool) -> None:
        info = self.stage_info()
        key = stage_key(self.run_config.run_id, self.stage)
        store_records(
            self.dht, self.owner_key, self.peer_id, [(key, info)], expiration, await_all_replicas=final
        )

    def _progress(self) -> tuple[int, int, list[float]]:
        trainable = self.backend.trainable
        return trainable.step, trainable.announced_samples, trainable.fingerprint

    def _judge_refusal(self, peer: str) -> str | None:
        if self.validation is None:
            return "this peer has not joined its averaging group yet"
        return self.validation.judge_refusal(peer)

    async def _get_state(self, with_optimizer: bool) -> TrainState:
        return await self.backend.run_on_compute_thread(self.backend.trainable.state, with_optimizer)

    async def _start_serving(self) -> None:
        config, run = self.config, self.run_config
        self._loop = asyncio.get_running_loop()
        self.bans = RunBans(self.dht, self.p2p, self.training_run, self.peer_id, self.signing_key)
        self.servicer = NodeServicer(self.backend, self.server_info, self.model_info(), self.stage_info)
        self.servicer.refuse_peer = self.bans.refusal
        self.servicer.metrics.banned_peers = lambda: len(self.bans.banned())
        run_hash, key, stage = self.training_run.sha256, self.signing_key, self.stage
        self.servicer.sign_reply = lambda call, inputs, output: sign_reply(
            key, run_hash, stage, call, inputs.hidden_states, output
        )
        await self._add_servicer(self.servicer)
        state_servicer = TrainStateServicer(
            self.training_run.sha256, self._get_state, self._progress, self.backend.log.get
        )
        state_servicer.refuse_peer = self.bans.refusal
        state_servicer.disputes = GradientDisputeService(
            self.backend,
            self.p2p,
            run_hash,
            self.peer_id,
            key,
            fault=self.fault,
            judge_refusal=self._judge_refusal,
        )
        await self._add_servicer(state_servicer)
        averaging = run.averaging
        self.averager = await asyncio.to_thread(
            GroupAverager,
            self.dht,
            group_prefix(self.training_run, f"stage{self.stage}"),
            [p.detach() for p in self.backend.trainable.params],
            aggregator=averaging.aggregator,
            tau=averaging.tau,
            min_matchmaking_time=averaging.matchmaking_time,
            request_timeout=averaging.request_timeout,
            signing_key=self.signing_key,
            accusations_key=accusations_key(self.training_run),
            on_accusations=self.bans.add_local,
            on_round=lambda record: self.validation.on_round(record),
            fault=self.fault,
        )
        validator = GradientValidator(
            self.backend,
            self.p2p,
            self.training_run.sha256,
            self.averager.prefix,
            self.averager.part_size_bytes,
        )
        validator.referee = self._referee
        self.validation = GroupValidation(
            validator, self.bans, self.dht, self.signing_key, self.peer_id, averaging.validators, self._loop
        )
        if self._loaded_from is not None:
            self.validation.loaded_state(*self._loaded_from)
        trainable = self.backend.trainable
        self.collaboration = Collaboration(
            f"stage {self.stage}",
            self.peer_id,
            run.batch.target_batch_size,
            progress=lambda: (self.backend.trainable.step, self.backend.trainable.samples),
            members=self._members,
            take=lambda: self.backend.run_on_compute_thread(self.backend.take_gradients),
            apply=lambda grads: self.backend.run_on_compute_thread(self.backend.apply, grads),
            averager=self.averager,
            averaging_timeout=averaging.averaging_timeout,
            own_fingerprint=lambda: trainable.fingerprint,
            resync=self._resync,
            corrupt=self.fault.corrupt_gradients if self.fault is not None else None,
            banned=self.bans.banned,
            suspected=self.bans.suspected,
            on_sent=self.backend.log.record_sent,
        )
        self.state = swarm_pb2.ServerInfo.ONLINE
        self.announcer = RecordAnnouncer(self._publish, config.update_period, min_interval=PROGRESS_INTERVAL)
        self.backend.on_accumulate = self.announcer.announce_now
        self.announcer.start()
        self._tasks.append(asyncio.create_task(self._watch_stage()))
        self._tasks.append(asyncio.create_task(self._step_loop()))
        self._tasks.append(asyncio.create_task(self.bans.run()))
        self._tasks.append(
            asyncio.create_task(
                poll_members(self._members, self.p2p, self.training_run.sha256, lambda: self._member_ids)
            )
        )
        logger.info(
            "training node %s serving blocks [%d, %d) as stage %d of run %s at step %d on %s",
            self.peer_id,
            *self.blocks,
            self.stage,
            run.run_id,
            self.backend.trainable.step,
            " ".join(str(m) for m in self.dht.get_visible_maddrs()),
        )

    async def _watch_stage(self) -> None:
        """Keep the other peers' progress fresh for the step decision."""
        while True:
            try:
                records = await asyncio.to_thread(read_stage, self.dht, self.run_config.run_id, self.stage)
                banned = self.bans.banned()
                self._member_ids = [
                    p.peer_id for p in self._read_stage(self.stage, records) if p.peer_id not in banned
                ]
            except Exception as e:
                logger.debug("reading stage %d failed: %r", self.stage, e)
            await asyncio.sleep(VIEW_REFRESH_PERIOD)

    async def _step_loop(self) -> None:
        while True:
            try:
                report = await self.collaboration.maybe_step()
                if report is not None:
                    self.announcer.announce_now()
            except Exception as e:
                logger.warning("stage %d step failed: %r", self.stage, e, exc_info=True)
            await asyncio.sleep(STEP_CHECK_PERIOD)

    async def _resync(self, peer_id: str) -> None:
        """Replace this peer's parameters, optimizer state and step with another stage peer's."""
        state = await fetch_state(self.p2p, peer_id, self.training_run.sha256, True, STATE_TIMEOUT)
        await self.backend.run_on_compute_thread(self.backend.load, state)
        if self.validation is not None:
            self.validation.loaded_state(state.step, peer_id)
        self.announcer.announce_now()

    def _stop_announcer(self) -> None:
        self.announcer.stop(final=True)
        if self.averager is not None:
            self.averager.shutdown()


def _lost(reason: str, where: str, party: str) -> str:
    """Why a party lost a gradient dispute, in words."""
    if reason == "wrong_leaf":
        return f"wrong_leaf, {where}"
    if reason == "contradiction":
        what = "does not end in the gradient it sent" if party == "a" else "ends in the gradient it accused"
        return f"contradiction, its trace {what}"
    return {
        "silent": "silent",
        "bad_proof": "a proof that fails",
        "bad_tensor": "tensors it did not commit to",
    }.get(reason, reason)
