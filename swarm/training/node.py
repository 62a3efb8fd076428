"""A training node: `swarm node --train run.toml` serves one stage of a run with trainable blocks.

It is the same Node (DHT, P2P, handlers, limits, announcer, clean shutdown) with a trainable backend,
a stage record instead of block records, a state servicer for joiners and exports, and the loop that
steps the stage's optimizer together with the stage's other peers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
from collections.abc import Callable

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
from swarm.training.balance import StagePeer, choose_stage, move_pays, plan_move, with_moves
from swarm.training.bans import RunBans, accusations_key
from swarm.training.collaboration import Collaboration, MemberView, poll_members
from swarm.training.disputes import CannotSettle, GradientDisputeService, settle
from swarm.training.recovery import (
    CHECKFREE_BOOST_STEPS,
    CHECKFREE_LR_FACTOR,
    Neighbour,
    checkfree_weights,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
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
DEFAULT_CHECKPOINT_EVERY = 50  # steps between checkpoints of a node given a checkpoint folder


class TrainingNode(Node):
    """Serves stage `stage` of a run (or the stage with the least throughput when None).

    `checkpoint_dir`: save the stage's state there every `checkpoint_every` steps, and rebuild a lost stage
    from it (see `swarm.training.recovery`)."""

    def __init__(
        self,
        config: NodeConfig,
        run: LoadedRun,
        stage: int | None = None,
        fault: Fault | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    ):
        super().__init__(config)
        if checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be a positive number of steps, got {checkpoint_every}")
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
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
        self.bans: RunBans | None = None
        self.state_servicer: TrainStateServicer | None = None
        self._stage_tasks: list[asyncio.Task] = []  # the current stage's loops, restarted by a move
        self._serving_lock = threading.Lock()  # stage, blocks and backend change together (a move)
        self.moves = 0

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

    def _stage_peers(
        self, counts_move: Callable[[str], bool] = lambda peer_id: True
    ) -> list[list[StagePeer]]:
        """Every stage's live peers as `swarm.training.balance` sees them (this node with its own current
        figures, in its stage once it serves one; peers banned from the run left out), each peer that
        announced a move (JOINING in another stage) counted where it is going if `counts_move(peer_id)`."""
        banned = self.bans.banned() if self.bans is not None else set()
        run_hash, joining = self.training_run.sha256, swarm_pb2.ServerInfo.JOINING
        stages, moving = [], []
        for stage in range(self.run_config.num_stages):
            records = read_stage(self.dht, self.run_config.run_id, stage)
            peers = [
                StagePeer(info.peer_id, info.throughput, info.queue_length)
                for info in self._read_stage(stage, records)
                if info.peer_id not in banned
            ]
            moving += [
                (stage, StagePeer(info.peer_id, info.throughput, info.queue_length))
                for info in records.values()
                if info.state == joining
                and info.run_hash == run_hash
                and info.peer_id not in banned
                and info.peer_id != self.peer_id
                and counts_move(info.peer_id)
            ]
            if stage == self.stage and self.backend is not None:
                info = self.stage_info()
                peers.append(StagePeer(self.peer_id, info.throughput, info.queue_length))
            stages.append(peers)
        return with_moves(stages, moving)

    def _choose_stage(self) -> int:
        """The stage with the least total throughput (then the longest queues, the fewest peers, the lowest
        index): `swarm.training.balance.choose_stage`."""
        return choose_stage(self._stage_peers())

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
        self.backend = await asyncio.to_thread(self._load_trainable_backend, self.stage)
        donors = await asyncio.to_thread(self._read_stage, self.stage)
        if donors:
            try:
                self._loaded_from = await self._load_state_from(donors, self.backend, self.stage)
                return
            except RuntimeError as e:
                # killed peers' records stay ONLINE until they expire: wait that long, then look again
                logger.warning("%s; reading stage %d again once dead peers' records expired", e, self.stage)
                await asyncio.sleep(self.expiration + 1.0)
                donors = await asyncio.to_thread(self._read_stage, self.stage)
                if donors:
                    self._loaded_from = await self._load_state_from(donors, self.backend, self.stage)
                    return
        await self._start_empty_stage()

    def _checkpoint_path(self, stage: int):
        return checkpoint_path(self.checkpoint_dir, self.run_config.run_id, self.training_run.sha256, stage)

    async def _start_empty_stage(self) -> None:
        """No live peer serves this stage. If its neighbours have trained, the stage was lost: rebuild it from
        this node's checkpoint folder (a saved state with trained weights), else from the neighbours by
        CheckFree. If nobody trained yet, the run starts here from the model's weights."""
        stage, num_stages = self.stage, self.run_config.num_stages
        adjacent = [s for s in (stage - 1, stage + 1) if 0 <= s < num_stages]
        neighbours = {s: await asyncio.to_thread(self._read_stage, s) for s in adjacent}
        neighbours = {s: infos for s, infos in neighbours.items() if infos}
        run_step = max((info.step for infos in neighbours.values() for info in infos), default=0)
        saved = None
        if self.checkpoint_dir is not None:
            try:
                saved = await asyncio.to_thread(
                    load_checkpoint, self._checkpoint_path(stage), self.training_run.sha256, stage
                )
            except Exception as e:
                logger.warning("can't use the checkpoint of stage %d: %r", stage, e)
        if saved is not None and saved.step > 0:
            # the stage's own weights and moments; its step counter goes on from its neighbours' (trainers of
            # a synchronous run wait for every stage to reach theirs)
            step = max(saved.step, run_step)
            await self.backend.run_on_compute_thread(self.backend.load, TrainState(step, saved.tensors))
            logger.info(
                "stage %d was lost: restored it from the checkpoint of step %d (neighbours at step %d)",
                stage,
                saved.step,
                run_step,
            )
        elif run_step > 0:
            await self._rebuild_by_checkfree(neighbours, run_step)
        else:
            logger.info("no live peer in stage %d: starting from the checkpoint's weights", stage)
            return
        self._loaded_from = (self.backend.trainable.step, self.peer_id)  # these weights are this peer's own

    async def _rebuild_by_checkfree(
        self, neighbours: dict[int, list[swarm_pb2.StageInfo]], step: int
    ) -> None:
        stage, trainable = self.stage, self.backend.trainable
        sources = []
        for s, infos in sorted(neighbours.items()):
            grad_norm = sum(info.grad_norm for info in infos) / len(infos)
            for info in sorted(infos, key=lambda i: -i.step):
                try:
                    state = await fetch_state(
                        self.p2p, info.peer_id, self.training_run.sha256, False, STATE_TIMEOUT
                    )
                    sources.append((s, Neighbour(state, tuple(self.run_config.stages[s]), grad_norm)))
                    break
                except Exception as e:
                    logger.warning("stage %d peer %s sent no state: %r", s, info.peer_id, e)
        if not sources:
            raise RuntimeError(
                f"stage {stage} was lost and no neighbouring stage sent its weights to rebuild it"
            )
        tensors = await asyncio.to_thread(
            checkfree_weights, trainable.names, self.blocks, [source for _, source in sources]
        )
        # parameters only: the optimizer starts afresh
        await self.backend.run_on_compute_thread(self.backend.load, TrainState(step, tensors))
        trainable.boost_lr(CHECKFREE_LR_FACTOR, CHECKFREE_BOOST_STEPS)
        logger.info(
            "stage %d was lost: rebuilt it by CheckFree from %s at step %d, with a fresh optimizer and "
            "%.1fx the learning rate for %d steps",
            stage,
            " and ".join(f"stage {s} (grad norm {n.grad_norm:.4g})" for s, n in sources),
            step,
            CHECKFREE_LR_FACTOR,
            CHECKFREE_BOOST_STEPS,
        )

    async def _save_checkpoint(self) -> None:
        backend = self.backend
        state = await backend.run_on_compute_thread(backend.trainable.state, True)
        path = self._checkpoint_path(self.stage)
        await asyncio.to_thread(save_checkpoint, path, self.training_run.sha256, self.stage, state)
        logger.info("saved stage %d at step %d to %s", self.stage, state.step, path)

    def _load_trainable_backend(self, stage: int) -> TrainableSpanBackend:
        start, end = self.run_config.stages[stage]
        span = load_span(self.checkpoint, start, end, dtype=torch.float32, device=self.config.device)
        return TrainableSpanBackend(
            span,
            self.config.limits,
            self.config.device,
            self.run_config.optimizer,
            run_hash=self.training_run.sha256,
            stage=stage,
            fault=self.fault,
        )

    async def _load_state_from(
        self, donors: list[swarm_pb2.StageInfo], backend: TrainableSpanBackend, stage: int
    ) -> tuple[int, str]:
        """Load a live peer's parameters, optimizer state and step into `backend`; returns (step, donor).
        Raises RuntimeError (refusing to train from this node's own weights) if no donor sends its state."""
        errors = []
        for donor in sorted(donors, key=lambda d: -d.step):
            try:
                state = await fetch_state(
                    self.p2p, donor.peer_id, self.training_run.sha256, True, STATE_TIMEOUT
                )
                await backend.run_on_compute_thread(backend.load, state)
                loaded = await backend.run_on_compute_thread(backend.trainable.state, True)
                if loaded.hash() != state.hash():
                    raise RuntimeError("the loaded state's hash differs from the donor's")
                logger.info("loaded stage %d at step %d from %s", stage, state.step, donor.peer_id)
                return state.step, donor.peer_id
            except Exception as e:
                logger.warning("loading state from %s failed: %r", donor.peer_id, e)
                errors.append(f"{donor.peer_id}: {e}")
        raise RuntimeError(
            f"stage {stage} has live peers but none sent its state ({'; '.join(errors)}); "
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
        with self._serving_lock:
            stage, (start, end), backend = self.stage, self.blocks, self.backend
        if self.config.throughput is not None:  # told, not measured
            throughput = self.config.throughput
        else:
            throughput = backend.throughput if backend else 0.0
        return swarm_pb2.StageInfo(
            state=self.state if state is None else state,
            peer_id=self.peer_id,
            run_id=self.run_config.run_id,
            run_hash=self.training_run.sha256,
            stage=stage,
            start_block=start,
            end_block=end,
            throughput=throughput,
            queue_length=backend.queue_length if backend else 0,
            step=backend.trainable.step if backend else 0,
            samples=backend.trainable.announced_samples if backend else 0,
            state_hash=backend.trainable.params_hash if backend else "",
            fingerprint=backend.trainable.fingerprint if backend else [],
            grad_norm=backend.trainable.recent_grad_norm if backend else 0.0,
        )

    def _publish(self, expiration: float, final: bool) -> None:
        info = self.stage_info()
        key = stage_key(self.run_config.run_id, info.stage)
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
        backend = self.backend
        return await backend.run_on_compute_thread(backend.trainable.state, with_optimizer)

    def _sign_reply(self, call, inputs, output):
        return sign_reply(
            self.signing_key, self.training_run.sha256, self.stage, call, inputs.hidden_states, output
        )

    async def _start_serving(self) -> None:
        config = self.config
        self._loop = asyncio.get_running_loop()
        self.bans = RunBans(self.dht, self.p2p, self.training_run, self.peer_id, self.signing_key)
        self.servicer = NodeServicer(self.backend, self.server_info, self.model_info(), self.stage_info)
        self.servicer.refuse_peer = self.bans.refusal
        self.servicer.metrics.banned_peers = lambda: len(self.bans.banned())
        self.servicer.sign_reply = self._sign_reply
        await self._add_servicer(self.servicer)
        self.state_servicer = TrainStateServicer(
            self.training_run.sha256, self._get_state, self._progress, lambda step: self.backend.log.get(step)
        )
        self.state_servicer.refuse_peer = self.bans.refusal
        await self._add_servicer(self.state_servicer)
        self.state = swarm_pb2.ServerInfo.ONLINE
        self.announcer = RecordAnnouncer(self._publish, config.update_period, min_interval=PROGRESS_INTERVAL)
        await self._start_stage()
        self.announcer.start()
        self._tasks.append(asyncio.create_task(self.bans.run()))
        if config.balance_quality > 0 and self.run_config.num_stages > 1:
            self._tasks.append(asyncio.create_task(self._balance_loop()))
        logger.info(
            "training node %s serving blocks [%d, %d) as stage %d of run %s at step %d on %s",
            self.peer_id,
            *self.blocks,
            self.stage,
            self.run_config.run_id,
            self.backend.trainable.step,
            " ".join(str(m) for m in self.dht.get_visible_maddrs()),
        )

    async def _start_stage(self) -> None:
        """Join the current stage's averaging group and start its loops (stepping, members, validation)."""
        run, averaging = self.run_config, self.run_config.averaging
        self.state_servicer.disputes = GradientDisputeService(
            self.backend,
            self.p2p,
            self.training_run.sha256,
            self.peer_id,
            self.signing_key,
            fault=self.fault,
            judge_refusal=self._judge_refusal,
        )
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
            on_round=lambda record: validation.on_round(record),  # this stage's, even after a move
            fault=self.fault,
        )
        self.state_servicer.stage_prefix = self.averager.prefix  # validators of other stages get no answer
        validator = GradientValidator(
            self.backend,
            self.p2p,
            self.training_run.sha256,
            self.averager.prefix,
            self.averager.part_size_bytes,
        )
        validator.referee = self._referee
        validation = self.validation = GroupValidation(
            validator, self.bans, self.dht, self.signing_key, self.peer_id, averaging.validators, self._loop
        )
        if self._loaded_from is not None:
            self.validation.loaded_state(*self._loaded_from)
        backend = self.backend
        trainable = backend.trainable
        self._members = MemberView(keep_for=MEMBER_KEEP_FOR)
        self._member_ids = []
        self.collaboration = Collaboration(
            f"stage {self.stage}",
            self.peer_id,
            run.batch.target_batch_size,
            progress=lambda: (trainable.step, trainable.samples),
            members=self._members,
            take=lambda: backend.run_on_compute_thread(backend.take_gradients),
            apply=lambda grads: backend.run_on_compute_thread(backend.apply, grads),
            averager=self.averager,
            averaging_timeout=averaging.averaging_timeout,
            own_fingerprint=lambda: trainable.fingerprint,
            resync=self._resync,
            corrupt=self.fault.corrupt_gradients if self.fault is not None else None,
            banned=self.bans.banned,
            suspected=self.bans.suspected,
            on_sent=backend.log.record_sent,
        )
        backend.on_accumulate = self.announcer.announce_now
        self._stage_tasks = [
            asyncio.create_task(self._watch_stage()),
            asyncio.create_task(self._step_loop()),
            asyncio.create_task(
                poll_members(self._members, self.p2p, self.training_run.sha256, lambda: self._member_ids)
            ),
        ]
        self._tasks.extend(self._stage_tasks)  # cancelled at shutdown with the node's own

    async def _stop_stage(self) -> None:
        """Leave the current stage's averaging group and stop its loops (a round in progress is dropped: the
        group's other members carry on without this peer, as when a peer dies)."""
        for task in self._stage_tasks:
            task.cancel()
        await asyncio.gather(*self._stage_tasks, return_exceptions=True)
        self._tasks = [task for task in self._tasks if task not in self._stage_tasks]
        self._stage_tasks = []
        averager, self.averager = self.averager, None
        self.validation = None
        self.state_servicer.stage_prefix = "(between stages)"  # no stage's rounds are served until the next
        if averager is not None:
            await asyncio.to_thread(averager.shutdown)

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
        collaboration = self.collaboration
        while True:
            try:
                report = await collaboration.maybe_step()
                if report is not None:
                    self.announcer.announce_now()
                    if self.checkpoint_dir is not None and report.step % self.checkpoint_every == 0:
                        await self._save_checkpoint()
            except Exception as e:
                logger.warning("stage %d step failed: %r", self.stage, e, exc_info=True)
            await asyncio.sleep(STEP_CHECK_PERIOD)

    async def _resync(self, peer_id: str) -> None:
        """Replace this peer's parameters, optimizer state and step with another stage peer's."""
        backend = self.backend
        state = await fetch_state(self.p2p, peer_id, self.training_run.sha256, True, STATE_TIMEOUT)
        await backend.run_on_compute_thread(backend.load, state)
        if self.validation is not None:
            self.validation.loaded_state(state.step, peer_id)
        self.announcer.announce_now()

    # ---- rebalancing --------------------------------------------------------------------------------------

    async def _balance_loop(self) -> None:
        """Every balance period (+-50%), move to another stage if `swarm.training.balance.plan_move` picks
        this peer: a move must raise the pipeline's bottleneck by more than 1/balance_quality - 1."""
        config = self.config
        min_gain = 1.0 / config.balance_quality - 1.0
        while True:
            delay = config.balance_period * random.uniform(0.5, 1.5)
            try:
                await asyncio.wait_for(self.stop_event.wait(), delay)
                return
            except TimeoutError:
                pass
            try:
                stages = await asyncio.to_thread(self._stage_peers)
                target = plan_move(stages, self.peer_id, min_gain)
                if target is not None:
                    totals = [round(sum(p.throughput for p in peers), 3) for peers in stages]
                    logger.info(
                        "stage throughputs %s: moving from stage %d to stage %d", totals, self.stage, target
                    )
                    await self._move(target, min_gain)
            except Exception as e:
                logger.warning("rebalancing failed: %r", e, exc_info=True)

    async def _move(self, target: int, min_gain: float) -> None:
        """Serve stage `target` instead: announce the move (JOINING in `target`, so that no other peer moves
        for the same gap), load its blocks and state from its peers (this peer keeps serving its stage
        meanwhile), check that the move still pays, then switch. Requests still queued on the old stage
        finish; later ones get UNKNOWN_BLOCKS, and trainers route them to the old stage's other peers."""
        donors = await asyncio.to_thread(self._read_stage, target)
        if not donors:
            logger.info("stage %d has no live peer to load from: not moving", target)
            return
        await asyncio.to_thread(self._announce_in, target, swarm_pb2.ServerInfo.JOINING)
        try:
            new_backend = await asyncio.to_thread(self._load_trainable_backend, target)
            try:
                loaded_from = await self._load_state_from(donors, new_backend, target)
                # two peers that decided at once both announced: the one with the lower peer id goes
                stages = await asyncio.to_thread(self._stage_peers, lambda peer_id: peer_id < self.peer_id)
                if not move_pays(stages, self.peer_id, target, min_gain):
                    raise _MoveCancelled(f"another peer moved meanwhile: not moving to stage {target}")
            except BaseException:
                new_backend.shutdown()
                raise
        except BaseException as e:
            await asyncio.to_thread(self._announce_in, target, swarm_pb2.ServerInfo.OFFLINE)
            if isinstance(e, _MoveCancelled):
                logger.info("%s", e)
                return
            raise
        old_stage, old_backend = self.stage, self.backend
        await self._stop_stage()
        with self._serving_lock:
            self.stage, self.blocks, self.backend = target, tuple(self.run_config.stages[target]), new_backend
        self.servicer.backend = new_backend
        self._loaded_from = loaded_from
        old_backend.retire(self.blocks)
        # trainers stop routing to the old stage once they read this (and get UNKNOWN_BLOCKS until then)
        await asyncio.to_thread(self._announce_in, old_stage, swarm_pb2.ServerInfo.OFFLINE)
        await self._start_stage()
        self.announcer.announce_now()
        self.moves += 1
        logger.info(
            "training node %s moved from stage %d to stage %d: serving blocks [%d, %d) at step %d",
            self.peer_id,
            old_stage,
            target,
            *self.blocks,
            new_backend.trainable.step,
        )

    def _announce_in(self, stage: int, state: int) -> None:
        """Store this peer's record in stage `stage`'s key with `state`: a move's JOINING in its target, the
        OFFLINE it leaves in its old stage, or in the target when the move is called off."""
        info = self.stage_info(state=state)
        info.stage = stage
        info.start_block, info.end_block = self.run_config.stages[stage]
        store_records(
            self.dht,
            self.owner_key,
            self.peer_id,
            [(stage_key(self.run_config.run_id, stage), info)],
            self.expiration,
            await_all_replicas=True,
        )

    def _stop_announcer(self) -> None:
        self.announcer.stop(final=True)
        if self.averager is not None:
            self.averager.shutdown()


class _MoveCancelled(Exception):
    """A planned move that no longer pays once the mover has loaded the target stage."""


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
