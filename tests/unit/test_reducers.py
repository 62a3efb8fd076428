"""Aggregation rules (mean, median, trimmed mean, CenteredClip) and the robust part reducer: no network."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from hivemind.averaging.partition import AllreduceException

from swarm.averaging.reducers import (
    REDUCERS,
    ClipInfo,
    centered_clip,
    get_reducer,
    mean,
    median,
    trimmed_mean,
)
from swarm.averaging.robust import RobustTensorPartReducer


def _honest_and_sign_flip(n: int = 16, b: int = 7, d: int = 1000, seed: int = 0):
    """n - b honest gradients around a common mean (norm ~160, noise 0.01 per value), b senders of -1000 x."""
    gen = torch.Generator().manual_seed(seed)
    common = 5.0 * torch.randn(d, generator=gen)
    honest = common + 0.01 * torch.randn(n - b, d, generator=gen)
    attackers = -1000.0 * honest[:b]
    return torch.cat([honest, attackers]), honest


def test_centered_clip_with_huge_tau_is_the_mean():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, generator=gen)
    result, info = centered_clip(x, tau=1e12)
    assert torch.allclose(result, x.mean(dim=0), atol=1e-6)
    assert info.converged and info.iterations <= 3
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    weighted, _ = centered_clip(x, weights, tau=1e12)
    expected = (x.double() * weights.double()[:, None]).sum(0) / weights.sum()
    assert torch.allclose(weighted.double(), expected, atol=1e-6)
    assert not torch.allclose(weighted, result, atol=1e-3)  # the weights did matter


def test_centered_clip_resists_sign_flip_attack():
    n, b, tau = 16, 7, 1.0
    x, honest = _honest_and_sign_flip(n, b)
    honest_mean = honest.mean(dim=0)
    result, info = centered_clip(x, tau=tau)
    distance = float((result - honest_mean).norm())

    assert isinstance(info, ClipInfo) and info.converged and info.iterations < 100
    # b attackers pulling in one direction move the fixed point by b * tau / (n - b) (= 0.78 here) from the
    # honest mean however large their vectors are; the honest spread (~0.3) is within tau, so honest
    # senders are not clipped. This is CenteredClip's guarantee, checked with a little slack.
    assert distance <= b * tau / (n - b) + 0.01, distance
    assert distance <= 0.01 * float(honest_mean.norm()), (distance, float(honest_mean.norm()))
    # the plain mean is dragged ~400x the honest mean's norm away; the test can fail
    assert float((mean(x) - honest_mean).norm()) > 100 * float(honest_mean.norm())


def test_centered_clip_stops_at_max_iter():
    x, _ = _honest_and_sign_flip()
    _, info = centered_clip(x, tau=1.0, max_iter=1)
    assert info.iterations == 1 and not info.converged and info.step_norm > 1e-6


def test_median_hand_checked():
    x = torch.tensor([[1.0, 5.0], [3.0, -1.0], [2.0, 7.0]])
    assert torch.equal(median(x), torch.tensor([2.0, 5.0]))
    # even count: the lower of the two middle values, with or without (equal) weights
    even = torch.tensor([[4.0], [1.0], [3.0], [2.0]])
    assert torch.equal(median(even), torch.tensor([2.0]))
    assert torch.equal(median(even, torch.ones(4)), torch.tensor([2.0]))
    # weighted: cumulative weights of the sorted values 1, 2, 3 are 1, 2, 7 -> half of 7 is first reached at 3
    assert torch.equal(
        median(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1.0, 1.0, 5.0])), torch.tensor([3.0])
    )
    # a list of tensors is stacked; a 1-D input is one scalar per sender
    assert torch.equal(
        median([torch.tensor([1.0, 9.0]), torch.tensor([5.0, 0.0]), torch.tensor([2.0, 4.0])]),
        torch.tensor([2.0, 4.0]),
    )
    assert torch.equal(median(torch.tensor([9.0, 1.0, 5.0])), torch.tensor([5.0]))


def test_trimmed_mean_hand_checked():
    x = torch.tensor([[1.0, 10.0], [2.0, -50.0], [3.0, 20.0], [100.0, 30.0]])
    # drop the smallest and the largest of each coordinate: (2 + 3) / 2 and (10 + 20) / 2
    assert torch.equal(trimmed_mean(x, count=1), torch.tensor([2.5, 15.0]))
    assert torch.equal(trimmed_mean(x, trim_fraction=0.25), torch.tensor([2.5, 15.0]))
    assert torch.equal(trimmed_mean(x, count=0), x.mean(dim=0))
    # weights follow their values through the sort: first coordinate keeps 2 (w=1) and 3 (w=3) -> 11 / 4
    weighted = trimmed_mean(x, torch.tensor([1.0, 1.0, 3.0, 1.0]), count=1)
    assert weighted[0].item() == pytest.approx(2.75)
    assert weighted[1].item() == pytest.approx((10.0 * 1 + 20.0 * 3) / 4)


def test_mean_hand_checked():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert torch.equal(mean(x), torch.tensor([2.0, 4.0]))
    assert torch.allclose(mean(x, torch.tensor([3.0, 1.0])), torch.tensor([1.5, 3.0]))


@pytest.mark.parametrize("name", sorted(REDUCERS))
def test_bad_inputs_raise_value_error(name):
    reducer = get_reducer(name)
    bad_inputs = [
        torch.zeros(0, 3),  # no senders
        [],  # no senders
        torch.tensor([[1.0, math.nan], [2.0, 3.0]]),  # NaN
        torch.tensor([[1.0, math.inf], [2.0, 3.0]]),  # inf
        [torch.zeros(2), torch.zeros(3)],  # mismatched shapes
    ]
    for x in bad_inputs:
        with pytest.raises(ValueError):
            reducer(x)
    x = torch.ones(3, 2)
    for weights in (
        torch.ones(2),
        torch.tensor([1.0, -1.0, 1.0]),
        torch.zeros(3),
        torch.tensor([1, math.nan, 1]),
    ):
        with pytest.raises(ValueError):
            reducer(x, weights)


def test_bad_reducer_names_and_options():
    with pytest.raises(ValueError, match="centered_clip.*mean.*median.*trimmed_mean"):
        get_reducer("krum")
    with pytest.raises(ValueError, match="tao"):
        get_reducer("centered_clip", tao=1.0)
    for tau in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError):
            get_reducer("centered_clip", tau=tau)
        with pytest.raises(ValueError):
            centered_clip(torch.ones(2, 2), tau=tau)
    with pytest.raises(ValueError):
        trimmed_mean(torch.ones(4, 1), count=2)  # would drop everything
    with pytest.raises(ValueError):
        trimmed_mean(torch.ones(4, 1), count=1, trim_fraction=0.25)  # ambiguous
    # options are bound: the reducer runs with them
    x, honest = _honest_and_sign_flip()
    clip = get_reducer("centered_clip", tau=1.0)
    assert torch.allclose(clip(x), centered_clip(x, tau=1.0)[0])
    assert torch.equal(
        get_reducer("trimmed_mean", count=1)(torch.tensor([[0.0], [5.0], [100.0]])), torch.tensor([5.0])
    )


def _run_reducer(make_reducer, parts_by_sender: dict[int, list[torch.Tensor]], weights: list[float]):
    """Senders submit their parts in order, concurrently; returns each sender's results and the reducer."""

    async def main():
        reducer = make_reducer()  # inside the loop: it creates asyncio futures

        async def send(sender: int):
            return [
                await reducer.accumulate_part(sender, index, part, weight=weights[sender])
                for index, part in enumerate(parts_by_sender[sender])
            ]

        results = await asyncio.wait_for(asyncio.gather(*(send(s) for s in parts_by_sender)), timeout=10)
        return results, reducer

    return asyncio.run(main())


def test_robust_part_reducer_ignores_reported_weights():
    shapes = [torch.Size([4]), torch.Size([2])]
    parts = {s: [torch.full(shape, float(s + 1)) for shape in shapes] for s in range(3)}
    # with "mean" as the rule, ignoring weights shows: the weighted mean would be ~3.0
    results, reducer = _run_reducer(
        lambda: RobustTensorPartReducer(shapes, 3, reducer=lambda x: mean(x)), parts, weights=[1.0, 1.0, 1e6]
    )
    for per_sender in results:
        assert torch.equal(per_sender[0], torch.full((4,), 2.0))  # (1 + 2 + 3) / 3
        assert torch.equal(per_sender[1], torch.full((2,), 2.0))
    assert reducer.finished.is_set()


def test_robust_part_reducer_refuses_a_nan_part_and_finishes_without_its_sender():
    shapes = [torch.Size([3]), torch.Size([3])]

    async def scenario():
        reducer = RobustTensorPartReducer(shapes, 3, reducer=lambda x: median(x))

        async def honest(sender: int, value: float):
            return [await reducer.accumulate_part(sender, i, torch.full((3,), value)) for i in range(2)]

        async def cheater():
            with pytest.raises(AllreduceException):
                await reducer.accumulate_part(2, 0, torch.tensor([1.0, math.nan, 1.0]))
            reducer.on_sender_failed(2)  # what AllReduceRunner does with a sender whose part raised
            with pytest.raises(AllreduceException):  # wrong shape is refused too
                await reducer.accumulate_part(2, 0, torch.zeros(4))

        tasks = [honest(0, 1.0), honest(1, 5.0), cheater()]
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
        return results, reducer

    (first, second, _), reducer = asyncio.run(scenario())
    # median of the two honest senders (1, 5): the lower middle, 1 -- the cheater's part never counted
    assert all(torch.equal(r, torch.full((3,), 1.0)) for r in first + second)
    assert reducer.finished.is_set()


# ---- the fast paths: they must compute exactly what the plain definitions do ----------------------------


def _reference_centered_clip(x: torch.Tensor, tau: float, eps: float = 1e-6, max_iter: int = 500):
    """CenteredClip written plainly (torch.median start, a fresh float64 difference every step)."""
    n = x.shape[0]
    flat = x.reshape(n, -1).double()
    v = x.median(dim=0).values.reshape(-1).double()
    iterations, converged = 0, False
    while iterations < max_iter:
        diff = flat - v
        dist = diff.norm(dim=1)
        c = torch.clamp(tau / dist, max=1.0)
        step = (c.unsqueeze(1) * diff).sum(dim=0) / c.sum()
        v = v + step
        iterations += 1
        if float(step.norm()) <= eps * float((c * dist).sum() / n) or float(step.norm()) == 0.0:
            converged = True
            break
    return v.reshape(x.shape[1:]).to(x.dtype), iterations, converged


def test_median_network_matches_torch_median():
    gen = torch.Generator().manual_seed(3)
    for n in [*range(1, 20), 31, 32, 33, 64, 65, 100]:  # above 64 senders: torch.median itself
        x = torch.randn(n, 301, generator=gen)
        if n > 3:
            x[1] = x[0]  # ties
            x[2, :50] = x[3, :50]
        for values in (x, x.double(), x.round()):  # rounded: many equal values per column
            assert torch.equal(median(values), values.median(dim=0).values), n


def test_median_of_rows_matches_torch_median_and_leaves_the_rows_alone():
    from swarm.averaging.reducers import _lower_median_rows

    gen = torch.Generator().manual_seed(4)
    for n in [1, 2, 3, 4, 5, 7, 8, 16, 17, 70]:
        x = torch.randn(n, 257, generator=gen)
        if n > 3:
            x[1] = x[0]  # ties
        for values in (x, x.double(), x.half(), x.round()):
            rows = [r.clone() for r in values.unbind(0)]
            area = torch.full((n + 2, 257), math.nan, dtype=torch.float64)
            got = _lower_median_rows(rows, area)
            assert torch.equal(got, values.median(dim=0).values), (n, values.dtype)
            assert all(torch.equal(r, v) for r, v in zip(rows, values.unbind(0), strict=True))


def test_centered_clip_of_nearly_equal_senders_takes_exact_distances():
    # senders a few ulps apart next to their norm: ||x_i||^2 - 2 <x_i, v> + ||v||^2 would be all rounding
    gen = torch.Generator().manual_seed(8)
    base = 1000.0 + torch.randn(4096, generator=gen, dtype=torch.float64)
    x = base + 1e-9 * torch.randn(5, 4096, generator=gen, dtype=torch.float64)
    x[0] = base + 1e-6 * torch.randn(4096, generator=gen, dtype=torch.float64)  # one farther off
    for tau in (1e-8, 1e-5, 1e-3):  # below about 1e-6 neither converges: steps are float64 rounding of v
        result, info = centered_clip(x, tau=tau)
        expected, iterations, converged = _reference_centered_clip(x, tau)
        assert info.converged == converged and abs(info.iterations - iterations) <= 1, tau
        assert torch.allclose(result, expected, rtol=0, atol=1e-12), tau
    assert info.converged


def test_centered_clip_takes_a_list_of_parts_like_their_stack():
    gen = torch.Generator().manual_seed(9)
    parts = [torch.randn(3, 50, generator=gen) for _ in range(6)]
    parts[2] = parts[2] * -100
    stacked, info = centered_clip(torch.stack(parts), tau=0.5)
    listed, listed_info = centered_clip(parts, tau=0.5)
    assert torch.equal(listed, stacked) and listed.shape == (3, 50) and listed_info == info
    with pytest.raises(ValueError, match="dtypes"):
        centered_clip([parts[0], parts[1].double()], tau=0.5)


def test_all_finite_finds_nan_and_inf_anywhere():
    from swarm.averaging.reducers import all_finite

    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = torch.randn(4, 1031).to(dtype)
        assert all_finite(x) and all_finite(x[:, 5:]) and all_finite(torch.zeros(0, dtype=dtype))
        for bad in (math.nan, math.inf, -math.inf):
            for position in (0, 1, 7, 8, 15, 16, 17, 511, 1030, 1031, 2062, 4123):
                y = x.clone()
                y.view(-1)[position] = bad
                assert not all_finite(y), (dtype, bad, position)
        assert not all_finite(torch.full((9,), math.nan, dtype=dtype))
    assert all_finite(torch.arange(5))  # integers are always finite


def test_centered_clip_matches_the_plain_iteration():
    gen = torch.Generator().manual_seed(11)
    for trial in range(60):
        n = int(torch.randint(2, 17, (1,), generator=gen))
        d = int(torch.randint(1, 2000, (1,), generator=gen))
        x = 3 * torch.randn(d, generator=gen) + torch.randn(n, d, generator=gen)
        attackers = int(torch.randint(0, (n - 1) // 2 + 1, (1,), generator=gen))
        x[:attackers] *= -100.0
        x = x.double() if trial % 2 else x
        tau = float(10 ** (torch.rand(1, generator=gen) * 4 - 2))
        result, info = centered_clip(x, tau=tau)
        expected, iterations, converged = _reference_centered_clip(x, tau)
        assert result.dtype == x.dtype and result.shape == x.shape[1:]
        assert torch.allclose(result.double(), expected.double(), rtol=1e-6, atol=1e-9), trial
        assert info.converged == converged and abs(info.iterations - iterations) <= 1, (trial, info)


def test_centered_clip_results_are_independent_of_its_reused_buffer():
    from concurrent.futures import ThreadPoolExecutor

    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randn(4, 5000, generator=gen) * (i + 1) for i in range(8)]
    first = centered_clip(inputs[0], tau=0.5)[0]
    kept = first.clone()
    sequential = [centered_clip(x, tau=0.5)[0] for x in inputs]
    assert torch.equal(first, kept)  # later calls did not write into an earlier result
    with ThreadPoolExecutor(4) as pool:  # concurrent calls: one reuses the buffer, the others allocate
        concurrent = list(pool.map(lambda x: centered_clip(x, tau=0.5)[0], inputs * 3))
    for got, want in zip(concurrent, sequential * 3, strict=True):
        assert torch.equal(got, want)


def test_running_ahead_keeps_order_passes_errors_and_stops_its_producer():
    from swarm.averaging.robust import _running_ahead

    async def scenario():
        produced, closed = [], asyncio.Event()

        async def items(fail_at: int | None = None):
            try:
                for i in range(5):
                    if i == fail_at:
                        raise ValueError("bad part")
                    produced.append(i)
                    yield i
                    await asyncio.sleep(0)
            finally:
                closed.set()

        got = []
        async for i in _running_ahead(items()):
            await asyncio.sleep(0.01)  # a slow consumer: the producer runs ahead
            got.append(i)
        assert got == list(range(5))

        got, produced[:] = [], []
        with pytest.raises(ValueError, match="bad part"):
            async for i in _running_ahead(items(fail_at=3)):
                got.append(i)
        assert got == [0, 1, 2]  # the items before the error first

        closed.clear()
        async for _ in _running_ahead(items()):
            break  # the consumer stops early: the producer is stopped and its generator closed
        await asyncio.wait_for(closed.wait(), 1)

    asyncio.run(scenario())
