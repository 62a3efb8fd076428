"""A Byzantine-robust all-reduce on hivemind: each reducer keeps every sender's part and reduces them with a
robust rule from `swarm.averaging.reducers` (CenteredClip, median, trimmed mean) instead of a running sum.

How it plugs into hivemind 1.1.12 (averaging/allreduce.py, partition.py, averager.py):
- `RobustTensorPartReducer` replaces `TensorPartReducer`: it stores each sender's part of the current part
  index and, once every (non-banned) sender has sent it, reduces them in a worker thread. The weight each
  sender reports is ignored: it is the sender's own claim, and BTARD's rules weigh senders equally.
- `RobustAllReduceRunner` replaces `AllReduceRunner`'s reducer with it and refuses parts that arrive
  compressed (anything but CompressionType.NONE): a lossy codec would let a sender's part differ from what
  it hashes or claims, and robust rules are meant to see exactly what was sent. A refused sender is banned
  from this all-reduce, so the others finish without it.
- `RobustDecentralizedAverager` makes the averager's all-reduce use that runner.

Chunks: hivemind splits the flattened tensors into parts of at most `part_size_bytes` (2^19 bytes by
default, i.e. 131,072 fp32 values), and each part is reduced on its own, by the peer it is assigned to.
We keep that: the rule runs **per chunk**. A coordinate-wise rule (median, trimmed mean) gives the same
result as over whole vectors; CenteredClip's norms ||x_i - v|| are per chunk, so `tau` bounds each chunk's
pull, not the whole vector's (b attackers can shift each chunk by about b * tau / (n - b)). Reducing whole
vectors would need one peer to gather every sender's full tensors, defeating the butterfly all-reduce.
Pass a larger `part_size_bytes` to the averager for fewer, larger chunks.

Each sender gets back `result - its own part`, so a malicious reducer can still send different results to
different peers; detecting that (hashing the results) is the job of a layer above.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import typing
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import (
    aiter_with_timeout,
    amap_in_executor,
    as_aiter,
    attach_event_on_finished,
    enter_asynchronously,
)
from hivemind.utils.crypto import RSAPrivateKey

from swarm.averaging.commitments import part_digest, part_hash, parts_payload, result_payload
from swarm.averaging.group import SwarmDecentralizedAverager
from swarm.averaging.reducers import all_finite
from swarm.averaging.statements import InvalidStatement, digest, expect, open_statement, sign_statement
from swarm.utils.streaming import hold_until_caller_closes

logger = logging.getLogger(__name__)

RobustReducer = Callable[[torch.Tensor], torch.Tensor]


class RobustTensorPartReducer(TensorPartReducer):
    """Keeps every sender's part and reduces them with `reducer` once all have arrived (weights ignored).

    :param part_shapes: shapes of the parts this peer reduces, in order
    :param num_senders: peers that send parts (the group minus auxiliary peers)
    :param reducer: f(stacked parts of shape (n_senders, *part_shape)) -> reduced part
    """

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, *, reducer: RobustReducer):
        self.reducer = reducer
        self._parts: dict[int, torch.Tensor] = {}
        self._reducing = False
        self._reduce_task: asyncio.Task | None = None
        # part index -> {sender index: part} that went into its reduction (the round's evidence)
        self.reduced_inputs: dict[int, dict[int, torch.Tensor]] = {}
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        """Move on to the next part index (or finish after the last one)."""
        assert self.current_part_accumulated_from == self.num_current_senders or self.current_part_index == -1
        self._parts, self._reducing = {}, False
        self.accumulator = None  # the parent's finalize deletes it
        if self.current_part_index >= self.num_parts - 1:
            self.finalize()
            return
        self.current_part_index += 1
        self.current_part_accumulated_from = 0
        self.current_part_future = asyncio.Future()
        self.num_current_senders = sum(self.current_part_index < after for after in self.sender_failed_after)
        self.denominator = 0.0

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        """Store a sender's part, wait for every other sender's, return the robust reduction.

        `weight` is accepted for the interface and ignored. A malformed part (wrong shape, NaN/inf) raises
        AllreduceException before anything is counted, so banning its sender cannot leave the part waiting.
        """
        if not 0 <= sender_index < self.num_senders or not 0 <= part_index < self.num_parts:
            raise AllreduceException(f"invalid sender {sender_index} or part {part_index}")
        expected = torch.Size(self.part_shapes[part_index])
        if tensor_part.shape != expected:
            raise AllreduceException(
                f"part {part_index} has shape {tuple(tensor_part.shape)}, expected {expected}"
            )
        if not tensor_part.is_floating_point() or not all_finite(tensor_part):
            raise AllreduceException(f"part {part_index} from sender {sender_index} is not finite floats")

        while part_index > self.current_part_index:  # earlier parts are still being reduced
            finished = asyncio.ensure_future(self.finished.wait())
            try:
                await asyncio.wait({self.current_part_future, finished}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                finished.cancel()
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {type(self).__name__}")

        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        if part_index != self.current_part_index or sender_index in self._parts:
            raise AllreduceException(f"sender {sender_index} sent part {part_index} out of order or twice")

        # counted only once stored: on_sender_failed then expects exactly the parts we really hold
        self.num_parts_received[sender_index] += 1
        future = self.current_part_future
        self._parts[sender_index] = tensor_part
        self.current_part_accumulated_from += 1
        self.check_current_part_finished()
        return await future

    def check_current_part_finished(self) -> None:
        """When every current sender's part is in, reduce them off the event loop."""
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self._reducing or self.finished.is_set():
            return
        if self.current_part_accumulated_from < self.num_current_senders:
            return
        self._reducing = True
        self.reduced_inputs[self.current_part_index] = dict(sorted(self._parts.items()))
        parts = [self._parts[i] for i in sorted(self._parts)]  # sender order: same input, same result
        self._reduce_task = asyncio.create_task(self._reduce_and_advance(parts, self.current_part_future))

    async def _reduce_and_advance(self, parts: list[torch.Tensor], future: asyncio.Future) -> None:
        try:
            if not parts:
                raise AllreduceException("every sender of this part failed")
            # CenteredClip may take hundreds of iterations: don't block the averager's event loop (nor with
            # the stacking: a copy of every part)
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(None, _stack_and_reduce, self.reducer, parts)
            result = result.to(parts[0].dtype).reshape(parts[0].shape)
        except Exception as e:
            logger.warning("robust reducer failed on part %d: %r", self.current_part_index, e)
            if not future.done():
                future.set_exception(AllreduceException(f"robust reducer failed: {e!r}"))
                future.exception()  # retrieved here: only the senders' awaits need it
            self.finalize()
            return
        if self.finished.is_set() or future.done():
            return  # finalized (cancelled) while reducing
        future.set_result(result)
        self.reset_accumulators()

    def finalize(self) -> None:
        """Stop: cancel the current part and drop stored parts."""
        self._parts = {}
        super().finalize()


def _deserialize(serialized: runtime_pb2.Tensor, buffer: bytes) -> torch.Tensor:
    """`deserialize_torch_tensor(serialized)` for an uncompressed tensor whose `buffer` was already read
    (hivemind's NoCompression.extract reads it again); bfloat16 (two encodings) goes through hivemind."""
    if serialized.compression != runtime_pb2.CompressionType.NONE or serialized.dtype == "bfloat16":
        return deserialize_torch_tensor(serialized)
    array = np.frombuffer(bytearray(buffer), dtype=np.dtype(serialized.dtype))
    return torch.as_tensor(array).reshape(torch.Size(serialized.size))


def _stack_and_reduce(reducer: RobustReducer, parts: list[torch.Tensor]) -> torch.Tensor:
    return reducer(parts)


@dataclass
class Finding:
    """Misbehaviour this peer saw during an all-reduce and can prove with the statements in `evidence`."""

    reason: str  # "equivocation" (a sender's part differs from its commitment)
    accused: str
    chunk: int
    evidence: list[bytes]


@dataclass
class ChunkEvidence:
    """What a reducer keeps about one chunk it reduced, to show anyone who re-checks it."""

    commits: dict[str, bytes]  # sender -> its commit statement
    parts: list[tuple[str, torch.Tensor, bytes]]  # (sender, part, its parts statement), in reduction order
    result: bytes  # this reducer's result statement
    aggregate: torch.Tensor


@dataclass
class RoundTranscript:
    """What one robust all-reduce looked like from this peer (returned by the averager's step)."""

    step: int
    group_id: bytes
    peers: list[str]  # the group, in hivemind's order
    senders: list[str]  # peers whose parts were reduced (the group minus excluded peers)
    chunk_reducers: list[str]  # chunk -> the peer that reduced it
    commits: dict[str, bytes]  # sender -> its commit statement
    results: dict[int, bytes]  # chunk -> the result statement this peer received for it
    findings: list[Finding] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # banned, or without a valid commitment


class RobustAllReduceRunner(AllReduceRunner):
    """hivemind's butterfly all-reduce with `RobustTensorPartReducer`, signed parts and signed results.

    - The first part a sender sends a reducer carries its signed parts statement (the hashes of every part
      it sends that reducer, in the message's otherwise unused `peer_id` field): one signature per reducer.
      A reducer refuses a sender whose statement is missing or differs from its commitment (an
      equivocation, proven by the two statements; the sender is dropped from this all-reduce), and a part
      whose bytes do not match the statement.
    - A reducer sends back the aggregate itself (not hivemind's delta), with its signed result statement;
      a sender refuses a result whose bytes do not match it, or that left its own part out.
    - Compressed parts are refused: a lossy codec would make sent bytes differ from committed bytes.
    - Pipelined like hivemind's runner: a sender's next part is checked while the current one waits for the
      others (and is reduced), and a result is signed and sent while the next part is reduced; every check
      still happens before a part is accumulated, and parts are reduced in order, one at a time.

    :param reducer: f(stacked parts) -> reduced part, e.g. `get_reducer("centered_clip", tau=1.0)`
    :param signing_key: this peer's identity key (its peer id is derived from it)
    :param step: the round key every member committed to
    :param round_prefix: the averaging group's name (in every statement)
    :param commits: sender peer id -> (commit statement, its opened payload), for every sender
    :param tamper_part, tamper_aggregate: --fault hooks (see swarm.testing.faults); None when honest
    Other parameters are AllReduceRunner's.
    """

    returns_aggregates = True  # outputs are the signed aggregates, copied into the tensors as they are

    def __init__(
        self,
        *,
        reducer: RobustReducer,
        signing_key: RSAPrivateKey,
        step: int,
        round_prefix: str,
        commits: dict[str, tuple[bytes, dict]],
        tamper_part: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
        tamper_aggregate: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        plain = self.tensor_part_reducer
        plain.finished.set()  # discarded unused: keep its finalize from warning "received 0% of inputs"
        self.tensor_part_reducer = RobustTensorPartReducer(
            plain.part_shapes, plain.num_senders, reducer=_ignore_weights(reducer)
        )
        self.signing_key, self.step, self.round_prefix = signing_key, step, round_prefix
        self.commits = commits
        self.commit_digests = {sender: digest(blob) for sender, (blob, _) in commits.items()}
        self.tamper_part, self.tamper_aggregate = tamper_part, tamper_aggregate
        self.own_id = self.peer_id.to_base58()
        self.own_commit = digest(commits[self.own_id][0]) if self.own_id in commits else b""
        own = commits.get(self.own_id)
        self.own_hashes: list[bytes] | None = own[1]["chunks"] if own is not None else None
        self.sender_ids = [peer.to_base58() for peer in self.sender_peer_ids]
        counts = self.tensor_part_container.num_parts_by_peer
        # parts are assigned to reducers in chunk order, so reducer j holds a contiguous range of chunks
        self.chunk_offsets = [sum(counts[:j]) for j in range(len(counts))]
        self.own_index = self.ordered_peer_ids.index(self.peer_id)
        self.results: dict[int, bytes] = {}
        self.findings: list[Finding] = []
        self.evidence: dict[int, ChunkEvidence] = {}
        # sender index -> (its parts statement for this reducer, the hashes it signs for this reducer's parts)
        self._sender_parts: dict[int, tuple[bytes, list[bytes]]] = {}
        self._signed_results: dict[int, asyncio.Future] = {}

    @property
    def chunk_reducers(self) -> list[str]:
        counts = self.tensor_part_container.num_parts_by_peer
        return [
            peer.to_base58()
            for peer, count in zip(self.ordered_peer_ids, counts, strict=True)
            for _ in range(count)
        ]

    # ---- sending parts ------------------------------------------------------------------------------------

    def _parts_statement(self, first: int, hashes: Sequence[bytes]) -> bytes:
        """This sender's signed hashes of the parts it sends one reducer (chunks first, first + 1, ...)."""
        payload = parts_payload(self.round_prefix, self.step, first, hashes, self.own_commit)
        return sign_statement(self.signing_key, payload)

    def _parts_for_reducer(self, parts: Sequence[torch.Tensor], first: int) -> tuple[bytes, list[Any] | None]:
        """(the parts statement for a reducer, the serialized parts if they had to be serialized to hash them)

        An honest sender signs the hashes it committed to (its parts are the chunks it hashed); a --fault hook
        that changes them signs what it really sends."""
        if self.tamper_part is None and self.own_hashes is not None:
            return self._parts_statement(first, self.own_hashes[first : first + len(parts)]), None
        if self.tamper_part is not None:
            parts = [self.tamper_part(part, first + i, self.step) for i, part in enumerate(parts)]
        serialized = [self._serialized(part) for part in parts]
        return self._parts_statement(first, [digest(s.buffer) for s in serialized]), serialized

    @staticmethod
    def _serialized(part: torch.Tensor) -> runtime_pb2.Tensor:
        return serialize_torch_tensor(part.detach().contiguous(), runtime_pb2.CompressionType.NONE)

    async def _generate_input_for_peer(self, peer_index: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        parts = self.tensor_part_container.get_raw_input_parts(peer_index)
        loop = asyncio.get_running_loop()
        statement, serialized = await loop.run_in_executor(
            None, self._parts_for_reducer, parts, self.chunk_offsets[peer_index]
        )
        if serialized is None:
            # serialized in the background, a part ahead of the stream, as hivemind compresses its parts
            # (TensorPartContainer.iterate_input_parts_for)
            serialized_parts = amap_in_executor(self._serialized, as_aiter(*parts), max_prefetch=PREFETCH)
        else:
            serialized_parts = as_aiter(*serialized)
        part_index = 0
        async for tensor_part in serialized_parts:
            message = averaging_pb2.AveragingData(tensor_part=tensor_part, weight=self.weight)
            if part_index == 0:
                message.code, message.group_id = averaging_pb2.PART_FOR_AVERAGING, self.group_id
                message.peer_id = statement
            part_index += 1
            yield message

    async def _communicate_with_peer(self, peer_id: PeerID) -> None:
        peer_index = self.ordered_peer_ids.index(peer_id)
        if peer_id == self.peer_id:
            await self._reduce_own_parts(peer_index)
            return
        reducer_id = peer_id.to_base58()
        try:
            done_sending = asyncio.Event()
            inputs = attach_event_on_finished(self._generate_input_for_peer(peer_index), done_sending)
            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs)
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()
            part_index, offset = 0, self.chunk_offsets[peer_index]
            # the next result is checked while this one is registered (hivemind's plain runner prefetches too)
            checked = amap_in_executor(
                lambda numbered: self._check_result(numbered[1], reducer_id, offset + numbered[0]),
                _numbered(aiter_with_timeout(stream, self.reducer_timeout)),
                max_prefetch=PREFETCH,
            )
            async for statement, aggregate in checked:
                self.results[offset + part_index] = statement
                self.tensor_part_container.register_processed_part(peer_index, part_index, aggregate)
                part_index += 1
            if part_index != self.tensor_part_container.num_parts_by_peer[peer_index]:
                raise AllreduceException(f"{reducer_id} sent {part_index} results, expected more")
        except BaseException as e:
            if isinstance(e, Exception):
                logger.debug("robust all-reduce with reducer %s failed: %r", reducer_id, e)
            self.tensor_part_container.register_failed_reducer(peer_index)
            raise

    def _check_result(
        self, message: averaging_pb2.AveragingData, reducer_id: str, chunk: int
    ) -> tuple[bytes, torch.Tensor]:
        if message.code != averaging_pb2.AVERAGED_PART:
            raise AllreduceException(f"{reducer_id} sent {averaging_pb2.MessageCode.Name(message.code)}")
        try:
            result = expect(
                message.peer_id,
                signer=reducer_id,
                kind="result",
                prefix=self.round_prefix,
                step=self.step,
                group=self.group_id,
                chunk=chunk,
            )
        except InvalidStatement as e:
            raise AllreduceException(f"{reducer_id}'s result for chunk {chunk} is not signed: {e}") from None
        buffer = message.tensor_part.buffer  # each read of a bytes field copies it: read it once
        if result["hash"] != digest(buffer):
            raise AllreduceException(f"{reducer_id}'s result for chunk {chunk} differs from its signed hash")
        if self.own_id not in result.get("senders", ()):
            raise AllreduceException(f"{reducer_id} left this peer's part of chunk {chunk} out")
        return message.peer_id, _deserialize(message.tensor_part, buffer)

    # ---- reducing ------------------------------------------------------------------------------------------

    async def _reduce_own_parts(self, peer_index: int) -> None:
        sender_index = self.sender_peer_ids.index(self.peer_id)
        offset = self.chunk_offsets[peer_index]

        async def accumulate() -> AsyncIterator[tuple[int, torch.Tensor]]:
            parts = list(self.parts_for_local_averaging)
            # this peer's own parts never travel, so a --fault hook leaves them as they are
            hashes = (
                self.own_hashes[offset : offset + len(parts)]
                if self.own_hashes is not None
                else [part_digest(part) for part in parts]
            )
            statement = await asyncio.get_running_loop().run_in_executor(
                None, self._parts_statement, offset, hashes
            )
            self._sender_parts[sender_index] = (statement, hashes)
            for part_index, part in enumerate(parts):
                yield (
                    part_index,
                    await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, part, weight=1.0
                    ),
                )

        # this peer's next part goes in as soon as a part is reduced: signing the result (here or in a
        # sender's handler) overlaps the next reduction instead of holding it up
        async for part_index, reduced in _running_ahead(accumulate()):
            _, statement, aggregate = await self._signed_result(part_index, reduced)
            self.results[offset + part_index] = statement
            self.tensor_part_container.register_processed_part(peer_index, part_index, aggregate)

    def _open_parts_statement(self, message: averaging_pb2.AveragingData, sender_index: int) -> None:
        """Check the parts statement a sender's first message carries against its commitment and keep it."""
        sender = self.sender_ids[sender_index]
        first, count = self.chunk_offsets[self.own_index], self.tensor_part_reducer.num_parts
        try:
            parts = expect(
                message.peer_id,
                signer=sender,
                kind="parts",
                prefix=self.round_prefix,
                step=self.step,
                first=first,
                commit=self.commit_digests[sender],  # sent under the commitment of this round
            )
        except InvalidStatement as e:
            raise AllreduceException(f"sender {sender}'s parts are not signed: {e}") from None
        hashes = [part_hash(parts, chunk) for chunk in range(first, first + count)]
        if None in hashes or len(parts["hashes"]) != count:
            last = first + count - 1
            raise AllreduceException(f"{sender}'s parts statement does not cover chunks {first} to {last}")
        commit_blob, commit = self.commits[sender]
        for chunk, hash_ in enumerate(hashes, start=first):
            if hash_ != commit["chunks"][chunk]:
                self.findings.append(Finding("equivocation", sender, chunk, [commit_blob, message.peer_id]))
                raise AllreduceException(f"{sender} equivocated: part {chunk} differs from its commitment")
        self._sender_parts[sender_index] = (message.peer_id, hashes)

    def _check_part(
        self, message: averaging_pb2.AveragingData, sender_index: int, part_index: int
    ) -> torch.Tensor:
        sender = self.sender_ids[sender_index]
        chunk = self.chunk_offsets[self.own_index] + part_index
        if message.tensor_part.compression != runtime_pb2.CompressionType.NONE:
            name = runtime_pb2.CompressionType.Name(message.tensor_part.compression)
            raise AllreduceException(f"sender {sender} sent a {name}-compressed part")
        buffer = message.tensor_part.buffer  # each read of a bytes field copies it: read it once
        if self._sender_parts[sender_index][1][part_index] != digest(buffer):
            raise AllreduceException(f"sender {sender}'s part {chunk} differs from its own signature")
        return _deserialize(message.tensor_part, buffer)

    async def _with_parts_statement(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], sender_index: int
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """`stream`, once its first message's parts statement is checked (before any part is)."""
        first = True
        async for message in stream:
            if first:
                await asyncio.get_running_loop().run_in_executor(
                    None, self._open_parts_statement, message, sender_index
                )
                first = False
            yield message

    async def _accumulate_parts_streaming(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], sender_index: int
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        async def accumulate() -> AsyncIterator[tuple[int, torch.Tensor]]:
            # the sender's next part is checked (signature, hash against its commitment) while this one
            # waits for the others, as hivemind's runner deserializes its next part in the background
            checked = amap_in_executor(
                lambda numbered: self._check_part(numbered[1], sender_index, numbered[0]),
                _numbered(self._with_parts_statement(stream, sender_index)),
                max_prefetch=PREFETCH,
            )
            part_index, reducer = 0, self.tensor_part_reducer
            try:
                async for part in checked:
                    try:
                        reduced = await reducer.accumulate_part(sender_index, part_index, part)
                    except BannedException:
                        return
                    yield part_index, reduced
                    part_index += 1
            finally:
                await checked.aclose()  # stops the checks running ahead

        sent = 0
        try:
            # raising bans the sender for the rest of this all-reduce (AllReduceRunner.rpc_aggregate_part);
            # its next part is accumulated while this part's result is signed and sent
            async for part_index, reduced in _running_ahead(accumulate()):
                serialized, statement, _ = await self._signed_result(part_index, reduced)
                sent += 1
                yield averaging_pb2.AveragingData(
                    code=averaging_pb2.AVERAGED_PART, tensor_part=serialized, peer_id=statement
                )
        finally:
            if sent != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])

    async def _signed_result(
        self, part_index: int, reduced: torch.Tensor
    ) -> tuple[runtime_pb2.Tensor, bytes, torch.Tensor]:
        """Sign (once) the aggregate of one of this reducer's parts; every sender gets the same bytes."""
        if part_index not in self._signed_results:
            future = self._signed_results[part_index] = asyncio.get_running_loop().create_future()
            try:
                signed = await asyncio.get_running_loop().run_in_executor(
                    None, self._sign_result, part_index, reduced
                )
                future.set_result(signed)
            except BaseException as e:
                future.set_exception(e)
                raise
        return await asyncio.shield(self._signed_results[part_index])

    def _sign_result(
        self, part_index: int, reduced: torch.Tensor
    ) -> tuple[runtime_pb2.Tensor, bytes, torch.Tensor]:
        chunk = self.chunk_offsets[self.own_index] + part_index
        inputs = self.tensor_part_reducer.reduced_inputs.pop(part_index, {})
        aggregate = reduced.detach().contiguous()
        if self.tamper_aggregate is not None:
            aggregate = self.tamper_aggregate(aggregate, chunk, self.step).contiguous()
        serialized = serialize_torch_tensor(aggregate, runtime_pb2.CompressionType.NONE)
        senders = [self.sender_ids[i] for i in inputs]
        payload = result_payload(  # the hash of serialized.buffer, from the tensor's memory (no copy)
            self.round_prefix, self.step, self.group_id, chunk, part_digest(aggregate), senders
        )
        statement = sign_statement(self.signing_key, payload)
        self.evidence[chunk] = ChunkEvidence(
            commits={sender: self.commits[sender][0] for sender in senders},
            # this peer's own part is a view of the averager's tensors, which the next round overwrites
            parts=[
                (
                    self.sender_ids[i],
                    tensor.clone() if self.sender_ids[i] == self.own_id else tensor,
                    self._sender_parts.get(i, (b"", []))[0],
                )
                for i, tensor in inputs.items()
            ],
            result=statement,
            aggregate=aggregate,
        )
        return serialized, statement, aggregate

    def transcript(self, excluded: list[str]) -> RoundTranscript:
        return RoundTranscript(
            step=self.step,
            group_id=self.group_id,
            peers=[peer.to_base58() for peer in self.ordered_peer_ids],
            senders=list(self.sender_ids),
            chunk_reducers=self.chunk_reducers,
            commits={sender: blob for sender, (blob, _) in self.commits.items()},
            results=dict(self.results),
            findings=list(self.findings),
            excluded=excluded,
        )


PREFETCH = 1  # parts checked (or serialized) ahead of the one in use, like hivemind's default prefetch


async def _numbered(iterable: AsyncIterator[Any]) -> AsyncIterator[tuple[int, Any]]:
    index = 0
    async for item in iterable:
        yield index, item
        index += 1


_DONE = object()


async def _running_ahead(iterable: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Iterate `iterable` in a task of its own, which moves on to its next item while the consumer is
    still busy with the previous ones (items are kept in order; an exception comes after the items
    before it). The task is cancelled when the consumer stops early."""
    queue: asyncio.Queue = asyncio.Queue()

    async def produce() -> None:
        try:
            async for item in iterable:
                queue.put_nowait((True, item))
            queue.put_nowait((True, _DONE))
        except BaseException as e:  # CancelledError too (a finalized reducer cancels its part's future)
            queue.put_nowait((False, e))

    task = asyncio.create_task(produce())
    try:
        while True:
            ok, item = await queue.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            yield item
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if hasattr(iterable, "aclose"):
            with contextlib.suppress(BaseException):
                await iterable.aclose()


def _ignore_weights(reducer: Callable[..., torch.Tensor]) -> RobustReducer:
    # senders report their own weights; a robust rule must not let a claim of 10^6 samples buy influence
    def reduce_equal_weights(stacked: torch.Tensor) -> torch.Tensor:
        return reducer(stacked, None)

    return reduce_equal_weights


EVIDENCE_ROUNDS = 4  # rounds whose chunks a reducer keeps for re-checks (memory: about that many models)


class RobustDecentralizedAverager(SwarmDecentralizedAverager):
    """A `DecentralizedAverager` (with GroupAverager's per-round settings) whose all-reduce is robust and
    accountable: members commit to their chunks before the round (the commit statement is their gathered
    data), banned members and members without a valid commitment neither send nor reduce, and each
    reducer keeps what it reduced so that anyone can re-check it (`rpc_btard_evidence`).

    :param reducer: f(x of shape (n_senders, ...), weights=None) -> tensor, e.g. from `get_reducer`; it is
      called with weights=None (reported weights are ignored)
    :param signing_key: this peer's identity key (the DHT's): it signs parts and results
    :param tamper_part, tamper_aggregate: --fault hooks, None when honest
    Other parameters are DecentralizedAverager's; `compression` must stay NoCompression (peers refuse
    compressed parts).
    """

    runner_class = RobustAllReduceRunner
    _rpc_handlers = None  # collect this class's own handlers (hivemind caches them per class, inherited)

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        # hivemind names handlers after the class: a subclass (another runner, a test's cheater) must still
        # reach and be reached by the members of its group
        name = f"RobustDecentralizedAverager.{method_name}"
        return name if namespace is None else f"{namespace}::{name}"

    def __init__(
        self,
        *args: Any,
        reducer: Callable[..., torch.Tensor],
        signing_key: RSAPrivateKey,
        tamper_part: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
        tamper_aggregate: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
        **kwargs: Any,
    ):
        self.reducer, self.signing_key = reducer, signing_key
        self.tamper_part, self.tamper_aggregate = tamper_part, tamper_aggregate
        self._evidence: OrderedDict[tuple[int, bytes], dict[int, ChunkEvidence]] = OrderedDict()
        super().__init__(*args, **kwargs)

    def _make_runner(self, **kwargs: Any) -> AllReduceRunner:
        return RobustAllReduceRunner(
            reducer=self.reducer,
            signing_key=self.signing_key,
            round_prefix=self.prefix,
            tamper_part=self.tamper_part,
            tamper_aggregate=self.tamper_aggregate,
            **kwargs,
        )

    async def _aggregate_in_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any) -> Any:
        bandwidths, mode_ids, gathered = zip(*map(self.serializer.loads, group_info.gathered), strict=True)
        peers = [peer.to_base58() for peer in group_info.peer_ids]
        modes = [AveragingMode(mode) for mode in mode_ids]
        own = self.serializer.loads(gathered[peers.index(self.peer_id.to_base58())])
        _, own_commit = open_statement(own)
        step, num_chunks = int(own_commit["step"]), len(own_commit["chunks"])

        commits: dict[str, tuple[bytes, dict]] = {}
        excluded: list[str] = []
        for index, (peer, data) in enumerate(zip(peers, gathered, strict=True)):
            commit = None
            try:
                blob = self.serializer.loads(data)
                commit = expect(blob, signer=peer, kind="commit", prefix=self.prefix, step=step)
                if len(commit["chunks"]) != num_chunks or not all(
                    isinstance(h, bytes) and len(h) == 32 for h in commit["chunks"]
                ):
                    commit = None
            except Exception:
                commit = None
            if commit is None or peer in self._banned:
                # every honest member excludes the same peers, so they all compute the same partition
                excluded.append(peer)
                modes[index] = AveragingMode.AUX
            else:
                commits[peer] = (blob, commit)
        if len(commits) < 2:
            raise AllreduceException(f"only {len(commits)} members of the group may average")

        bandwidths = [
            bw if mode == AveragingMode.NODE else 0.0 for bw, mode in zip(bandwidths, modes, strict=True)
        ]
        peer_fractions = await asyncio.get_running_loop().run_in_executor(
            None, load_balance_peers, self.total_size, bandwidths, min_vector_size
        )
        async with enter_asynchronously(self.get_tensors()) as local_tensors:
            runner = await self._run_allreduce_inplace_(
                local_tensors,
                group_info,
                peer_fractions=peer_fractions,
                modes=tuple(modes),
                step=step,
                commits=commits,
                **kwargs,
            )
        self._evidence[(step, group_info.group_id)] = runner.evidence
        while len(self._evidence) > EVIDENCE_ROUNDS:
            self._evidence.popitem(last=False)
        return runner.transcript(excluded)

    async def rpc_btard_evidence(
        self, request: averaging_pb2.AveragingData, context: P2PContext
    ) -> typing.AsyncIterator[averaging_pb2.DownloadData]:  # hivemind knows typing's only
        """What this reducer reduced for one chunk: first its result statement, the senders' commitments and
        the aggregate; then each sender's part with its parts statement. Empty when it kept nothing."""
        try:
            query = msgpack.unpackb(request.peer_id, raw=False)
            evidence = self._evidence.get((int(query["step"]), request.group_id), {}).get(int(query["chunk"]))
        except Exception:
            evidence = None
        if evidence is None:
            return
        head = {"result": evidence.result, "commits": evidence.commits, "parts": len(evidence.parts)}
        yield averaging_pb2.DownloadData(
            metadata=msgpack.packb(head, use_bin_type=True),
            tensor_part=serialize_torch_tensor(evidence.aggregate, runtime_pb2.CompressionType.NONE),
        )
        for sender, part, statement in evidence.parts:
            yield averaging_pb2.DownloadData(
                metadata=msgpack.packb({"sender": sender, "part": statement}, use_bin_type=True),
                tensor_part=serialize_torch_tensor(part, runtime_pb2.CompressionType.NONE),
            )
        await hold_until_caller_closes()


async def fetch_evidence(
    p2p: P2P, reducer: str, prefix: str, step: int, group: bytes, chunk: int, timeout: float
) -> ChunkEvidence | None:
    """Ask a reducer for what it reduced for one chunk (None when it sent nothing)."""
    stub = RobustDecentralizedAverager.get_stub(p2p, PeerID.from_base58(reducer), namespace=prefix)
    request = averaging_pb2.AveragingData(
        group_id=group, peer_id=msgpack.packb({"step": step, "chunk": chunk}, use_bin_type=True)
    )

    async def collect() -> ChunkEvidence | None:
        head, parts = None, []
        async with contextlib.aclosing(await stub.rpc_btard_evidence(request)) as stream:  # closed here first
            async for message in stream:
                meta = msgpack.unpackb(message.metadata, raw=False)
                tensor = deserialize_torch_tensor(message.tensor_part)
                if head is None:
                    head = (meta, tensor)
                else:
                    parts.append((str(meta["sender"]), tensor, bytes(meta["part"])))
                if len(parts) == int(head[0]["parts"]):
                    break
        if head is None:
            return None
        meta, aggregate = head
        if len(parts) != int(meta["parts"]):
            raise AllreduceException(f"{reducer} sent {len(parts)} of the {meta['parts']} parts it announced")
        return ChunkEvidence(
            commits=dict(meta["commits"]), parts=parts, result=bytes(meta["result"]), aggregate=aggregate
        )

    return await asyncio.wait_for(collect(), timeout)
