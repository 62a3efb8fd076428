"""Byzantine-robust averaging (BTARD): what the defence buys against each attack, and what it costs.

Part A, protocol simulation (`name: byzantine_training`): 16 peers of one process train a small MLP classifier
on a fixed synthetic data set, one averaging round per optimizer step, with 0, 3 or 7 of them attacking
(`swarm.testing.faults`, the hooks `--fault byzantine:ATTACK` installs). No networking, but the real pieces
of a BTARD round: chunks and commitments (`commitments`), statements signed with each peer's RSA identity
(`statements`), chunks reduced by their reducer with `reducers.centered_clip`, parts checked against their
sender's commitment (a mismatch is an equivocation accusation with the two statements as evidence),
revealed secrets giving each chunk's seed, published projections and `projection.check_chunk` on every
chunk (a failure is a bad_aggregate accusation), and every accusation judged by an `accusations.BanList`
whose re-check calls `accusations.judge_aggregate` on the parts the reducer kept. Banned peers take no part
in later rounds. Each row gives the final held-out loss and accuracy next to the honest-only run's, how many
rounds it took to ban every attacker, and how many honest peers were banned (must be 0: once every row is
out, the benchmark exits with an error naming the configurations where one was). The same rounds with a
plain mean (hivemind's all-reduce: no commitments, no checks, no bans) show what the defence buys.

Part B, timing (`name: byzantine_round`): `GroupAverager` rounds between real hivemind peers on 127.0.0.1
(`--peers`, default 4: 16 averager processes do not fit a 2-core machine) over `--floats` float32 values,
aggregator="mean" (hivemind's plain all-reduce) against aggregator="centered_clip" (a BTARD round:
commitments, signed parts and results), medians over `--repeats` rounds each, taken in turns; and the time
of the checks that follow each robust round in the background (`GroupAverager.last_check`).

    python -m benchmarks.byzantine                     # both parts with the defaults (a few minutes)
    python -m benchmarks.byzantine --quick             # seconds: 15 rounds, 3 attacks, 100k floats
    python -m benchmarks.byzantine --output benchmarks/results/byzantine.jsonl   # also append the rows there
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import random
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import device_name, run_until_sigterm

GRADIENT_ATTACKS = ("sign_flip", "random_direction", "label_flip", "delayed", "alie", "ipm")
PROTOCOL_ATTACKS = ("equivocate", "bad_reducer")  # caught by the commitments and the projection check
ATTACKS = (*GRADIENT_ATTACKS, *PROTOCOL_ATTACKS)
AGGREGATORS = ("centered_clip", "mean")
QUICK_ATTACKS = ("sign_flip", "equivocate", "bad_reducer")

FEATURES, HIDDEN, CLASSES = 32, 64, 10  # the MLP: 32 -> 64 (ReLU) -> 10, 2762 parameters
SEPARATION = 0.6  # class means ~ N(0, SEPARATION^2 I), inputs = mean + N(0, I): ~91% accuracy reachable
TRAIN_SAMPLES, TEST_SAMPLES = 16384, 4096
PREFIX = "bench_byzantine"
GOAL_RATIO = 1.3  # a robust round should take at most 1.3x a plain all-reduce (reported, not asserted)

NOTES_SIMULATION = [
    "gradient attacks (sign_flip, random_direction, label_flip, delayed, alie, ipm) are only contained by "
    "CenteredClip, never banned: gradient validation is not built yet, so their rounds_to_ban_all is null",
    "equivocate is caught by the commitments (a reducer refuses a part other than the committed one and "
    "accuses its sender with the two signed statements); bad_reducer by the projection check and the "
    "re-check of its chunk from the parts it kept",
    "mean rows: a plain all-reduce (no commitments, no checks, no bans); attackers act on it the same way",
    "tau is per chunk (part_size_bytes): CenteredClip clips each chunk's ||x_i - v|| at tau, so b attackers "
    "can pull each chunk by about b * tau / (n - b); tau must be set against the honest spread of a chunk "
    "(here about 0.09 with 64-value chunks), see --tau: its default here is 0.1, not the run files' 1.0, "
    "with which 3 sign_flip attackers of 16 make training diverge",
    "a failed projection check whose re-check finds every statement consistent (the reduction stopped "
    "short of its fixed point) is settled in good faith, banning nobody: good_faith_settlements counts them",
    "attackers run the honest code except for their fault's hooks (as `--fault byzantine:ATTACK` does), "
    "their checks and accusations included; a peer whose parts were refused (its round failed) runs no "
    "checks, as GroupAverager skips them after a failed round",
    "parts statements (one per sender and reducer) of honest senders are signed when evidence needs them "
    "(an accusation's re-check), not for every reducer: they sign the committed hashes, so signing all of "
    "them would change no outcome and cost 16 x 16 RSA signatures a round; commitments, results, after and "
    "projections statements "
    "and accusations are all signed and verified",
    "each peer's secret is derived from --seed, the round and the peer (a real peer draws os.urandom) so "
    "that runs repeat; the group id is derived from the round",
]
NOTES_TIMING = [
    "16 real averaging peers (each a DHT and an averager process with its p2p daemon) do not fit a 2-core "
    "machine: --peers real peers on 127.0.0.1 (default 4), each driven from a thread of this process",
    "a round's time is the slowest member's GroupAverager.average call, matchmaking included (the group "
    "fills at once: every member expects --peers); plain and robust rounds are taken in turns",
    "robust rounds cut the values into chunks of group.robust_part_size (hivemind's 2^19 bytes for large "
    "models, smaller for small ones); the checks after a robust round (after and projections statements "
    "through the DHT, the projection check) run in the background while training goes on: check_s is the "
    "time from the end of a member's round to the end of its checks, the slowest member's",
    "inputs: one common vector plus per-peer noise, both of norm tau / 2 per chunk (like gradients: the mean "
    "no larger than the spread), so that CenteredClip (started at the median) converges in a few "
    "iterations, as it does when tau is set above the honest spread",
    "accusations_filed counts the accusations the checks of the timed robust rounds filed (all peers are "
    "honest: it should be 0)",
    "a robust round's own work: the commitment (sha256 of every chunk, in the caller), its parts statements "
    "(one RSA signature per reducer, over the committed hashes of the chunks that reducer reduces), per "
    "sender a signature check of its parts statement, per part received a sha256 against it, "
    "per chunk reduced a CenteredClip run to its convergence criterion (started at the median) and a signed "
    "result, per result received a signature check and a sha256; reducers check a sender's next part while "
    "the current one is reduced and sign a result while the next is reduced, as hivemind's runner prefetches",
    "with --rate-mbit each peer's DHT, averager processes and p2p daemon run in a network namespace of "
    "their own whose outgoing traffic is limited to that rate (tbf): rounds then wait for the links as they "
    "would between volunteers' machines, and a robust round's CPU work overlaps its transfers",
    "both kinds of rounds are CPU-bound on this machine (4 averager processes, 4 p2p daemons and the caller "
    "on 2 cores) when on 127.0.0.1 or at 1 Gbit/s: the ratio is about that of the CPU time a round takes",
]


# ---- Part A: the protocol, simulated with the real building blocks ---------------------------------------


class Task:
    """A fixed synthetic 10-class data set and a 2-layer MLP, as a flat list of parameter tensors."""

    def __init__(self, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.means = torch.randn(CLASSES, FEATURES, generator=generator) * SEPARATION
        self.train_x, self.train_y = self._draw(TRAIN_SAMPLES, generator)
        self.test_x, self.test_y = self._draw(TEST_SAMPLES, generator)
        self.seed = seed

    def _draw(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(CLASSES, (count,), generator=generator)
        return self.means[labels] + torch.randn(count, FEATURES, generator=generator), labels

    def initial_params(self) -> list[torch.Tensor]:
        """nn.Linear's initialisation (uniform in +-1/sqrt(fan_in)), the same in every run."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        shapes = [((HIDDEN, FEATURES), FEATURES), ((HIDDEN,), FEATURES), ((CLASSES, HIDDEN), HIDDEN)]
        shapes.append(((CLASSES,), HIDDEN))
        return [
            (torch.rand(shape, generator=generator) * 2 - 1) / math.sqrt(fan_in) for shape, fan_in in shapes
        ]

    @staticmethod
    def logits(params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = params
        return F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)

    def batch(self, step: int, peer: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The peer's batch of this round, from a public per-round seed."""
        seed = int.from_bytes(hashlib.sha256(f"batch/{self.seed}/{step}/{peer}".encode()).digest()[:8], "big")
        rows = torch.randint(TRAIN_SAMPLES, (size,), generator=torch.Generator().manual_seed(seed >> 1))
        return self.train_x[rows], self.train_y[rows]

    def gradients(
        self, params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> list[torch.Tensor]:
        leaves = [p.detach().requires_grad_(True) for p in params]
        loss = F.cross_entropy(self.logits(leaves, x), y)
        return [g.detach() for g in torch.autograd.grad(loss, leaves)]

    def evaluate(self, params: Sequence[torch.Tensor]) -> tuple[float, float]:
        """(held-out loss, accuracy)."""
        with torch.no_grad():
            logits = self.logits(params, self.test_x)
            loss = float(F.cross_entropy(logits, self.test_y))
            accuracy = float((logits.argmax(dim=1) == self.test_y).float().mean())
        return loss, accuracy


@dataclass
class Peer:
    index: int
    key: object  # hivemind RSAPrivateKey
    id: str
    fault: object = None  # a swarm.testing.faults.Fault for attackers


@dataclass
class ChunkRecord:
    """What one chunk's reducer kept: the round's evidence, for re-checks."""

    reducer: Peer
    senders: list[Peer]
    parts: list[torch.Tensor]  # in the senders' order: what the reducer reduced
    aggregate: torch.Tensor  # what it signed and sent back
    result: bytes  # its signed result statement
    commits: dict[str, bytes]  # sender id -> its commit statement


class Simulation:
    """One configuration: an aggregator, an attack (or none) and its attackers, trained for `rounds`."""

    def __init__(self, task: Task, peers: list[Peer], aggregator: str, attack: str | None, args):
        from swarm.averaging.reducers import get_reducer

        self.task, self.peers, self.aggregator, self.attack, self.args = task, peers, aggregator, attack, args
        self.tau = args.tau
        self.reduce = get_reducer("centered_clip", tau=args.tau)
        self.loop = asyncio.new_event_loop()
        self._part_statements: dict[tuple[int, int, int], bytes] = {}
        self.round_chunks: dict[int, tuple[dict, list]] = {}  # step -> (every member's chunks, reducers)
        self.records: dict[tuple[int, int], ChunkRecord] = {}  # (step, chunk) -> record, this round's
        self.unconverged = 0  # CenteredClip runs that stopped at max_iter
        self.accusations = 0
        self.refused_parts = 0
        self.failed_checks = 0  # chunks whose projection check failed
        self.good_faith = 0  # accusations settled without a ban (a failed check nobody is to blame for)

    # -- statements ----------------------------------------------------------------------------------------

    def parts_statement(
        self, peer: Peer, step: int, first: int, parts: Sequence[torch.Tensor], commit: bytes
    ) -> bytes:
        """The sender's signed statement of the parts it sent one reducer (chunks `first`, `first + 1`, ...,
        under its commit statement `commit`)."""
        from swarm.averaging.commitments import part_bytes, parts_payload
        from swarm.averaging.statements import digest, sign_statement

        key = (peer.index, step, first)
        if key not in self._part_statements:
            hashes = [digest(part_bytes(part)) for part in parts]
            self._part_statements[key] = sign_statement(
                peer.key, parts_payload(PREFIX, step, first, hashes, digest(commit))
            )
        return self._part_statements[key]

    def sent_statement(self, peer: Peer, step: int, chunk: int, commit: bytes) -> bytes:
        """`peer`'s parts statement for the reducer of `chunk` this round: it covers every chunk that reducer
        reduces, as `peer` sent them."""
        chunks, reducers = self.round_chunks[step]
        reducer = reducers[chunk]
        owned = [c for c, r in enumerate(reducers) if r is reducer]
        parts = [chunks[peer.id][c] for c in owned]
        if peer.fault is not None and peer is not reducer:  # its own parts never leave the reducer
            parts = [peer.fault.tamper_part(part, c, step) for part, c in zip(parts, owned, strict=True)]
        return self.parts_statement(peer, step, owned[0], parts, commit)

    # -- the training loop ---------------------------------------------------------------------------------

    def run(self) -> dict:
        from swarm.averaging.accusations import BanList

        args, task = self.args, self.task
        params = task.initial_params()
        bans = BanList(recheck=self.recheck)
        banned_at: dict[str, int] = {}  # peer id -> the round after which it was banned
        attackers = {peer.id for peer in self.peers if peer.fault is not None}
        diverged_at = None
        started = time.perf_counter()
        collapsed_at = None
        for step in range(args.rounds):
            active = [peer for peer in self.peers if peer.id not in banned_at]
            if len(active) < 2:
                collapsed_at = step + 1  # nobody left to average with
                break
            sent = {}
            for peer in active:
                x, y = task.batch(step, peer.index, args.batch)
                if peer.fault is not None:
                    y = peer.fault.corrupt_labels(y, step, CLASSES)
                grads = task.gradients(params, x, y)
                if peer.fault is not None:
                    grads = peer.fault.corrupt_gradients(grads, step)
                sent[peer.id] = grads
            if not all(bool(torch.isfinite(g).all()) for grads in sent.values() for g in grads):
                diverged_at = step + 1  # real peers' rounds would fail from here on
                break
            if self.aggregator == "mean":
                update = self.mean_round(step, active, sent)
            else:
                update, accusations = self.robust_round(step, active, sent)
                for blob in accusations:
                    verdict = self.loop.run_until_complete(bans.consider(blob))
                    if verdict is not None:
                        banned_at[verdict.guilty] = step + 1
                self.accusations += len(accusations)
                self._part_statements.clear()
                self.round_chunks.clear()
                self.records.clear()
                wrongly = [v for v in bans.bans() if v.guilty not in attackers and v.step == step]
                for verdict in wrongly:  # reported in the row; the run fails at the end (see `measure`)
                    print(
                        f"HONEST PEER BANNED ({self.aggregator}, {self.attack}, round {step + 1}): "
                        f"{verdict.guilty}: {verdict.reason}",
                        file=sys.stderr,
                    )
            with torch.no_grad():
                for p, u in zip(params, update, strict=True):
                    p.sub_(args.lr * u)
            if not all(bool(torch.isfinite(p).all()) for p in params):
                diverged_at = step + 1
                break
        wall = time.perf_counter() - started
        self.loop.close()
        loss, accuracy = task.evaluate(params) if diverged_at is None else (None, None)
        if loss is not None and not math.isfinite(loss):
            loss, accuracy, diverged_at = None, None, args.rounds
        banned_attackers = [peer for peer in attackers if peer in banned_at]
        all_banned = bool(attackers) and len(banned_attackers) == len(attackers)
        return {
            "final_loss": None if loss is None else round(loss, 4),
            "final_accuracy": None if accuracy is None else round(accuracy, 4),
            "diverged_at_round": diverged_at,
            "attackers_banned": len(banned_attackers),
            "rounds_to_ban_all": max(banned_at[p] for p in attackers) if all_banned else None,
            "ban_rounds": sorted(banned_at[p] for p in banned_attackers),
            "honest_banned": len([p for p in banned_at if p not in attackers]),
            # what the bans were for: {reason: peers}, attackers' and honest peers' apart
            "attacker_ban_reasons": _count_reasons(v for v in bans.bans() if v.guilty in attackers),
            "honest_ban_reasons": _count_reasons(v for v in bans.bans() if v.guilty not in attackers),
            "honest_ban_example": next((v.reason for v in bans.bans() if v.guilty not in attackers), None),
            "group_collapsed_at_round": collapsed_at,
            "accusations": self.accusations,
            "refused_parts": self.refused_parts,
            "failed_checks": self.failed_checks,
            "good_faith_settlements": self.good_faith,
            "unconverged_clips": self.unconverged,
            "wall_s": round(wall, 2),
        }

    def split(self, active: list[Peer], sent: dict) -> tuple[dict[str, list[torch.Tensor]], list[Peer]]:
        """Every member's chunks, and the reducer of each chunk (contiguous ranges over the members)."""
        from swarm.averaging.commitments import split_chunks

        chunks = {peer.id: split_chunks(sent[peer.id], self.args.part_size) for peer in active}
        count = len(next(iter(chunks.values())))
        reducers = [active[c * len(active) // count] for c in range(count)]
        return chunks, reducers

    def mean_round(self, step: int, active: list[Peer], sent: dict) -> list[torch.Tensor]:
        """hivemind's plain all-reduce: every part is averaged in, every aggregate accepted."""
        from swarm.averaging.reducers import mean

        chunks, reducers = self.split(active, sent)
        aggregates = []
        for c, reducer in enumerate(reducers):
            parts = []
            for peer in active:
                part = chunks[peer.id][c]
                if peer.fault is not None and peer is not reducer:
                    part = peer.fault.tamper_part(part, c, step)
                parts.append(part)
            aggregate = mean(parts)
            if reducer.fault is not None:
                aggregate = reducer.fault.tamper_aggregate(aggregate, c, step)
            aggregates.append(aggregate)
        return self.unflatten(aggregates, sent[active[0].id])

    @staticmethod
    def unflatten(aggregates: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
        flat = torch.cat(aggregates)
        out, offset = [], 0
        for tensor in like:
            out.append(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
        return out

    def robust_round(
        self, step: int, active: list[Peer], sent: dict
    ) -> tuple[list[torch.Tensor], list[bytes]]:
        """One BTARD round among `active`; returns (the aggregates honest members apply, accusations)."""
        from swarm.averaging.accusations import (
            BAD_AGGREGATE,
            EQUIVOCATION,
            REDUCER_EQUIVOCATION,
            make_accusation,
        )
        from swarm.averaging.btard import chunk_seed
        from swarm.averaging.commitments import (
            after_payload,
            chunk_digests,
            commit_payload,
            part_bytes,
            projections_payload,
            result_payload,
        )
        from swarm.averaging.projection import check_chunk, project, projection_vector
        from swarm.averaging.reducers import centered_clip
        from swarm.averaging.statements import digest, expect, sign_statement

        group = hashlib.sha256(f"group/{step}".encode()).digest()[:20]
        chunks, reducers = self.split(active, sent)
        self.round_chunks[step] = chunks, reducers

        # 1. every member commits to its chunks and to a secret (its gathered data in a real round)
        secrets, commits, committed = {}, {}, {}
        for peer in active:
            secrets[peer.id] = hashlib.sha256(
                f"secret/{self.args.seed}/{step}/{peer.index}".encode()
            ).digest()
            hashes = chunk_digests(sent[peer.id], self.args.part_size)
            commits[peer.id] = sign_statement(
                peer.key, commit_payload(PREFIX, step, hashes, digest(secrets[peer.id]))
            )
            committed[peer.id] = hashes

        # 2. the all-reduce: senders send parts, each reducer checks them against the commitments, reduces
        # the accepted ones with CenteredClip and signs the result
        findings: dict[str, list[bytes]] = {}  # reducer id -> its equivocation accusations
        refused: dict[str, set[str]] = {}  # reducer id -> senders it dropped from its all-reduce
        failed: set[str] = set()  # members whose round failed (a reducer left their part out)
        aggregates: list[torch.Tensor] = []
        for c, reducer in enumerate(reducers):
            dropped = refused.setdefault(reducer.id, set())
            senders, parts = [], []
            for peer in active:
                if peer.id in dropped:
                    continue
                part = chunks[peer.id][c]
                if peer.fault is not None and peer is not reducer:  # its own part never leaves the reducer
                    part = peer.fault.tamper_part(part, c, step)
                if digest(part_bytes(part)) != committed[peer.id][c]:
                    statement = self.sent_statement(peer, step, c, commits[peer.id])
                    evidence = [commits[peer.id], statement]
                    accusation = make_accusation(
                        reducer.key, EQUIVOCATION, peer.id, PREFIX, step, group, c, evidence
                    )
                    findings.setdefault(reducer.id, []).append(accusation)
                    dropped.add(peer.id)
                    failed.add(peer.id)
                    self.refused_parts += 1
                    continue
                senders.append(peer)
                parts.append(part)
            aggregate, info = centered_clip(torch.stack(parts), tau=self.tau)
            self.unconverged += not info.converged
            if reducer.fault is not None:
                aggregate = reducer.fault.tamper_aggregate(aggregate, c, step)
            result = sign_statement(
                reducer.key,
                result_payload(
                    PREFIX, step, group, c, digest(part_bytes(aggregate)), [p.id for p in senders]
                ),
            )
            kept = {p.id: commits[p.id] for p in senders}
            self.records[step, c] = ChunkRecord(reducer, senders, parts, aggregate, result, kept)
            aggregates.append(aggregate)
        # a member whose part a reducer refused gets that reducer's results refused in turn: its round fails
        ok = [peer for peer in active if peer.id not in failed]

        # 3. after the round (RoundChecker): the members publish their secrets and the results they signed
        result_hashes = [expect(self.records[step, c].result)["hash"] for c in range(len(reducers))]
        afters, after_blobs = {}, {}
        for peer in ok:
            own = {c: result_hashes[c] for c, r in enumerate(reducers) if r is peer}
            blob = after_blobs[peer.id] = sign_statement(
                peer.key, after_payload(PREFIX, step, group, secrets[peer.id], own)
            )
            afters[peer.id] = expect(
                blob, signer=peer.id, kind="after", prefix=PREFIX, step=step, group=group
            )
        accusations = [blob for reducer in ok for blob in findings.get(reducer.id, [])]
        accused: dict[str, set[str]] = {peer.id: set() for peer in ok}  # checker -> reducers it accused
        for c, reducer in enumerate(reducers):  # a reducer that sent a result other than it published
            record = self.records[step, c]
            if reducer.id in afters and afters[reducer.id]["results"].get(c) != result_hashes[c]:
                for checker in ok:
                    if checker is not reducer and reducer.id not in accused[checker.id]:
                        accused[checker.id].add(reducer.id)
                        evidence = [record.result, after_blobs[reducer.id]]
                        accusations.append(
                            make_accusation(
                                checker.key,
                                REDUCER_EQUIVOCATION,
                                reducer.id,
                                PREFIX,
                                step,
                                group,
                                c,
                                evidence,
                            )
                        )

        # 4. each chunk's seed from its senders' secrets, and every member's projections of its parts:
        # (<z, x_i - v>, ||x_i - v||, ||v||)
        values: dict[str, dict[int, tuple[float, ...]]] = {peer.id: {} for peer in ok}
        seeds: dict[tuple[str, ...], bytes | None] = {}  # the seed depends on the chunk's senders only
        for c in range(len(reducers)):
            record = self.records[step, c]
            senders = tuple(p.id for p in record.senders)
            if senders not in seeds:
                seeds[senders] = chunk_seed(senders, commits, afters)
            if seeds[senders] is None:
                continue
            z = projection_vector(seeds[senders], c, record.aggregate.numel())
            norm = float(record.aggregate.double().norm())
            for peer in ok:
                values[peer.id][c] = (*project(chunks[peer.id][c], record.aggregate, z), norm)
        published, projection_blobs = {}, {}
        for peer in ok:
            blob = projection_blobs[peer.id] = sign_statement(
                peer.key, projections_payload(PREFIX, step, group, values[peer.id])
            )
            payload = expect(blob, signer=peer.id, kind="projections", prefix=PREFIX, step=step, group=group)
            published[peer.id] = payload["values"]

        # 5. the projection check of every chunk by every member but its reducer; one accusation per reducer,
        # carrying the statements its verdict rests on
        for c, reducer in enumerate(reducers):
            record = self.records[step, c]
            if seeds[tuple(p.id for p in record.senders)] is None:
                continue
            chunk_values = [published.get(p.id, {}).get(c) for p in record.senders]
            if any(not isinstance(v, list) or len(v) != 3 for v in chunk_values):
                continue  # someone did not publish: no verdict either way
            norm = sorted(v[2] for v in chunk_values)[len(chunk_values) // 2]
            if check_chunk([(v[0], v[1]) for v in chunk_values], self.tau, aggregate_norm=norm):
                continue
            self.failed_checks += 1
            evidence = [record.result]
            evidence += [after_blobs[p.id] for p in record.senders]
            evidence += [projection_blobs[p.id] for p in record.senders]
            for checker in ok:
                if checker is reducer or reducer.id in accused[checker.id]:
                    continue
                accused[checker.id].add(reducer.id)
                accusations.append(
                    make_accusation(checker.key, BAD_AGGREGATE, reducer.id, PREFIX, step, group, c, evidence)
                )
        return self.unflatten(aggregates, sent[active[0].id]), accusations

    async def recheck(self, accusation: dict) -> tuple[str | None, str]:
        """BanList's re-check of a bad_aggregate accusation, as `btard.recheck_aggregate` does it: the
        evidence the accused reducer kept, the senders' statements the accusation carries."""
        from swarm.averaging.accusations import GOOD_FAITH, judge_aggregate
        from swarm.averaging.btard import carried_statements, chunk_seed

        step, chunk = int(accusation["step"]), int(accusation["chunk"])
        record = self.records.get((step, chunk))
        if record is None or record.reducer.id != accusation["accused"]:
            return accusation["accused"], f"kept no evidence of chunk {chunk} it reduced at step {step}"
        afters, projections = carried_statements(accusation)
        seed = chunk_seed([p.id for p in record.senders], record.commits, afters)
        if seed is None:
            verdict = GOOD_FAITH, f"the seed of chunk {chunk} at step {step} can't be rebuilt"
        else:
            parts = [
                (peer.id, part, self.sent_statement(peer, step, chunk, record.commits[peer.id]))
                for peer, part in zip(record.senders, record.parts, strict=True)
            ]
            verdict = judge_aggregate(
                record.result,
                record.reducer.id,
                record.commits,
                parts,
                record.aggregate,
                projections,
                seed,
                lambda x: self.reduce(x, None),
                self.tau,
                accused_result=bytes(accusation["evidence"][0]),
            )
        if verdict[0] == GOOD_FAITH:
            self.good_faith += (
                1  # a justified accusation, nobody cheated (e.g. a reduction that stopped short)
            )
        return verdict


def _count_reasons(verdicts) -> dict[str, int]:
    counts: dict[str, int] = {}
    for verdict in verdicts:
        kind = _reason_kind(verdict.reason)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _reason_kind(reason: str) -> str:
    """A verdict's reason, short: what the guilty peer was banned for."""
    if "false accusation" in reason and "did not converge" in reason:
        return "false accusation (the reducer's CenteredClip did not converge)"
    for kind in ("equivocated", "bad aggregate", "other than it published", "false accusation", "bogus"):
        if kind in reason:
            return kind
    return reason


def make_peers(count: int) -> list[Peer]:
    from hivemind.utils.crypto import RSAPrivateKey

    from swarm.dht.identity import peer_id_of

    keys = [RSAPrivateKey() for _ in range(count)]
    return [Peer(i, key, peer_id_of(key)) for i, key in enumerate(keys)]


def choose_attackers(count: int, peers: int, seed: int) -> list[int]:
    """Which peers attack: a seeded sample, the same for every attack (and spread over the reducers)."""
    return sorted(random.Random(f"attackers/{seed}/{count}").sample(range(peers), count))


def simulation(args, emit) -> list[dict]:
    """Part A: every (aggregator, attack, attacker count), after the honest-only run of each aggregator."""
    from swarm.testing.faults import parse_fault

    task = Task(args.seed)
    peers = make_peers(args.sim_peers)
    common = {
        "name": "byzantine_training",
        "benchmark": "byzantine",
        "model": f"MLP {FEATURES}-{HIDDEN}-{CLASSES} on {CLASSES}-class gaussian data",
        "params": sum(p.numel() for p in task.initial_params()),
        "part_size_bytes": args.part_size,
        "chunks": len(_chunks(task, args.part_size)),
        "peers": args.sim_peers,
        "rounds": args.rounds,
        "batch": args.batch,
        "lr": args.lr,
        "device": "cpu",
        "device_name": device_name("cpu"),
    }
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared machine
    try:
        for aggregator in args.aggregators:
            honest = None
            configs = [(None, 0)] + [(a, b) for a in args.attacks for b in args.attackers]
            for attack, count in configs:
                attacking = set(choose_attackers(count, len(peers), args.seed))
                for peer in peers:
                    text = f"byzantine:{attack}" + (f":n={len(peers)}:b={count}" if attack == "alie" else "")
                    peer.fault = parse_fault(text) if peer.index in attacking else None
                result = Simulation(task, peers, aggregator, attack, args).run()
                if honest is None:
                    honest = result
                ratio = None
                if result["final_loss"] is not None and honest["final_loss"]:
                    ratio = round(result["final_loss"] / honest["final_loss"], 3)
                row = {
                    **common,
                    "aggregator": aggregator,
                    "tau": args.tau if aggregator == "centered_clip" else None,
                    "attack": attack or "none",
                    "attackers": count,
                    "attacker_peers": sorted(attacking),
                    **result,
                    "honest_final_loss": honest["final_loss"],
                    "honest_final_accuracy": honest["final_accuracy"],
                    "loss_ratio": ratio,
                }
                if aggregator == "mean":
                    for key in (
                        "attackers_banned",
                        "rounds_to_ban_all",
                        "ban_rounds",
                        "attacker_ban_reasons",
                    ):
                        row[key] = None  # no checks: nobody can be banned
                    for key in (
                        "accusations",
                        "refused_parts",
                        "failed_checks",
                        "good_faith_settlements",
                        "unconverged_clips",
                    ):
                        row.pop(key)
                if attack in GRADIENT_ATTACKS and aggregator == "centered_clip":
                    row["note"] = "contained by CenteredClip only: no gradient validation, never banned"
                if not rows:
                    row["notes"] = NOTES_SIMULATION
                rows.append(row)
                emit(row)
    finally:
        torch.set_num_threads(threads)
    return rows


def _chunks(task: Task, part_size: int) -> list[torch.Tensor]:
    from swarm.averaging.commitments import split_chunks

    return split_chunks(task.initial_params(), part_size)


# ---- Part B: one robust round against one plain all-reduce, real hivemind peers --------------------------


def timing(args) -> dict:
    """Median seconds of plain and robust GroupAverager rounds among `--peers` peers, and of the checks."""
    from benchmarks.training import wait_until_connected
    from swarm.averaging import GroupAverager
    from swarm.averaging.commitments import split_chunks
    from swarm.averaging.group import robust_part_size
    from swarm.averaging.reducers import centered_clip
    from swarm.averaging.statements import signing_key_of
    from swarm.dht.factory import create_dht

    templates = [torch.zeros(args.floats)]
    part_size = robust_part_size(templates)
    inputs = timing_inputs(args.floats, args.peers, part_size, args.tau, args.seed)
    first_chunk = torch.stack([x[0][: part_size // 4] for x in inputs])
    clip_iterations = centered_clip(first_chunk, tau=args.tau)[1].iterations
    tag = uuid.uuid4().hex[:8]
    dhts, averagers, plain, robust = [], [], [], []
    plain_s, robust_s, check_s = [], [], []
    accusations = 0
    options = dict(min_matchmaking_time=args.matchmaking_time, request_timeout=args.matchmaking_time / 2)
    with contextlib.ExitStack() as stack:
        hosts = peer_hosts(stack, args)
        try:
            maddrs = []
            for peer in range(args.peers):
                # each peer's DHT and averager processes (and its p2p daemon) start on its host, if any
                with hosts[peer]() as address:
                    dht, validator = create_dht(maddrs, host=address)
                    dhts.append((dht, validator))
                    maddrs = maddrs or [str(m) for m in dht.get_visible_maddrs()]
                    plain.append(GroupAverager(dht, f"bench_byz_plain_{tag}", templates, **options))
                    averagers.append(plain[-1])
                    robust.append(
                        GroupAverager(
                            dht,
                            f"bench_byz_robust_{tag}",
                            templates,
                            aggregator="centered_clip",
                            tau=args.tau,
                            signing_key=signing_key_of(validator),
                            accusations_key=f"bench_byz_{tag}_accusations",
                            check_timeout=args.check_timeout,
                            **options,
                        )
                    )
                    averagers.append(robust[-1])
            wait_until_connected([dht for dht, _ in dhts])
            for repeat in range(args.repeats + 1):  # the first of each warms up
                plain_round, _, _ = timed_round(plain, inputs, repeat, args.timeout, checks=False)
                robust_round, checks, filed = timed_round(robust, inputs, repeat, args.timeout, checks=True)
                accusations += filed
                if repeat:
                    plain_s.append(plain_round)
                    robust_s.append(robust_round)
                    check_s.append(checks)
        finally:
            for averager in averagers:
                averager.shutdown()
            for dht, _ in reversed(dhts):
                dht.shutdown()

    def median(values):
        done = [v for v in values if v is not None]
        return round(statistics.median(done), 3) if done else None

    plain_median, robust_median = median(plain_s), median(robust_s)
    ratio = round(robust_median / plain_median, 3) if plain_median and robust_median else None
    return {
        "name": "byzantine_round",
        "benchmark": "byzantine",
        "peers": args.peers,
        "rate_mbit": args.rate_mbit,  # null: every peer on 127.0.0.1, no bandwidth limit
        "floats": args.floats,
        "megabytes": round(args.floats * 4 / 2**20, 2),
        "part_size_bytes": part_size,
        "chunks": len(split_chunks(templates, part_size)),
        "tau": args.tau,
        "clip_iterations_first_chunk": clip_iterations,
        "repeats": args.repeats,
        "plain_round_s": plain_median,
        "robust_round_s": robust_median,
        "ratio": ratio,
        "goal_ratio": GOAL_RATIO,
        "meets_goal": None if ratio is None else ratio <= GOAL_RATIO,
        "check_s": median(check_s),
        "plain_rounds_s": plain_s,
        "robust_rounds_s": robust_s,
        "check_rounds_s": check_s,  # null: a round that failed, or checks that did not finish
        "accusations_filed": accusations,  # by the checks of every robust round, the warm-up's included
        "device": "cpu",
        "device_name": device_name("cpu"),
        "notes": NOTES_TIMING,
    }


def peer_hosts(stack: contextlib.ExitStack, args) -> list:
    """Per peer, a context manager giving the address its DHT listens on, with the calling thread on
    that peer's host for the block: 127.0.0.1 for every peer, or with --rate-mbit one network namespace
    per peer whose outgoing traffic is limited to that rate (`swarm.testing.netns`; needs root)."""
    if args.rate_mbit is None:
        return [lambda: contextlib.nullcontext("127.0.0.1")] * args.peers
    from swarm.testing.netns import NetnsHarness

    harness = stack.enter_context(NetnsHarness())

    def on_host(name: str):
        @contextlib.contextmanager
        def entered():
            with harness.entered(name) as host:
                yield host.address

        return entered

    for peer in range(args.peers):
        harness.add_host(f"peer{peer}", rate_mbit=args.rate_mbit)
    return [on_host(f"peer{peer}") for peer in range(args.peers)]


def timing_inputs(floats: int, peers: int, part_size: int, tau: float, seed: int) -> list[list[torch.Tensor]]:
    """A common vector plus per-peer noise of norm about tau / 2 per chunk (see NOTES_TIMING)."""
    generator = torch.Generator().manual_seed(seed)
    scale = 0.5 * tau / math.sqrt(min(part_size // 4, floats))
    # the common part no larger than the spread, as with gradients; far larger, float32 rounding of the
    # aggregate becomes a visible part of the projection check's residual
    common = scale * torch.randn(floats, generator=generator)
    return [[common + scale * torch.randn(floats, generator=generator)] for _ in range(peers)]


def timed_round(
    group, inputs, key: int, timeout: float, checks: bool
) -> tuple[float | None, float | None, int]:
    """(seconds of one round: the slowest member's call, seconds of the checks after it: the slowest
    member's, from the end of its round, the accusations those checks filed); None for a round that failed
    for any member, or checks that did not finish."""
    size = len(group)

    def one(member: int) -> tuple[bool, float, float | None]:
        averager = group[member]
        started = time.perf_counter()
        outcome = averager.average(inputs[member], 1.0, size, timeout, round_key=key)
        ended = time.perf_counter()
        checked, filed = None, 0
        if checks and outcome.ok and averager.last_check is not None:
            try:
                filed = len(averager.last_check.result(timeout=timeout))
                checked = time.perf_counter() - ended
            except Exception:
                checked = None
        return outcome.ok and outcome.group_size == size, ended - started, checked, filed

    with ThreadPoolExecutor(size) as pool:
        outcomes = list(pool.map(one, range(size)))
    filed = sum(f for *_, f in outcomes)
    if not all(ok for ok, *_ in outcomes):
        return None, None, filed
    round_s = round(max(seconds for _, seconds, _, _ in outcomes), 3)
    check_times = [c for _, _, c, _ in outcomes]
    check_s = round(max(check_times), 3) if checks and None not in check_times else None
    return round_s, check_s, filed


# ---- the command line ------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rounds", type=int, default=50, help="simulated rounds (optimizer steps) per config"
    )
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--attackers", type=int, nargs="+", default=[3, 7], help="attacker counts")
    parser.add_argument("--aggregators", nargs="+", choices=AGGREGATORS, default=list(AGGREGATORS))
    parser.add_argument("--sim-peers", type=int, default=16, help="simulated peers")
    parser.add_argument(
        "--tau",
        type=float,
        default=0.1,
        help="CenteredClip's tau, per chunk: set it near the honest spread of a chunk's values (about 0.09 "
        "for the simulation's 64-value chunks; 1.0 lets 3 sign_flip attackers of 16 pull each chunk by "
        "0.23, several times its honest gradient, and training diverges)",
    )
    parser.add_argument(
        "--part-size", type=int, default=256, help="simulated chunk size in bytes (44 chunks)"
    )
    parser.add_argument("--batch", type=int, default=32, help="samples per peer per round")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--floats", type=int, default=10_000_000, help="float32 values of a timed round")
    parser.add_argument("--peers", type=int, default=4, help="real averaging peers for the timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of each kind (after a warm-up)")
    parser.add_argument(
        "--rate-mbit",
        type=float,
        default=None,
        help="put each timed peer on its own host (network namespace, needs root) sending at most this "
        "many Mbit/s; by default every peer is on 127.0.0.1 with no limit",
    )
    parser.add_argument("--matchmaking-time", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for one timed round")
    parser.add_argument("--check-timeout", type=float, default=10.0)
    parser.add_argument("--skip-simulation", action="store_true", help="Part B (timing) only")
    parser.add_argument("--skip-timing", action="store_true", help="Part A (simulation) only")
    parser.add_argument("--output", type=Path, default=None, help="also append the JSON lines to this file")
    parser.add_argument("--quick", action="store_true", help="15 rounds, 3 attacks, 3 attackers, 100k floats")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 15)
        args.attacks = [a for a in args.attacks if a in QUICK_ATTACKS] or list(QUICK_ATTACKS)
        args.attackers = [min(args.attackers)]
        args.floats, args.peers, args.repeats = min(args.floats, 100_000), min(args.peers, 2), 1
    if args.rounds < 1 or args.sim_peers < 2 or args.peers < 2 or args.repeats < 1:
        parser.error("--rounds and --repeats must be >= 1, --sim-peers and --peers >= 2")
    if any(not 0 <= b < args.sim_peers / 2 for b in args.attackers):
        parser.error("attacker counts must be >= 0 and below half of --sim-peers")
    if not (math.isfinite(args.tau) and args.tau > 0):
        parser.error("--tau must be a finite number > 0")
    if args.rate_mbit is not None:
        from swarm.testing.netns import unavailable_reason

        if not (math.isfinite(args.rate_mbit) and args.rate_mbit > 0):
            parser.error("--rate-mbit must be a finite number > 0")
        if reason := unavailable_reason():
            parser.error(f"--rate-mbit needs network namespaces: {reason}")
    run_until_sigterm(measure, args)


def measure(args) -> None:
    def emit(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if args.output is not None:
            with args.output.open("a") as out:
                out.write(line + "\n")

    rows = [] if args.skip_simulation else simulation(args, emit)
    if rows:
        print_table(rows)
    failed = [r for r in rows if r["honest_banned"]]
    if not args.skip_timing:
        row = timing(args)
        emit(row)
        print(
            f"round of {args.floats} floats among {args.peers} peers: plain {row['plain_round_s']} s, "
            f"robust {row['robust_round_s']} s (x{row['ratio']}, goal <= {GOAL_RATIO}), "
            f"checks after it {row['check_s']} s",
            file=sys.stderr,
        )
    if failed:  # after every row is out: the results show what happened
        names = ", ".join(f"{r['aggregator']}/{r['attack']}/{r['attackers']}" for r in failed)
        raise SystemExit(
            f"FAILED: honest peers were banned in {names} (honest_banned must be 0); e.g. "
            f"{failed[0]['honest_ban_example']}"
        )


def print_table(rows: list[dict]) -> None:
    """The Part A rows, readable, on stderr (stdout carries the JSON lines)."""
    print(
        f"{'aggregator':<14}{'attack':<17}{'b':>2} {'loss':>8} {'acc':>6} {'x honest':>9} "
        f"{'banned':>7} {'rounds':>7} {'honest banned':>14}",
        file=sys.stderr,
    )
    for row in rows:
        loss = "diverged" if row["final_loss"] is None else f"{row['final_loss']:.4f}"
        acc = "-" if row["final_accuracy"] is None else f"{row['final_accuracy']:.3f}"
        ratio = "-" if row["loss_ratio"] is None else f"{row['loss_ratio']:.2f}"
        banned = "-" if row["attackers_banned"] is None else f"{row['attackers_banned']}/{row['attackers']}"
        rounds = "-" if row["rounds_to_ban_all"] is None else str(row["rounds_to_ban_all"])
        print(
            f"{row['aggregator']:<14}{row['attack']:<17}{row['attackers']:>2} {loss:>8} {acc:>6} {ratio:>9} "
            f"{banned:>7} {rounds:>7} {row['honest_banned']:>14}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
