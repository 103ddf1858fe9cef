"""Learning-rate schedules at their key steps."""

import math

import pytest

from modular.train.schedule import lr_at


def test_warmup_is_linear_to_peak():
    assert lr_at(0, lr=1.0, max_steps=100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(4, lr=1.0, max_steps=100, warmup_steps=10) == pytest.approx(0.5)
    assert lr_at(9, lr=1.0, max_steps=100, warmup_steps=10) == pytest.approx(1.0)


def test_cosine_key_steps():
    kw = {"lr": 1.0, "max_steps": 110, "warmup_steps": 10, "schedule": "cosine", "min_lr_ratio": 0.1}
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(35, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.25)))


def test_wsd_key_steps():
    kw = {"lr": 2.0, "max_steps": 100, "warmup_steps": 10, "schedule": "wsd", "min_lr_ratio": 0.0,
          "decay_fraction": 0.2}
    assert lr_at(10, **kw) == pytest.approx(2.0)
    assert lr_at(79, **kw) == pytest.approx(2.0)  # stable until the last 20 steps
    assert lr_at(80, **kw) == pytest.approx(2.0)
    assert lr_at(90, **kw) == pytest.approx(1.0)
    assert lr_at(100, **kw) == pytest.approx(0.0)


def test_constant():
    assert lr_at(50, lr=0.3, max_steps=100, warmup_steps=0, schedule="constant") == 0.3
