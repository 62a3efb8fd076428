"""BTARD's random-projection check of a reduced chunk: is the aggregate v really CenteredClip's fixed point?

A reducer returns v for one chunk that n senders sent parts x_1..x_n of. Nobody but the reducer holds all
the parts, and shipping them to every member would cost as much as the all-reduce itself. Instead:

1. once the round is over, the members reveal secrets they committed to before it (`check_reveals`); the
   secrets of a chunk's senders give its seed (`combine_seed`), which no single peer could choose, and the
   seed a random direction z ~ N(0, I) (`projection_vector`) that the reducer could not know in advance;
2. each sender publishes two numbers for the chunk: s_i = <z, x_i - v> and n_i = ||x_i - v|| (`project`);
3. CenteredClip's fixed point satisfies sum_i c_i (x_i - v) = 0 with c_i = min(1, tau / ||x_i - v||), so
   sum_i c_i s_i = <z, sum_i c_i (x_i - v)> must vanish. Anyone can compute it from the published numbers
   (`fixed_point_residual`); a chunk whose residual exceeds `CHECK_TOLERANCE` is accused, and the
   accusation is re-checked from the parts the reducer kept (`swarm.averaging.accusations`).

Why CenteredClip must be run to convergence: the check tests the fixed-point equation, not "the output of
k iterations". A reducer that stopped early returns a v about one step off the fixed point, a residual of
about n ||last step|| / sum_i c_i n_i, and would be accused although honest. The re-check then clears it
(it recomputes the same reduction and finds it equal), and the accuser, honest too, is banned for a false
accusation. So every reducer must stop only where the relative residual is far below the tolerance.

Rounding: v travels as float32, so even the exact fixed point is off by up to 2^-24 ||v||, a residual of
about 1e-7 ||v|| / ||x_i - v||. Where the parts are close next to their norm that alone fails the check
(parts a few ulps apart give residuals of order 1); `check_chunk(aggregate_norm=||v||)` allows for it.

What it cannot catch:
- a shift of v that is small next to the senders' spread: with w = sum_i c_i (x_i - v), <z, w> has standard
  deviation ||w||, so a perturbation d of v shows as about |g| * ||d|| * sum_i c_i / sum_i c_i n_i with g
  standard normal. A shift of 1% of the typical distance ||x_i - v|| is flagged unless |g| < 0.01
  (0.8% of directions; z is fresh every round, so a reducer that keeps shifting is caught soon), of
  0.1% unless |g| < 0.1 (8%), of 0.01% only when |g| > 1 (32%), and below that practically never;
- a shift orthogonal to z, for the same reason (but z is drawn after v is fixed, so v can't aim for that);
- lies in the inputs: a sender that sends a bad (but committed) part is CenteredClip's job, not this check's;
- a reducer's bad aggregate covered by a colluding sender: s_i is free, so one sender that publishes
  s_i = -(the others' sum) / c_i makes any chunk pass, and nobody accuses. Only the reducer holds the
  parts needed to see the lie (an honest reducer can check every published projection of its chunks;
  a dishonest one won't). A lie that makes an honest chunk fail is caught: the re-check of the
  accusation recomputes every sender's numbers and bans the liar;
- anything about chunks whose senders did not all reveal their secrets (no seed, no check).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

SECRET_BYTES = 32
CHECK_TOLERANCE = 1e-4  # honest chunks reduced by a converged CenteredClip stay below ~1e-6 (see tests)
FLOAT32_ROUNDOFF = 2.0**-24  # relative rounding error of a float32 value
ROUNDING_SLACK = 20.0  # `check_chunk` forgives this many times sum_i c_i * unit_roundoff * ||v||


def combine_seed(reveals: Sequence[bytes]) -> bytes:
    """The round's shared seed: sha256 of the members' 32-byte secrets concatenated in group order."""
    for secret in reveals:
        if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
            raise ValueError(f"a secret must be {SECRET_BYTES} bytes")
    return hashlib.sha256(b"".join(reveals)).digest()


def check_reveals(commits: dict[str, bytes], reveals: dict[str, bytes]) -> list[str]:
    """Peers (in `commits`' order) whose revealed secret is missing or does not hash to their seed_commit.

    Commit-reveal: each peer publishes sha256(secret) before anyone reveals. A peer that wanted to pick
    the seed would have to choose its secret after seeing the others', which its commitment rules out.
    """
    bad = []
    for peer, commitment in commits.items():
        secret = reveals.get(peer)
        if (
            not isinstance(secret, bytes)
            or len(secret) != SECRET_BYTES
            or hashlib.sha256(secret).digest() != commitment
        ):
            bad.append(peer)
    return bad


def projection_vector(seed: bytes, chunk: int, numel: int) -> torch.Tensor:
    """The random direction z of one chunk: `numel` float64 standard normal values, the same on every peer.

    Drawn from a CPU torch.Generator seeded with the first 8 bytes (big endian, masked to 63 bits) of
    sha256(seed + chunk as 8 big-endian bytes).
    """
    h = hashlib.sha256(seed + int(chunk).to_bytes(8, "big")).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(h[:8], "big") & (2**63 - 1))
    return torch.randn(numel, generator=generator, dtype=torch.float64)


def project(part: torch.Tensor, aggregate: torch.Tensor, z: torch.Tensor) -> tuple[float, float]:
    """(<z, part - aggregate>, ||part - aggregate||), in float64 over the flattened tensors."""
    if not part.numel() == aggregate.numel() == z.numel():
        raise ValueError(
            f"sizes differ: part {part.numel()}, aggregate {aggregate.numel()}, direction {z.numel()}"
        )
    diff = part.detach().reshape(-1).cpu().double() - aggregate.detach().reshape(-1).cpu().double()
    # an elementwise product and a sum: BLAS dot of float64 can be slow (thread start-up) on small inputs
    return float((z.reshape(-1).cpu().double() * diff).sum()), float(diff.norm())


def _weighted_sums(values: Sequence[tuple[float, float]], tau: float | None) -> tuple[float, float, float]:
    """(sum_i c_i s_i, sum_i c_i n_i, sum_i c_i); (inf, 1, 1) for non-finite or negative inputs."""
    numerator = denominator = weights = 0.0
    for s, n in values:
        s, n = float(s), float(n)
        if not (math.isfinite(s) and math.isfinite(n)) or n < 0:
            return math.inf, 1.0, 1.0
        c = 1.0 if tau is None or n == 0 else min(1.0, tau / n)
        numerator += c * s
        denominator += c * n
        weights += c
    return numerator, denominator, weights


def fixed_point_residual(values: Sequence[tuple[float, float]], tau: float | None) -> float:
    """|sum_i c_i s_i| / sum_i c_i n_i over the senders' published (s_i, n_i) of one chunk.

    c_i = min(1, tau / n_i) are CenteredClip's weights at v (1 when n_i == 0, and 1 for every sender
    when tau is None: the plain mean). At the fixed point sum_i c_i (x_i - v) = 0, so the numerator is
    |<z, 0>| up to rounding. For any vector w, <z, w> with z ~ N(0, I) has standard deviation ||w||,
    and ||sum_i c_i (x_i - v)|| <= sum_i c_i n_i, so the ratio is a scale-free relative residual: the
    same for gradients of 1e-6 or of 1e6. Non-finite or negative inputs give inf (fails any tolerance).
    """
    numerator, denominator, _ = _weighted_sums(values, tau)
    return abs(numerator) / max(denominator, 1e-30)


def check_chunk(
    values: Sequence[tuple[float, float]],
    tau: float | None,
    tolerance: float = CHECK_TOLERANCE,
    *,
    aggregate_norm: float = 0.0,
    unit_roundoff: float = FLOAT32_ROUNDOFF,
) -> bool:
    """True when the chunk passes: its fixed-point residual is at most `tolerance`.

    :param aggregate_norm: ||v||, if known, to allow for the aggregate's own rounding: v travels in the
      parts' dtype, off the exact fixed point by up to unit_roundoff * ||v||, which moves sum_i c_i s_i by
      about sum_i c_i times that. It matters once the parts are close next to their norm: measured median
      honest residuals of 2e-5 at ||x_i - v|| ~ 1e-3 ||v||, 2e-4 at 1e-4 ||v||, and of order 1 for parts
      a few ulps apart; without it such honest chunks fail. The slack lets a reducer move v by about
      ROUNDING_SLACK ulps, which the check could not tell from rounding anyway.
    """
    numerator, denominator, weights = _weighted_sums(values, tau)
    slack = ROUNDING_SLACK * unit_roundoff * abs(float(aggregate_norm)) * weights
    return abs(numerator) <= tolerance * max(denominator, 1e-30) + slack
