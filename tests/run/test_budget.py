"""Sizes are checked before anything is allocated: the refusal gives the estimate and the memory available."""

import pytest

from modular.cli import main
from modular.config import compose_config
from modular.run.budget import estimate, gib, parameter_count

T = ["model=tiny", "data=sample_en", "train.max_steps=4", "train.batch_size=2", "train.seq_len=64",
     "train.eval_every=1000", "train.progress=false"]


@pytest.mark.parametrize("overrides", [[], ["model=tiny"], ["experts=lowrank"], ["experts=shared"],
                                       ["model=interleaved"], ["experts.num_experts_per_layer=[4,8,8,16]"],
                                       ["model.tie_embeddings=false"], ["model=dense"]])
def test_the_parameter_estimate_is_the_built_models_count(overrides):
    """Counted from the sizes alone, it matches the model the config builds to within 1% (biases and buffers)."""
    from modular.models import build_model
    from modular.models.summary import parameter_count as built_count

    cfg = compose_config(overrides)
    assert parameter_count(cfg) == pytest.approx(built_count(build_model(cfg)), rel=0.01)


@pytest.mark.parametrize("override,part", [("model.d_model=100000000000", "parameters"),
                                           ("experts.num_experts=100000000", "parameters"),
                                           ("train.batch_size=100000000", "activations")])
def test_sizes_that_cannot_fit_are_refused_before_allocation(override, part, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *T, override, f"run.dir={run}"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "needs about" in err and "is available" in err and part in err
    assert not run.exists()


def test_info_checks_the_model_alone(capsys):
    assert main(["info", "model.d_model=100000000000"]) == 1
    assert "This model needs about" in capsys.readouterr().err


def test_a_continual_run_is_budgeted_at_its_grown_size():
    cfg = compose_config(["model=tiny", "continual.add_experts=1000", "continual.stream=[en,de,code_py]"])
    assert estimate(cfg, "continual").parts["parameters"] > 1.5 * estimate(cfg, "train").parts["parameters"]


def test_the_check_can_be_switched_off(monkeypatch):
    from modular.run import budget

    monkeypatch.setattr(budget, "available_memory", lambda device=None: 1)
    with pytest.raises(Exception, match="needs about"):
        budget.check_budget(compose_config(["model=tiny"]), "train")
    budget.check_budget(compose_config(["model=tiny", "train.check_memory=false"]), "train")


def test_a_tokenizer_vocabulary_is_bounded(tmp_path, capsys):
    assert main(["tokenizer", "train", "data=sample_en", "tokenizer.vocab_size=100000000000",
                 f"tokenizer.out={tmp_path / 'tok'}"]) == 2
    err = capsys.readouterr().err
    assert "32-bit" in err and len(err.strip().splitlines()) == 1
    assert main(["tokenizer", "train", "data=sample_en", "tokenizer.vocab_size=1000000000",
                 f"tokenizer.out={tmp_path / 'tok'}"]) == 1
    assert "needs about" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()


def test_sizes_read_well():
    assert gib(3 * 2**20) == "3.0 MiB" and gib(5 * 2**30) == "5.0 GiB" and gib(2**41) == "2.0 TiB"
