"""Expert-merging math (modular.continual.merge) on hand-worked examples and a float64 exactness check."""

import pytest
import torch
import torch.nn.functional as F

from modular.continual.merge import (
    concat_swiglu,
    disjoint_mean,
    elect_sign,
    task_arithmetic,
    ties,
    trim_to_density,
    weighted_average,
)
from modular.errors import ConfigError


def test_weighted_average_hand_example():
    w = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # two experts of shape [2]
    assert torch.equal(weighted_average(w, [1.0, 3.0]), torch.tensor([2.5, 5.0]))  # (1·w0 + 3·w1) / 4
    assert torch.equal(weighted_average(w, [2.0, 2.0]), torch.tensor([2.0, 4.0]))  # weights need not sum to 1


def test_weighted_average_rejects_bad_weights():
    w = torch.ones(2, 3)
    with pytest.raises(ConfigError, match="3 entries for 2 experts"):
        weighted_average(w, [1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match=">= 0"):
        weighted_average(w, [1.0, -1.0])
    with pytest.raises(ConfigError, match="sum to 0"):
        weighted_average(w, [0.0, 0.0])


def test_task_arithmetic_hand_example():
    base = torch.tensor([1.0, 1.0, 1.0])
    experts = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 0.0]])  # τ = [1,0,-1], [0,2,-1]
    # base + 0.5·(τ0 + τ1) = [1,1,1] + 0.5·[1,2,-2]
    assert torch.equal(task_arithmetic(experts, base, 0.5), torch.tensor([1.5, 2.0, 0.0]))


def test_trim_keeps_top_density_per_task_vector():
    tau = torch.tensor([[0.1, -0.5, 0.3, 0.05], [2.0, 0.0, -1.0, 0.5]])
    kept = trim_to_density(tau, 0.5)  # ⌈0.5·4⌉ = 2 entries per row
    assert torch.equal(kept, torch.tensor([[0.0, -0.5, 0.3, 0.0], [2.0, 0.0, -1.0, 0.0]]))
    assert torch.equal(trim_to_density(tau, 1.0), tau)
    with pytest.raises(ConfigError, match="density=0"):
        trim_to_density(tau, 0.0)


def test_trim_never_keeps_more_than_asked_on_ties():
    tau = torch.ones(1, 10)
    assert int((trim_to_density(tau, 0.3) != 0).sum()) == 3


def test_sign_election_and_disjoint_mean_hand_example():
    tau = torch.tensor([[3.0, -1.0, 0.0, 2.0], [-1.0, -1.0, 0.0, 0.0], [-1.0, 4.0, 0.0, 0.0]])
    sign = elect_sign(tau)  # sums: 1, 2, 0, 2 → +, +, + (tie at zero), +
    assert torch.equal(sign, torch.tensor([1.0, 1.0, 1.0, 1.0]))
    # entry 0: only 3 agrees → 3; entry 1: only 4 agrees → 4; entry 2: nobody → 0; entry 3: only 2 → 2
    assert torch.equal(disjoint_mean(tau, sign), torch.tensor([3.0, 4.0, 0.0, 2.0]))
    tau2 = torch.tensor([[1.0, -3.0], [2.0, -1.0], [-0.5, 1.0]])  # sums 2.5, -3 → +, −
    sign2 = elect_sign(tau2)
    assert torch.equal(sign2, torch.tensor([1.0, -1.0]))
    assert torch.equal(disjoint_mean(tau2, sign2), torch.tensor([1.5, -2.0]))  # mean(1,2), mean(-3,-1)


def test_ties_hand_example():
    base = torch.zeros(4)
    experts = torch.tensor([[0.9, -0.1, 0.5, 0.0], [0.7, 0.8, -0.6, 0.0]])
    # density 0.5 keeps 2 per row: [0.9, 0, 0.5, 0] and [0.7, 0.8, 0, 0] (|-0.6| is the row's third largest)
    # signs: +, +, +, + ; disjoint means: 0.8, 0.8, 0.5, 0
    merged = ties(experts, base, density=0.5, scale=1.0)
    torch.testing.assert_close(merged, torch.tensor([0.8, 0.8, 0.5, 0.0]))


def test_ties_is_shift_invariant_and_keeps_equal_experts():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 3, generator=g, dtype=torch.float64)
    experts = base + 0.1 * torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
    shifted = ties(experts + 2.0, base + 2.0, density=0.4) - 2.0
    torch.testing.assert_close(shifted, ties(experts, base, density=0.4))
    same = base.unsqueeze(0).repeat(3, 1, 1)
    assert torch.equal(ties(same, base, 0.2), base)  # zero task vectors → the base
    assert torch.equal(task_arithmetic(same, base, 0.7), base)


def test_merges_reject_a_base_of_the_wrong_shape():
    with pytest.raises(ConfigError, match="base has shape"):
        ties(torch.zeros(2, 3, 4), torch.zeros(3, 5))
    with pytest.raises(ConfigError, match="base has shape"):
        task_arithmetic(torch.zeros(2, 3), torch.zeros(4), 1.0)


def swiglu(x, gate, up, down):
    return F.silu(x @ gate.t()) * (x @ up.t()) @ down.t()


def test_concat_swiglu_is_the_weighted_sum_of_the_experts_exactly():
    g = torch.Generator().manual_seed(0)
    E, Fd, D = 3, 5, 4
    gate, up = (torch.randn(E, Fd, D, generator=g, dtype=torch.float64) for _ in range(2))
    down = torch.randn(E, D, Fd, generator=g, dtype=torch.float64)
    a = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    x = torch.randn(7, D, generator=g, dtype=torch.float64)
    expected = sum(a[e] * swiglu(x, gate[e], up[e], down[e]) for e in range(E))
    cg, cu, cd = concat_swiglu(gate, up, down, a)
    assert cg.shape == (E * Fd, D) and cd.shape == (D, E * Fd)
    torch.testing.assert_close(swiglu(x, cg, cu, cd), expected, rtol=1e-12, atol=1e-12)
