"""Continual-learning metrics from the evaluation matrix R[stage][domain] (validation perplexity).

Lower perplexity is better, so every transfer metric is signed so that positive means "helped":
- forgetting of domain j: the worst increase of R[s][j] over its best value in the stages before s,
  for stages s after the one that trained j (absolute, and relative to that best value);
- backward transfer (Lopez-Paz & Ranzato, 2017, for perplexity): mean over earlier domains of
  R[j][j] − R[last][j], i.e. how much later stages lowered (improved) perplexity on earlier domains;
- forward transfer: mean over later domains of R_init[j] − R[j−1][j], how much the stages before j
  lowered j's perplexity before j was trained (R_init: the model before stage 0);
- plasticity: R[j][j], the perplexity on the new domain right after its stage.
Domain j is the one trained in stage j (stages and stream domains correspond one to one).
"""

from __future__ import annotations

import math


def average_perplexity(row: list[float]) -> float:
    return sum(row) / len(row)


def forgetting(matrix: list[list[float]]) -> dict[str, list[float | None]]:
    """Per domain j: worst increase over the best earlier value (None for domains never followed by a stage)."""
    S = len(matrix)
    n = len(matrix[0]) if matrix else 0
    absolute: list[float | None] = []
    relative: list[float | None] = []
    for j in range(n):
        worst_abs = worst_rel = None
        if j < S - 1:
            for s in range(j + 1, S):
                best = min(matrix[t][j] for t in range(j, s))
                inc = matrix[s][j] - best
                worst_abs = inc if worst_abs is None else max(worst_abs, inc)
                worst_rel = inc / best if worst_rel is None else max(worst_rel, inc / best)
        absolute.append(worst_abs)
        relative.append(worst_rel)
    return {"absolute": absolute, "relative": relative}


def backward_transfer(matrix: list[list[float]]) -> float | None:
    S = len(matrix)
    if S < 2:
        return None
    return sum(matrix[j][j] - matrix[S - 1][j] for j in range(S - 1)) / (S - 1)


def forward_transfer(matrix: list[list[float]], initial: list[float]) -> float | None:
    S = len(matrix)
    if S < 2:
        return None
    return sum(initial[j] - matrix[j - 1][j] for j in range(1, S)) / (S - 1)


def plasticity(matrix: list[list[float]]) -> list[float]:
    return [matrix[j][j] for j in range(len(matrix))]


def summarize_matrix(matrix: list[list[float]], initial: list[float]) -> dict:
    f = forgetting(matrix)
    earlier = [x for x in f["relative"] if x is not None]
    return {
        "average_perplexity": [average_perplexity(row) for row in matrix],
        "final_average_perplexity": average_perplexity(matrix[-1]),
        "forgetting": f["absolute"],
        "forgetting_relative": f["relative"],
        "mean_forgetting_relative": sum(earlier) / len(earlier) if earlier else None,
        "backward_transfer": backward_transfer(matrix),
        "forward_transfer": forward_transfer(matrix, initial),
        "plasticity": plasticity(matrix),
    }


def safe_exp(loss: float) -> float:
    return math.exp(min(loss, 700.0))
