"""A SWARM trainer: holds the embeddings, final norm and LM head, and drives microbatches through the stages.

Each microbatch is embedded here, sent through every stage (to the peer of each stage that is expected
to be free first), scored here (the loss is the sum over its samples of the mean token cross-entropy),
and its gradient is sent back through the stages in reverse; the stage peers add the weight gradients
to their stage's sums, the trainer adds the head's to its own. Trainers step their head together, like
the peers of a stage, whenever the trainers have processed the run's target batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from swarm.averaging import GroupAverager
from swarm.averaging.statements import signing_key_of
from swarm.client.config import ClientConfig
from swarm.client.errors import RemoteError
from swarm.client.remote import remote_backward, remote_forward
from swarm.client.swarm_client import SwarmClient
from swarm.dht.announcer import RecordAnnouncer, store_records
from swarm.dht.keys import trainers_key
from swarm.dht.swarm_view import live_records, read_stage, read_trainers
from swarm.models.checkpoint import resolve_checkpoint
from swarm.models.head import load_client_head
from swarm.proto import swarm_pb2
from swarm.testing.faults import Fault
from swarm.training.bans import RunBans, accusations_key
from swarm.training.collaboration import Collaboration, MemberView, poll_members
from swarm.training.data import MicrobatchSampler, TextSequences
from swarm.training.head_gradients import TrainerRecomputer, embedding_gradients, loss_gradients
from swarm.training.run import TRAINERS_GROUP, LoadedRun, group_prefix, load_run
from swarm.training.state import TrainState, TrainStateServicer, fetch_state
from swarm.training.trainable import TrainableParameters
from swarm.training.validation import (
    EMBED_MICROBATCH,
    HEAD_MICROBATCH,
    GradientValidator,
    GroupValidation,
    Microbatch,
    sign_receipt,
)
from swarm.training.wiring import StageWiring
from swarm.verification.determinism import adopt_thread_count

logger = logging.getLogger(__name__)

VIEW_REFRESH_PERIOD = 0.3
MEMBER_KEEP_FOR = 3.0  # seconds a trainer that stopped answering still counts as a member
STEP_CHECK_PERIOD = 0.05
HEAD_NAMES = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


class StageUnavailableError(RuntimeError):
    """No live peer of a stage answered within the retries."""


@dataclass
class TrainStep:
    """One optimizer step of this trainer (the `--json` line)."""

    step: int
    loss: float  # mean token cross-entropy over this trainer's samples of the step
    samples: int
    samples_per_s: float

    def as_dict(self) -> dict:
        return {
            "step": self.step,
            "loss": self.loss,
            "samples": self.samples,
            "samples_per_s": self.samples_per_s,
        }


class SwarmTrainer:
    """Trains a run's model with the swarm's stage peers: `train(max_steps)`, then `close()`."""

    def __init__(
        self,
        run: LoadedRun | str | os.PathLike,
        initial_peers: list[str] | tuple[str, ...] = (),
        *,
        data: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        announce_maddrs: tuple[str, ...] = (),
        identity_path: str | None = None,
        update_period: float = 5.0,
        concurrency: int | None = None,
        forward_timeout: float = 30.0,
        backward_timeout: float = 75.0,
        max_retries: int = 8,
        wait_for_stages: float = 60.0,
        fault: Fault | None = None,
    ):
        self.run = run if isinstance(run, LoadedRun) else load_run(run)
        config = self.run.config
        self.checkpoint = resolve_checkpoint(config.model.source, cache_dir, config.model.name)
        self.head = load_client_head(self.checkpoint, dtype=torch.float32)
        optimizer = config.optimizer
        self.trainable = TrainableParameters(
            [
                (HEAD_NAMES[0], self.head.embed_tokens.weight),
                (HEAD_NAMES[1], self.head.norm.weight),
                (HEAD_NAMES[2], self.head.lm_head.weight),
            ],
            lr=optimizer.lr,
            betas=tuple(optimizer.betas),
            eps=optimizer.eps,
            weight_decay=optimizer.weight_decay,
            clip_grad_norm=optimizer.clip_grad_norm,
        )
        self.data_path = data
        self.fault = fault
        self.recomputer = TrainerRecomputer(
            self.head,
            self.trainable,
            self.run.sha256,
            config.num_stages,
            self._on_compute,
        )
        self.forward_timeout, self.backward_timeout = forward_timeout, backward_timeout
        self.max_retries, self.wait_for_stages = max_retries, wait_for_stages
        self.concurrency = concurrency
        self.update_period = update_period
        self._compute = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="swarm-head", initializer=adopt_thread_count
        )
        self._loss_sum = 0.0  # behind the samples accumulated toward the next step
        self._stage_views: list[dict[str, swarm_pb2.StageInfo]] = [{} for _ in config.stages]
        self._members = MemberView(keep_for=MEMBER_KEEP_FOR)
        self._trainer_ids: list[str] = []
        self._wiring = [StageWiring() for _ in config.stages]
        self._steps: list[TrainStep] = []
        self._step_time = time.perf_counter()
        self._closed = False
        self._tasks: list = []
        self._max_steps: int | None = 0  # steps stop here (0: not training yet)
        self.announcer = self.averager = self.validation = None
        self.client = SwarmClient(
            config.model.name,
            config.model.num_blocks,
            ClientConfig(initial_peers=list(initial_peers), request_timeout=forward_timeout),
            client_mode=False,
            host=host,
            port=port,
            announce_maddrs=announce_maddrs,
            identity_path=identity_path,
        )
        try:
            self.peer_id = self.client.dht.peer_id.to_base58()
            self._signing_key = signing_key_of(self.client.signer)  # signs its receipts and BTARD statements
            self._state_servicer = TrainStateServicer(
                self.run.sha256, self._get_state, self._progress, self.recomputer.log.get
            )
            self.client.run_async(self._state_servicer.add_p2p_handlers(self.client.p2p))
            self.run_bans = RunBans(
                self.client.dht, self.client.p2p, self.run, self.peer_id, self._signing_key
            )
            self._state_servicer.refuse_peer = self.run_bans.refusal
            averaging = config.averaging
            self.averager = GroupAverager(
                self.client.dht,
                group_prefix(self.run, TRAINERS_GROUP),
                [p.detach() for p in self.trainable.params],
                aggregator=averaging.aggregator,
                tau=averaging.tau,
                min_matchmaking_time=averaging.matchmaking_time,
                request_timeout=averaging.request_timeout,
                signing_key=self._signing_key,
                accusations_key=accusations_key(self.run),
                on_accusations=self.run_bans.add_local,
                on_round=lambda record: self.validation.on_round(record),
                fault=fault,
            )
            validator = GradientValidator(
                self.recomputer,
                self.client.p2p,
                self.run.sha256,
                self.averager.prefix,
                self.averager.part_size_bytes,
            )
            self.validation = GroupValidation(
                validator,
                self.run_bans,
                self.client.dht,
                self._signing_key,
                self.peer_id,
                averaging.validators,
                self.client._loop.loop,
            )
            self.collaboration = Collaboration(
                TRAINERS_GROUP,
                self.peer_id,
                config.batch.target_batch_size,
                progress=lambda: (self.trainable.step, self.trainable.samples),
                members=self._members,
                take=lambda: self._on_compute(self._take),
                apply=lambda grads: self._on_compute(self._apply, grads),
                averager=self.averager,
                averaging_timeout=averaging.averaging_timeout,
                own_fingerprint=lambda: self.trainable.fingerprint,
                resync=self._resync,
                corrupt=fault.corrupt_gradients if fault is not None else None,
                banned=self.run_bans.banned,
                suspected=self.run_bans.suspected,
                on_sent=self.recomputer.log.record_sent,
            )
            self.announcer = RecordAnnouncer(self._publish, update_period, min_interval=0.2)
            self.announcer.start()
            self._tasks = [
                self.client.run_async(self._spawn(self._watch())),
                self.client.run_async(self._spawn(self._step_loop())),
                self.client.run_async(self._spawn(self.run_bans.run())),
                self.client.run_async(
                    self._spawn(
                        poll_members(
                            self._members, self.client.p2p, self.run.sha256, lambda: self._trainer_ids
                        )
                    )
                ),
            ]
        except BaseException:
            self.close()
            raise

    # ---- background work on the client's loop --------------------------------------------------------------

    @staticmethod
    async def _spawn(coro) -> asyncio.Task:
        return asyncio.create_task(coro)

    async def _on_compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn, *args)

    def _read_views(self) -> None:
        config = self.run.config
        banned = set(self.client.bans.active()) | self.run_bans.banned()
        for stage in range(config.num_stages):
            records = read_stage(self.client.dht, config.run_id, stage)
            live = live_records(records, self.run.sha256)
            self._stage_views[stage] = {info.peer_id: info for info in live if info.peer_id not in banned}
        trainers = live_records(read_trainers(self.client.dht, config.run_id), self.run.sha256)
        self._trainer_ids = [
            info.peer_id for info in trainers if info.peer_id != self.peer_id and info.peer_id not in banned
        ]

    async def _watch(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self._read_views)
            except Exception as e:
                logger.debug("reading the run's records failed: %r", e)
            await asyncio.sleep(VIEW_REFRESH_PERIOD)

    async def _step_loop(self) -> None:
        while True:
            try:
                report = None
                if self._max_steps is None or self.trainable.step < self._max_steps:
                    report = await self.collaboration.maybe_step()
                if report is not None:
                    self.announcer.announce_now()
            except Exception as e:
                logger.warning("trainer step failed: %r", e, exc_info=True)
            await asyncio.sleep(STEP_CHECK_PERIOD)

    def trainer_info(self, state: int = swarm_pb2.ServerInfo.ONLINE) -> swarm_pb2.TrainerInfo:
        last = self._steps[-1].samples_per_s if self._steps else 0.0
        return swarm_pb2.TrainerInfo(
            state=state,
            peer_id=self.peer_id,
            run_id=self.run.config.run_id,
            run_hash=self.run.sha256,
            step=self.trainable.step,
            samples=self.trainable.announced_samples,
            samples_per_s=last,
            state_hash=self.trainable.params_hash,
            fingerprint=self.trainable.fingerprint,
        )

    def _publish(self, expiration: float, final: bool) -> None:
        state = swarm_pb2.ServerInfo.OFFLINE if final else swarm_pb2.ServerInfo.ONLINE
        key = trainers_key(self.run.config.run_id)
        store_records(
            self.client.dht,
            self.client.signer.local_public_key,
            self.peer_id,
            [(key, self.trainer_info(state))],
            expiration,
            await_all_replicas=final,
        )

    async def _resync(self, peer_id: str) -> None:
        """Replace this trainer's head, optimizer state and step with another trainer's."""
        state = await fetch_state(self.client.p2p, peer_id, self.run.sha256, True, self.backward_timeout)
        await self._on_compute(self._load_head, state)
        if self.validation is not None:
            self.validation.loaded_state(state.step, peer_id)
        self.announcer.announce_now()

    def _load_head(self, state: TrainState) -> None:
        self.trainable.load(state)
        self._loss_sum = 0.0  # the samples behind it were dropped with the gradients
        self.recomputer.log.restart(self.trainable.step, self.trainable.params)

    def _apply(self, grads: list[torch.Tensor]) -> None:
        self.trainable.apply(grads)
        self.recomputer.log.snapshot(self.trainable.step, self.trainable.params)

    def _progress(self) -> tuple[int, int, list[float]]:
        return self.trainable.step, self.trainable.announced_samples, self.trainable.fingerprint

    async def _get_state(self, with_optimizer: bool) -> TrainState:
        return await self._on_compute(self.trainable.state, with_optimizer)

    # ---- the head's compute (on its own thread) ---------------------------------------------------------

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.head.embed(ids).detach()

    def _loss_and_grad(
        self, ids: torch.Tensor, hidden: torch.Tensor, receipt: bytes
    ) -> tuple[float, torch.Tensor]:
        """Sum over samples of the mean token cross-entropy; adds the norm's and head's gradients."""
        labels = ids[:, 1:]
        if self.fault is not None:
            vocab_size = self.head.lm_head.weight.shape[0]
            labels = self.fault.corrupt_labels(labels, self.trainable.step, vocab_size)
        loss, grad_hidden, param_grads = loss_gradients(self.head, self.trainable.params, ids, hidden, labels)
        self.trainable.accumulate(param_grads, 0)
        step = self.trainable.step
        self.recomputer.log.add(Microbatch(HEAD_MICROBATCH, {"ids": ids, "hidden": hidden}, [receipt], step))
        return float(loss), grad_hidden

    def _embedding_backward(
        self, ids: torch.Tensor, grad: torch.Tensor, loss_sum: float, receipt: bytes
    ) -> None:
        """Add the embeddings' gradient; the microbatch's samples count from here on."""
        self.trainable.accumulate(
            embedding_gradients(self.head, self.trainable.params, ids, grad), ids.shape[0]
        )
        step = self.trainable.step
        self.recomputer.log.add(Microbatch(EMBED_MICROBATCH, {"ids": ids, "grad": grad}, [receipt], step))
        self._loss_sum += loss_sum

    def _take(self) -> tuple[list[torch.Tensor], int]:
        loss_sum, self._loss_sum = self._loss_sum, 0.0
        self.recomputer.log.close(self.trainable.step)
        grads, samples = self.trainable.take_mean_gradients()
        now = time.perf_counter()
        elapsed, self._step_time = now - self._step_time, now
        self._steps.append(
            TrainStep(
                self.trainable.step + 1, loss_sum / max(samples, 1), samples, samples / max(elapsed, 1e-9)
            )
        )
        return grads, samples

    # ---- one microbatch through the stages ---------------------------------------------------------------

    async def _call_stage(
        self, stage: int, ids_rows: int, hidden, grad=None, receipts: list[bytes] | None = None
    ) -> torch.Tensor:
        """Forward (or backward, given `grad`) through a stage on its least busy peer; retries elsewhere.
        The peer's signed receipt for its reply is appended to `receipts`."""
        start, end = self.run.config.stages[stage]
        backward = grad is not None
        deadline = time.monotonic() + self.wait_for_stages
        failures = 0
        while True:
            peers = {
                p: i.throughput for p, i in self._stage_views[stage].items() if p not in self.client.bans
            }
            if not peers:
                if time.monotonic() > deadline:
                    raise StageUnavailableError(f"no live peer serves stage {stage}")
                await asyncio.sleep(VIEW_REFRESH_PERIOD)
                continue
            peer = self._wiring[stage].choose(peers, ids_rows, backward)
            started = time.perf_counter()
            try:
                if backward:
                    receipt = sign_receipt(self._signing_key, self.run.sha256, stage, hidden, grad)
                    result, _ = await remote_backward(
                        self.client.p2p,
                        peer,
                        start,
                        end,
                        hidden,
                        grad,
                        None,
                        None,
                        self.backward_timeout,
                        receipt=receipt,
                        receipts=receipts,
                    )
                else:
                    result = await remote_forward(
                        self.client.p2p,
                        peer,
                        start,
                        end,
                        hidden,
                        None,
                        None,
                        self.forward_timeout,
                        receipts=receipts,
                    )
                self._wiring[stage].measured(peer, ids_rows, time.perf_counter() - started, backward)
                return result
            except Exception as e:
                failures += 1
                if isinstance(e, RemoteError) and e.code == swarm_pb2.Error.UNKNOWN_BLOCKS:
                    # it moved to another stage since we read its record: retry elsewhere, ban nobody
                    logger.info("stage %d peer %s moved away: %s", stage, peer, e)
                else:
                    logger.warning(
                        "stage %d peer %s failed %s: %r",
                        stage,
                        peer,
                        "backward" if backward else "forward",
                        e,
                    )
                    self.client.ban(peer)
                self._wiring[stage].forget(peer)
                self._stage_views[stage].pop(peer, None)
                if failures > self.max_retries:
                    raise

    async def _microbatch(self, ids: torch.Tensor) -> None:
        hidden = await self._on_compute(self._embed, ids)
        inputs, receipts = [], []  # the stages' signed receipts for their replies, the last one's kept
        for stage in range(self.run.config.num_stages):
            inputs.append(hidden)
            hidden = await self._call_stage(stage, ids.shape[0], hidden, receipts=receipts)
        loss_sum, grad = await self._on_compute(self._loss_and_grad, ids, hidden, receipts[-1])
        for stage in reversed(range(self.run.config.num_stages)):
            grad = await self._call_stage(stage, ids.shape[0], inputs[stage], grad, receipts=receipts)
        await self._on_compute(self._embedding_backward, ids, grad, loss_sum, receipts[-1])
        self.announcer.announce_now()

    # ---- the training loop ------------------------------------------------------------------------------

    def wait_for_stages_ready(self, timeout: float | None = None) -> None:
        """Block until every stage has a live peer."""
        deadline = time.monotonic() + (self.wait_for_stages if timeout is None else timeout)
        while not all(self._stage_views):
            if time.monotonic() > deadline:
                missing = [i for i, view in enumerate(self._stage_views) if not view]
                raise StageUnavailableError(f"no live peer serves stages {missing}")
            time.sleep(VIEW_REFRESH_PERIOD)

    def train(
        self, max_steps: int | None = None, on_step: Callable[[TrainStep], None] | None = None
    ) -> list[TrainStep]:
        """Train until this trainer took `max_steps` steps (default: the run's max_steps, else forever)."""
        config = self.run.config
        max_steps = max_steps or config.batch.max_steps
        if self.data_path is None:
            raise ValueError("the trainer was given no data")
        from swarm.models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(self.checkpoint.path)
        data = TextSequences(self.data_path, tokenizer, config.batch.seq_len)
        sampler = MicrobatchSampler(
            data, config.batch.microbatch_size, config.data_order, config.seed, self.peer_id
        )
        self.wait_for_stages_ready()
        self._step_time = time.perf_counter()
        self._max_steps = max_steps
        reported = len(self._steps)
        coroutine = (
            self._train_sync(sampler, max_steps) if config.sync else self._train_async(sampler, max_steps)
        )

        async def watch_reports():
            nonlocal reported
            task = asyncio.create_task(coroutine)
            try:
                while not task.done():
                    await asyncio.sleep(STEP_CHECK_PERIOD)
                    reported = self._report(reported, on_step)
                await task
            finally:
                task.cancel()
            self._report(reported, on_step)

        self.client.run_async(watch_reports())
        return list(self._steps)

    def _report(self, reported: int, on_step) -> int:
        while reported < len(self._steps) and reported < len(self.collaboration.history):
            step = self._steps[reported]
            logger.info(
                "step %d: loss %.4f, %d samples, %.1f samples/s",
                step.step,
                step.loss,
                step.samples,
                step.samples_per_s,
            )
            if on_step is not None:
                on_step(step)
            reported += 1
        return reported

    async def _train_async(self, sampler: MicrobatchSampler, max_steps: int | None) -> None:
        """SWARM: microbatches flow continuously; stages and trainers step whenever they reach the target."""
        concurrency = self.concurrency or 2 * max(len(view) for view in self._stage_views)

        async def worker():
            while max_steps is None or self.trainable.step < max_steps:
                await self._microbatch(sampler.take())

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        try:
            while max_steps is None or self.trainable.step < max_steps:
                done = [w for w in workers if w.done()]
                for w in done:
                    w.result()  # a worker that gave up ends training with its error
                if len(done) == len(workers):
                    break
                await asyncio.sleep(STEP_CHECK_PERIOD)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _train_sync(self, sampler: MicrobatchSampler, max_steps: int | None) -> None:
        """Every step is one global batch: send this trainer's share, then wait for every stage to step."""
        config = self.run.config
        step = self.trainable.step
        while max_steps is None or step < max_steps:
            trainers = 1 + len([m for m in self._members() if m.step == step])
            share = math.ceil(config.batch.target_batch_size / trainers)
            count = math.ceil(share / config.batch.microbatch_size)
            await asyncio.gather(*(self._microbatch(sampler.take()) for _ in range(count)))
            while self.trainable.step <= step:
                await asyncio.sleep(STEP_CHECK_PERIOD)
            step = self.trainable.step
            await self._wait_for_stage_step(step)

    async def _wait_for_stage_step(self, step: int) -> None:
        """Until every stage peer this trainer routes to announces `step` (they step on the same global
        batch). The view is read afresh each time: a peer banned or gone meanwhile is not waited for (a
        banned stage peer is refused by the others, so it may never reach the step)."""
        from swarm.client.remote import get_info

        deadline = time.monotonic() + self.wait_for_stages + self.run.config.averaging.averaging_timeout
        for stage in range(len(self._stage_views)):
            for peer in list(self._stage_views[stage]):
                while peer in self._stage_views[stage]:
                    try:
                        info = await get_info(self.client.p2p, peer, self.forward_timeout)
                        if info.stage.step >= step:
                            break
                    except Exception as e:
                        logger.warning("stage %d peer %s did not answer: %r", stage, peer, e)
                        break
                    if time.monotonic() > deadline:
                        raise StageUnavailableError(f"stage {stage} did not reach step {step}")
                    await asyncio.sleep(STEP_CHECK_PERIOD)

    # ---- export and lifecycle ----------------------------------------------------------------------------

    def head_state(self) -> TrainState:
        return self._compute.submit(self.trainable.state, False).result()

    def close(self) -> None:
        """Announce OFFLINE, stop averaging and leave the swarm."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            self.client.run_async(self._cancel(task))
        if self.announcer is not None:
            self.announcer.stop(final=True)
        if self.averager is not None:
            self.averager.shutdown()
        self.client.close()
        self._compute.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    async def _cancel(task: asyncio.Task) -> None:
        task.cancel()

    def __enter__(self) -> SwarmTrainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
