"""Continual metrics against hand computations on a small fixed matrix."""

import pytest

from modular.continual.metrics import summarize_matrix

# rows: after stage 0 (A), 1 (B), 2 (C); columns: domains A, B, C (perplexity)
MATRIX = [[10.0, 50.0, 80.0],
          [12.0, 20.0, 70.0],
          [11.0, 25.0, 30.0]]
INITIAL = [100.0, 90.0, 95.0]


def test_metrics_hand_computed():
    m = summarize_matrix(MATRIX, INITIAL)
    assert m["average_perplexity"] == pytest.approx([140 / 3, 102 / 3, 22.0])
    # A: best 10 at stage 0; worst increase: stage 1 (12 − 10 = 2) vs stage 2 (11 − min(10, 12) = 1) → 2
    # B: best 20 at stage 1; stage 2: 25 − 20 = 5
    assert m["forgetting"][:2] == pytest.approx([2.0, 5.0]) and m["forgetting"][2] is None
    assert m["forgetting_relative"][:2] == pytest.approx([0.2, 0.25])
    assert m["mean_forgetting_relative"] == pytest.approx(0.225)
    # BWT = mean(R[0][0] − R[2][0], R[1][1] − R[2][1]) = mean(10 − 11, 20 − 25) = −3
    assert m["backward_transfer"] == pytest.approx(-3.0)
    # FWT = mean(init[1] − R[0][1], init[2] − R[1][2]) = mean(90 − 50, 95 − 70) = 32.5
    assert m["forward_transfer"] == pytest.approx(32.5)
    assert m["plasticity"] == [10.0, 20.0, 30.0]
    assert m["final_average_perplexity"] == pytest.approx(22.0)


def test_single_stage_has_no_transfer():
    m = summarize_matrix([[5.0]], [9.0])
    assert m["backward_transfer"] is None and m["forward_transfer"] is None and m["forgetting"] == [None]
