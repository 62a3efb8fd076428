"""BTARD's checks around a robust all-reduce: commit before, reveal and verify after, accuse on proof.

Before a round every member signs a commitment to its chunks and to a secret (`commit_round`); it travels
as the member's gathered data, so every reducer can check each part it receives against it. After the
all-reduce (`RoundChecker`, run in the background while training goes on):

1. each sender publishes an `after` statement: its secret and the hashes of the results it signed as a
   reducer. A reducer that sent a result other than the one it published is caught by the sender that
   received it (two signed statements: proof of equivocation);
2. the secrets of a chunk's senders give that chunk's random seed, which no single peer chose (each
   secret was committed before anyone revealed); from it, a random direction z;
3. each sender publishes <z, x_i - v> and ||x_i - v|| for every chunk (x_i: its part, v: the aggregate);
   at CenteredClip's fixed point sum_i min(1, tau/||x_i - v||) (x_i - v) = 0, so the published values must
   cancel out (`swarm.averaging.projection`). A reducer whose chunk fails is accused; anyone re-checks the
   accusation from the parts the reducer kept (`swarm.averaging.accusations`).

Accusations are signed statements stored under the run's accusation key; `BanList` judges them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from hivemind.dht import DHT
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from swarm.averaging.accusations import make_accusation
from swarm.averaging.commitments import (
    after_payload,
    chunk_digests,
    commit_payload,
    projections_payload,
    round_key,
    split_chunks,
)
from swarm.averaging.projection import check_chunk, check_reveals, combine_seed, project, projection_vector
from swarm.averaging.robust import RoundTranscript
from swarm.averaging.statements import InvalidStatement, digest, expect, open_statement, sign_statement
from swarm.dht.identity import owner_marker, peer_id_of

logger = logging.getLogger(__name__)

ROUND_RECORD_TTL = 600.0  # seconds a round's after/projections records stay readable (for re-checks)
ACCUSATION_TTL = 24 * 3600.0  # seconds an accusation stays in the DHT (bans are kept in memory for good)


@dataclass
class RoundRecord:
    """One robust round as this member saw it: what the checks after it need."""

    prefix: str
    transcript: RoundTranscript
    sent: list[torch.Tensor]  # what this member committed to and sent
    results: list[torch.Tensor]  # the aggregates it received
    secret: bytes
    # set by the checks: the members whose parts were reduced, and the round's seed from all their secrets
    # (None when one of them did not reveal); what else is chosen at random after a round draws from it
    members: list[str] = field(default_factory=list)
    seed: bytes | None = None


def commit_round(
    key: RSAPrivateKey, prefix: str, step: int, tensors: Sequence[torch.Tensor], part_size_bytes: int
) -> tuple[bytes, bytes]:
    """Sign this member's commitment for a round; returns (commit statement, the secret it commits to)."""
    secret = os.urandom(32)
    chunks = chunk_digests(tensors, part_size_bytes)
    return sign_statement(key, commit_payload(prefix, step, chunks, digest(secret))), secret


DHT_TIMEOUT = 10.0  # seconds for one DHT call: a DHT that was shut down never answers, and a check's thread
# blocked forever would hold up the interpreter's exit


def store_statement(dht: DHT, key: str, tag: str, signer: RSAPrivateKey, blob: bytes, ttl: float) -> bool:
    """Store a statement under `key`, in a subkey only `signer` may write (the DHT checks the marker)."""
    subkey = f"{tag}:{peer_id_of(signer)}".encode() + owner_marker(signer)
    future = dht.store(key, blob, get_dht_time() + ttl, subkey=subkey, return_future=True)
    return bool(future.result(timeout=DHT_TIMEOUT))


def _get(dht: DHT, key: str):
    return dht.get(key, latest=True, return_future=True).result(timeout=DHT_TIMEOUT)


def _stored_under(dht: DHT, key: str, prefix: bytes) -> list[tuple[bytes, bytes]]:
    """(subkey, value) of the bytes values under `key` whose subkey starts with `prefix`."""
    found = _get(dht, key)
    if found is None or not isinstance(found.value, dict):
        return []
    return [
        (subkey, item.value)
        for subkey, item in found.value.items()
        if isinstance(subkey, bytes) and subkey.startswith(prefix) and isinstance(item.value, bytes)
    ]


def read_statements(dht: DHT, key: str, tag: str) -> dict[str, bytes]:
    """Statements stored with `store_statement` under `key` and `tag`: peer id -> statement."""
    prefix = f"{tag}:".encode()
    return {
        subkey[len(prefix) :].split(b"[owner:")[0].decode(errors="replace"): value
        for subkey, value in _stored_under(dht, key, prefix)
    }


def chunk_seed(senders: Sequence[str], commits: dict[str, bytes], afters: dict[str, dict]) -> bytes | None:
    """The random seed of a chunk: its senders' revealed secrets, each checked against its commitment.
    None when a sender has not revealed (or revealed something it did not commit to)."""
    seed_commits = {}
    for sender in senders:
        try:
            seed_commits[sender] = open_statement(commits[sender])[1]["seed_commit"]
        except (KeyError, InvalidStatement):
            return None
    reveals = {s: afters[s].get("seed") for s in senders if s in afters}
    if check_reveals(seed_commits, reveals):
        return None
    return combine_seed([reveals[s] for s in senders])


class RoundChecker:
    """Runs BTARD's checks after a robust round and files the accusations it can prove.

    :param dht: this member's DHT
    :param signing_key: this member's identity key
    :param accusations_key: the run's DHT key for accusations
    :param tau: CenteredClip's tau for the projection check; None skips that check (median and trimmed
      mean have no fixed point to test)
    :param timeout: how long to wait for the other members' statements in each phase
    :param on_seed: called with the round's `RoundRecord` once its seed is known (record.seed, .members)
    """

    def __init__(
        self,
        dht: DHT,
        signing_key: RSAPrivateKey,
        accusations_key: str,
        tau: float | None,
        part_size_bytes: int,
        timeout: float = 15.0,
        poll_period: float = 0.1,
        on_seed=None,
    ):
        self.dht, self.key, self.accusations_key = dht, signing_key, accusations_key
        self.tau, self.part_size_bytes = tau, part_size_bytes
        self.timeout, self.poll_period = timeout, poll_period
        # called with the round's record as soon as its seed is known (before the projection checks)
        self.on_seed = on_seed
        self.own_id = peer_id_of(signing_key)
        self.filed: list[bytes] = []
        self.stopped = threading.Event()  # set on shutdown: a check in progress gives up at its next wait

    def __call__(self, record: RoundRecord) -> list[bytes]:
        """Check one round; returns the accusations filed."""
        try:
            accusations = self._check(record)
            for blob in accusations:  # retried stores hold up only these checks: rounds go on meanwhile
                file_accusation(self.dht, self.accusations_key, self.key, blob)
        except Exception as e:  # a check that breaks must never take training down with it
            if self.stopped.is_set():
                return []
            logger.warning("BTARD checks of step %d failed: %r", record.transcript.step, e, exc_info=True)
            return []
        self.filed.extend(accusations)
        return accusations

    def _accuse(
        self, record: RoundRecord, reason: str, accused: str, chunk: int, evidence: list[bytes]
    ) -> bytes:
        t = record.transcript
        logger.warning("accusing %s of %s (chunk %d, step %d)", accused, reason, chunk, t.step)
        return make_accusation(self.key, reason, accused, record.prefix, t.step, t.group_id, chunk, evidence)

    def _gather(
        self, key: str, tag: str, senders: Sequence[str], **fields
    ) -> tuple[dict[str, bytes], dict[str, dict]]:
        deadline = time.monotonic() + self.timeout
        blobs: dict[str, bytes] = {}
        payloads: dict[str, dict] = {}
        while True:
            for peer, blob in read_statements(self.dht, key, tag).items():
                if peer in senders and peer not in payloads:
                    try:
                        payloads[peer] = expect(blob, signer=peer, **fields)
                        blobs[peer] = blob
                    except InvalidStatement:
                        pass
            if len(payloads) == len(senders) or time.monotonic() > deadline:
                return blobs, payloads
            if self.stopped.wait(self.poll_period):
                raise RuntimeError("the averager is shutting down")

    def _check(self, record: RoundRecord) -> list[bytes]:
        t = record.transcript
        key = round_key(record.prefix, t.step, t.group_id)
        fields = dict(prefix=record.prefix, step=t.step, group=t.group_id)
        accusations = [self._accuse(record, f.reason, f.accused, f.chunk, f.evidence) for f in t.findings]

        received = {chunk: expect(blob) for chunk, blob in t.results.items()}
        own_results = {c: r["hash"] for c, r in received.items() if t.chunk_reducers[c] == self.own_id}
        after = sign_statement(
            self.key, after_payload(record.prefix, t.step, t.group_id, record.secret, own_results)
        )
        store_statement(self.dht, key, "after", self.key, after, ROUND_RECORD_TTL)
        # members whose parts were reduced; one whose round failed (e.g. its parts were refused) won't come
        senders = sorted({s for r in received.values() for s in r["senders"]})
        after_blobs, afters = self._gather(key, "after", senders, kind="after", **fields)
        missing = sorted(set(senders) - set(afters))
        record.members, record.seed = senders, chunk_seed(senders, t.commits, afters)
        if self.on_seed is not None and record.seed is not None:
            try:
                self.on_seed(record)
            except Exception as e:
                logger.warning("handling the seed of step %d failed: %r", t.step, e)
        if missing:
            logger.warning("step %d: %s published no after-round statement", t.step, ", ".join(missing))

        accused_reducers = set()
        for chunk, result in received.items():
            reducer = t.chunk_reducers[chunk]
            if reducer == self.own_id or reducer not in afters or reducer in accused_reducers:
                continue
            if afters[reducer]["results"].get(chunk) != result["hash"]:
                evidence = [t.results[chunk], after_blobs[reducer]]
                accusations.append(self._accuse(record, "reducer_equivocation", reducer, chunk, evidence))
                accused_reducers.add(reducer)

        sent = split_chunks(record.sent, self.part_size_bytes)
        results = split_chunks(record.results, self.part_size_bytes)
        # a seed depends on the chunk's senders only (usually the same for every chunk): verify their
        # commitments once per set, not once per chunk
        by_senders = {tuple(r["senders"]) for r in received.values()}
        seed_of = {senders: chunk_seed(senders, t.commits, afters) for senders in by_senders}
        seeds = {c: seed_of[tuple(r["senders"])] for c, r in received.items()}
        values = {}
        for chunk, seed in seeds.items():
            if seed is not None:
                z = projection_vector(seed, chunk, sent[chunk].numel())
                norm = float(results[chunk].detach().double().norm())
                values[chunk] = (*project(sent[chunk], results[chunk], z), norm)
        projections = sign_statement(self.key, projections_payload(record.prefix, t.step, t.group_id, values))
        store_statement(self.dht, key, "projections", self.key, projections, ROUND_RECORD_TTL)
        if self.tau is None:
            return accusations

        projection_blobs, published = self._gather(
            key, "projections", sorted(afters), kind="projections", **fields
        )
        for chunk, result in received.items():
            reducer = t.chunk_reducers[chunk]
            if reducer == self.own_id or reducer in accused_reducers or seeds.get(chunk) is None:
                continue
            senders = result["senders"]
            chunk_values = [published.get(s, {}).get("values", {}).get(chunk) for s in senders]
            if any(not isinstance(v, list) or len(v) != 3 for v in chunk_values):
                continue  # someone did not publish: no verdict either way
            # every honest sender got the same aggregate: the median of the published norms is its norm
            norm = sorted(v[2] for v in chunk_values)[len(chunk_values) // 2]
            if not check_chunk([(v[0], v[1]) for v in chunk_values], self.tau, aggregate_norm=norm):
                # the statements the verdict rests on travel with the accusation: a sender can't change
                # its published projection (or reveal) afterwards, and the DHT records may expire
                evidence = [t.results[chunk]]
                evidence += [after_blobs[s] for s in senders] + [projection_blobs[s] for s in senders]
                accusations.append(self._accuse(record, "bad_aggregate", reducer, chunk, evidence))
                accused_reducers.add(reducer)
        return accusations


ACCUSATION_TAG = "accuse"


FILE_ATTEMPTS = 4  # a DHT store that times out under load is tried again, after 1, 2 then 4 s


def file_accusation(
    dht: DHT, key: str, accuser: RSAPrivateKey, blob: bytes, attempts: int = FILE_ATTEMPTS
) -> bool:
    """Store an accusation under the run's accusation key `key` (one subkey per accusation), trying again
    when a store fails or times out: an accusation nobody can read convicts nobody. False if none stored."""
    tag = f"{ACCUSATION_TAG}-{digest(blob).hex()[:16]}"
    for attempt in range(attempts):
        try:
            if store_statement(dht, key, tag, accuser, blob, ACCUSATION_TTL):
                return True
            failure = "not stored"
        except Exception as e:
            failure = repr(e)
        logger.info("filing an accusation failed (attempt %d of %d): %s", attempt + 1, attempts, failure)
        if attempt + 1 < attempts:
            time.sleep(2.0**attempt)
    logger.warning("an accusation could not be filed in %d attempts", attempts)
    return False


def read_accusations(dht: DHT, key: str) -> list[bytes]:
    """Every accusation stored under the run's accusation key."""
    return [value for _, value in _stored_under(dht, key, f"{ACCUSATION_TAG}-".encode())]


class EvidenceUnavailable(RuntimeError):
    """The data to re-check an accusation could not be read now (try again later)."""


def carried_statements(accusation: dict) -> tuple[dict[str, dict], dict[str, tuple[float, float]]]:
    """The senders' statements a "bad_aggregate" accusation carries (after its result statement), valid
    for its round: (signer -> after payload, signer -> its published (<z, x_i - v>, ||x_i - v||) of the
    accused chunk). The first valid statement of each kind per signer counts."""
    fields = dict(prefix=accusation["prefix"], step=int(accusation["step"]), group=bytes(accusation["group"]))
    chunk = int(accusation["chunk"])
    afters, projections = {}, {}
    for blob in accusation["evidence"][1:]:
        try:
            signer, statement = open_statement(blob)
            expect(blob, **fields)
        except InvalidStatement:
            continue
        if statement.get("kind") == "after":
            afters.setdefault(signer, statement)
        elif statement.get("kind") == "projections":
            value = statement.get("values", {}).get(chunk)
            if isinstance(value, list) and len(value) == 3:
                projections.setdefault(signer, (value[0], value[1]))
    return afters, projections


async def recheck_aggregate(
    p2p, dht: DHT, accusation: dict, reduce, tau: float | None, timeout: float = 10.0
) -> tuple[str | None, str]:
    """Re-check a "bad_aggregate" accusation from the parts the accused reducer kept and the senders'
    published statements; returns (the guilty peer or None if all statements are consistent, why).

    :raises EvidenceUnavailable: when the reducer could not be reached
    """
    from swarm.averaging.accusations import GOOD_FAITH, judge_aggregate
    from swarm.averaging.robust import fetch_evidence

    accused, prefix, step = accusation["accused"], accusation["prefix"], int(accusation["step"])
    group, chunk = bytes(accusation["group"]), int(accusation["chunk"])
    try:
        evidence = await fetch_evidence(p2p, accused, prefix, step, group, chunk, timeout)
    except Exception as e:
        raise EvidenceUnavailable(f"{accused} did not answer for its evidence: {e!r}") from e
    if evidence is None:
        return accused, f"kept no evidence of chunk {chunk} it reduced at step {step}"
    afters, projections = carried_statements(accusation)
    try:
        senders = expect(evidence.result, signer=accused, kind="result")["senders"]
    except InvalidStatement:
        return accused, f"its result statement for chunk {chunk} is not valid"
    seed = chunk_seed(senders, evidence.commits, afters)
    if seed is None:  # the accusation lacks a sender's valid reveal: it can't be judged, nor blamed on anyone
        return GOOD_FAITH, f"the seed of chunk {chunk} at step {step} can't be rebuilt from the accusation"
    return judge_aggregate(
        evidence.result,
        accused,
        evidence.commits,
        evidence.parts,
        evidence.aggregate,
        projections,
        seed,
        reduce,
        tau,
        accused_result=bytes(accusation["evidence"][0]),
    )
