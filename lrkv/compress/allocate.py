"""Rank allocation under a global KV-cache budget, from per-layer error-rank profiles.

The cache of a compressed layer holds G (r_K + r_V) elements per token against 2 G d_h in the
source, so a budget b (fraction of the source cache) is, in rank units,

    sum_l (r_K,l + r_V,l) <= C = floor(b * 2 L d_h).

Each layer has two components (keys, values) whose rank is picked from the candidate grid (plus full
rank d_h); component c at rank r costs r and has profile error e_c(r) (relative block output error
with only that component projected, see profiles.py).

- "pareto" (StiefAttention v1): minimise sum_c w_l(c) e_c(r_c) subject to the budget: a point of
  the weighted error-vs-bytes Pareto front, found exactly by dynamic programming over the integer
  cost (multiple-choice knapsack). Layer weights: early layers 2, late layers 1.75, others 1
  (edge_fraction of the layers at each end, at least one).
- "sequential" (StiefAttention v2): one error target eps for all components; visiting the layers in
  order, each component takes the smallest grid rank with e_c(r) <= eps; eps is the smallest
  profile error value whose allocation fits the budget (bisection: the cost falls as eps grows).

Both then spend what the grid leaves of the budget: while some component can move one grid step up
and still fit, pareto raises the one with the largest weighted error drop per rank, sequential the
first in layer order. So the result fits the budget exactly and no single step up would still fit.
(The paper's text gives the weights and the names; the exact procedures above are our reading.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lrkv.errors import ConfigError

ALLOCATORS = ("pareto", "sequential")


@dataclass
class Allocation:
    k_ranks: list[int]
    v_ranks: list[int]
    used: int  # sum of all ranks
    capacity: int  # C = floor(budget * 2 L d_h)
    total: int  # 2 L d_h, the source cache in rank units

    @property
    def kv_ratio(self) -> float:
        """Cache of the compressed model / cache of the source model."""
        return self.used / self.total


def check_budget(budget) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ConfigError(
            f"compress.budget={budget!r} is outside (0, 1]: "
            "it is the fraction of the original KV cache to keep, e.g. 0.6"
        )
    return float(budget)


def check_feasible(budget: float, ranks: list[int], head_dim: int, n_layer: int) -> None:
    """ConfigError unless every component at the smallest grid rank fits the budget."""
    if 2 * n_layer * ranks[0] > math.floor(budget * 2 * n_layer * head_dim + 1e-9):
        raise ConfigError(
            f"compress.budget={budget} is below the smallest allocation the rank grid allows "
            f"({ranks[0]}/{head_dim} = {ranks[0] / head_dim:.3f} of the cache); "
            "add smaller compress.rank_fractions or raise the budget"
        )


def rank_grid(head_dim: int, fractions) -> list[int]:
    """Candidate ranks round(f d_h) for f in fractions, plus full rank d_h; sorted, unique."""
    fractions = list(fractions)
    if not fractions or any(
        isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1 for f in fractions
    ):
        raise ConfigError(f"compress.rank_fractions={fractions!r} must be a non-empty list of numbers in (0, 1]")
    return sorted({max(1, round(f * head_dim)) for f in fractions} | {head_dim})


def layer_weights(n_layer: int, early: float = 2.0, late: float = 1.75, edge_fraction: float = 0.125) -> list[float]:
    """Weight 'early' for the first ceil(edge_fraction L) layers, 'late' for the last as many, else 1."""
    if not 0 < edge_fraction <= 0.5:
        raise ConfigError(f"compress.pareto.edge_fraction must be in (0, 0.5], got {edge_fraction}")
    edge = max(1, math.ceil(edge_fraction * n_layer))
    weights = [1.0] * n_layer
    for i in range(min(edge, n_layer)):
        weights[n_layer - 1 - i] = late
    for i in range(min(edge, n_layer)):
        weights[i] = early
    return weights


def allocate_ranks(
    profiles: dict, budget: float, method: str = "pareto", weights: list[float] | None = None, **pareto
) -> Allocation:
    """Per-layer (k_ranks, v_ranks) from a profile dict (profiles.py) under the KV budget (module docstring).

    `weights` (pareto only) overrides the early/late layer weights; `pareto` passes early=, late=,
    edge_fraction= to layer_weights.
    """
    budget = check_budget(budget)
    if method not in ALLOCATORS:
        raise ConfigError(f"compress.allocator={method!r} is unknown; use pareto (v1) or sequential (v2)")
    ranks, dh = list(profiles["ranks"]), profiles["head_dim"]
    if ranks != sorted(set(ranks)) or ranks[-1] > dh or ranks[0] < 1:
        raise ConfigError(f"profile ranks {ranks} must be increasing within [1, head_dim={dh}]")
    layers = profiles["layers"]
    n_layer = len(layers)
    errors = [entry[part]["rel_error"] for entry in layers for part in ("k", "v")]  # component c = 2 l + (0 k | 1 v)
    total = 2 * n_layer * dh
    capacity = math.floor(budget * total + 1e-9)
    if ranks[-1] < dh:  # full rank always allowed, error 0
        ranks, errors = ranks + [dh], [e + [0.0] for e in errors]
    check_feasible(budget, ranks, dh, n_layer)
    if method == "pareto":
        w = weights if weights is not None else layer_weights(n_layer, **pareto)
        if len(w) != n_layer:
            raise ConfigError(f"{len(w)} layer weights given for {n_layer} layers")
        cw = [w[c // 2] for c in range(2 * n_layer)]
        choice = pareto_choice(ranks, errors, cw, capacity)
        choice = fill(ranks, errors, cw, choice, capacity, greedy=True)
    else:
        choice = sequential_choice(ranks, errors, capacity)
        choice = fill(ranks, errors, [1.0] * len(errors), choice, capacity, greedy=False)
    chosen = [ranks[j] for j in choice]
    return Allocation(chosen[0::2], chosen[1::2], sum(chosen), capacity, total)


def pareto_choice(ranks, errors, weights, capacity) -> list[int]:
    """Exact min of sum_c w_c e_c(r_c) s.t. sum_c r_c <= capacity (DP over cost); ties: larger cost."""
    n = len(errors)
    dp = np.full(capacity + 1, np.inf)
    dp[0] = 0.0
    arg = np.zeros((n, capacity + 1), dtype=np.int16)
    for c in range(n):
        new = np.full(capacity + 1, np.inf)
        best = np.full(capacity + 1, -1, dtype=np.int16)
        for j, r in enumerate(ranks):
            cand = np.full(capacity + 1, np.inf)
            cand[r:] = dp[: capacity + 1 - r] + weights[c] * errors[c][j]
            better = cand < new
            new[better], best[better] = cand[better], j
        dp, arg[c] = new, best
    finite = np.isfinite(dp)
    lowest = dp[finite].min()
    cost = int(np.flatnonzero(finite & (dp <= lowest + 1e-12 * max(abs(lowest), 1e-300)))[-1])
    choice = [0] * n
    for c in reversed(range(n)):
        choice[c] = int(arg[c, cost])
        cost -= ranks[choice[c]]
    return choice


def sequential_choice(ranks, errors, capacity) -> list[int]:
    """Smallest common error target eps whose per-component smallest ranks fit (module docstring)."""

    def at(eps):
        return [next((j for j, e in enumerate(errs) if e <= eps), len(ranks) - 1) for errs in errors]

    def cost(choice):
        return sum(ranks[j] for j in choice)

    targets = sorted({e for errs in errors for e in errs})
    lo, hi = 0, len(targets) - 1  # at(targets[-1]) takes the smallest grid rank everywhere: fits (checked)
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(at(targets[mid])) <= capacity:
            hi = mid
        else:
            lo = mid + 1
    return at(targets[lo])


def fill(ranks, errors, weights, choice, capacity, greedy: bool) -> list[int]:
    """Raise components one grid step at a time while the budget allows (module docstring)."""
    choice = list(choice)
    used = sum(ranks[j] for j in choice)
    while True:
        fits = [c for c, j in enumerate(choice) if j + 1 < len(ranks) and used + ranks[j + 1] - ranks[j] <= capacity]
        if not fits:
            return choice
        if greedy:

            def gain(c):
                j = choice[c]
                return weights[c] * (errors[c][j] - errors[c][j + 1]) / (ranks[j + 1] - ranks[j])

            fits = [max(fits, key=gain)]
        for c in fits:
            j = choice[c]
            if used + ranks[j + 1] - ranks[j] <= capacity:
                used += ranks[j + 1] - ranks[j]
                choice[c] = j + 1
