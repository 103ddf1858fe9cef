"""export_report: per-domain perplexities of MoE, reloaded dense export and seed, and the retained share."""

import json
import math

import pytest
import torch
from export_helpers import build, ids, make_experts_identical

from modular.errors import ConfigError
from modular.export import export_dense, export_report
from modular.export.report import retained_share

pytest.importorskip("transformers")


def batches(seed):
    x = ids(batch=2, length=12, seed=seed)
    targets = torch.roll(x, -1, dims=1)
    targets[:, -1] = -100  # the last position has no next token
    return [(x, targets)]


def test_report_on_an_exactly_mergeable_moe(tmp_path):
    moe, cfg = build()
    make_experts_identical(moe)  # the merged dense model computes the same function
    seed, _ = build("model.moe_layers=none", seed=7)
    with torch.no_grad():
        seed.lm_head.weight.mul_(20)  # confidently wrong: a seed far worse than the MoE, so the gain is large
    out = export_dense(moe, cfg, None, tmp_path / "dense", merge="uniform")
    eval_batches = {"en": batches(1), "de": batches(2)}
    report = export_report(moe, out, eval_batches, seed_model=seed, out_path=tmp_path / "export_report.json")
    assert json.loads((tmp_path / "export_report.json").read_text()) == report
    for domain in ("en", "de"):
        row = report["domains"][domain]
        assert row["tokens"] == 2 * 11
        assert math.isclose(row["moe"]["loss"], row["exported"]["loss"], rel_tol=1e-5)
        assert math.isclose(row["exported"]["perplexity"], math.exp(row["exported"]["loss"]), rel_tol=1e-9)
        assert row["seed"]["loss"] - row["moe"]["loss"] > 1.0
        assert math.isclose(row["retained_share"], 1.0, rel_tol=1e-5)  # the exact merge keeps the whole gain
    assert report["mean"]["seed"] is not None


def test_retained_share_definition():
    assert retained_share(3.0, 2.0, 2.5) == 0.5  # half of the 1-nat gain kept
    assert retained_share(3.0, 2.0, 3.5) == -0.5  # worse than the seed
    assert retained_share(None, 2.0, 2.5) is None
    assert retained_share(2.0, 2.5, 2.2) is None  # the MoE has no gain over the seed


def test_report_without_seed_and_bad_input(tmp_path):
    moe, cfg = build()
    out = export_dense(moe, cfg, None, tmp_path / "dense", merge="uniform")
    report = export_report(moe, out, {"en": batches(1)})
    assert report["domains"]["en"]["seed"] is None and report["domains"]["en"]["retained_share"] is None
    with pytest.raises(ConfigError, match="eval_batches is empty"):
        export_report(moe, out, {})
    empty = [(ids(batch=1, length=4), torch.full((1, 4), -100))]
    with pytest.raises(ConfigError, match="no target tokens"):
        export_report(moe, out, {"en": empty})
