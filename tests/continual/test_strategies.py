"""Strategies are registered classes: a user's own is one class, the stage loop runs its hooks, and a run's
config.json records the per-stage schedules the trainers actually ran with."""

import json

import pytest

from modular.cli import main
from modular.continual import policies
from modular.continual.strategies import STRATEGY_REGISTRY, Strategy, register_strategy

SMALL = ["model=tiny", "experts.num_experts=4", "experts.ffn_dim=32", "continual.steps_per_stage=3",
         "train.batch_size=2", "train.seq_len=32", "train.eval_batches=1", "train.progress=false",
         "continual.usage_batches=1", "continual.stage_warmup_steps=1", "continual.plots=false",
         "continual.stream=[en,de]"]


@pytest.fixture
def own_strategy():
    calls = []

    @register_strategy("half_replay_test")
    class HalfReplay(Strategy):
        """Every later stage replays half of each batch and grows one expert per layer."""

        def build_pieces(self):
            return [*super().build_pieces(), policies.Growth(self.cfg)]

        @classmethod
        def piece_types(cls):
            return [*super().piece_types(), policies.Growth]

        def mixture(self, s):
            calls.append(("mixture", s))
            return {d: 1.0 for d in list(self.c.stream)[: s + 1]}

        def attach(self, run, model, s, trainer):
            super().attach(run, model, s, trainer)
            calls.append(("attach", s))

    yield calls
    del STRATEGY_REGISTRY["half_replay_test"]


def test_a_users_strategy_is_one_class(own_strategy, tmp_path):
    run = tmp_path / "run"
    assert main(["continual", *SMALL, "continual.strategy=half_replay_test", "continual.add_experts=1",
                 f"run.dir={run}"]) == 0
    assert own_strategy == [("mixture", 0), ("attach", 0), ("mixture", 1), ("attach", 1)]
    report = json.loads((run / "report.json").read_text())
    assert report["strategy"] == "half_replay_test"
    assert [s["experts_per_layer"]["0"] for s in report["stages"]] == [4, 5]  # its Growth piece ran


def test_a_strategy_validates_its_pieces(own_strategy, tmp_path, capsys):
    assert main(["continual", *SMALL, "continual.strategy=half_replay_test", "continual.add_experts=0",
                 f"run.dir={tmp_path / 'run'}"]) == 2
    assert "continual.add_experts=0" in capsys.readouterr().err


def test_config_json_records_the_stage_schedules_that_ran(tmp_path):
    run = tmp_path / "run"
    assert main(["continual", *SMALL, "continual=add_freeze", "continual.first_stage_steps=4",
                 "continual.review_steps=2", "train.lr=0.002", f"run.dir={run}"]) == 0
    record = json.loads((run / "config.json").read_text())
    schedules = record["stage_schedules"]
    assert [s["train"]["max_steps"] for s in schedules] == [4, 3]
    assert all(s["train"]["schedule"] == "wsd" and s["train"]["lr"] == 0.002 for s in schedules)
    assert "router_review" not in schedules[0] and schedules[1]["router_review"]["max_steps"] == 2
    # each stage's checkpoint records the train config its trainer ran with
    stage = json.loads(next((run / "stages" / "01-de" / "checkpoints").iterdir()).joinpath("config.json").read_text())
    assert stage["train"]["max_steps"] == 3 and stage["train"]["schedule"] == "wsd"
