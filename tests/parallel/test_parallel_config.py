"""The parallel config group, mesh validation against the world size, and the loader's global-batch shards."""

from __future__ import annotations

import json

import pytest
import torch

from modular.cli import main
from modular.config import compose_config
from modular.errors import ConfigError
from modular.parallel.mesh import init_parallel, mesh_shape


@pytest.mark.parametrize("overrides, fragments", [
    (["parallel.ep=3"], ["parallel.ep=3 does not divide the 8 experts of layer 0", "multiple of parallel.ep",
                         "parallel.ep=2"]),
    (["experts.num_experts_per_layer=[4,6,8,8]", "parallel.ep=4"], ["the 6 experts of layer 1"]),
    (["parallel.ep=0"], ["parallel.ep=0", "integer >= 1"]),
    (["parallel.dp=0"], ["parallel.dp=0", "integer >= 1, or null"]),
    (["parallel.backend=mpi"], ["parallel.backend='mpi'", "auto, gloo, nccl"]),
    (["parallel.tp=2"], ["parallel.tp", "allowed keys in parallel are: backend, dp, ep"]),
])
def test_bad_parallel_config_is_one_sentence_and_exit_2(overrides, fragments, capsys):
    assert main(["info", *overrides]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_presets_and_defaults():
    cfg = compose_config(["parallel=ep2"])
    assert (cfg.parallel.ep, cfg.parallel.dp, cfg.parallel.backend) == (2, None, "auto")
    assert compose_config([]).parallel.ep == 1


@pytest.mark.parametrize("world, ep, dp, want", [(2, 2, None, (1, 2)), (8, 2, None, (4, 2)), (8, 4, 2, (2, 4)),
                                                  (1, 1, None, (1, 1)), (4, 1, None, (4, 1))])
def test_mesh_shape(world, ep, dp, want):
    assert mesh_shape(world, ep, dp) == want


@pytest.mark.parametrize("world, ep, dp, fragment", [
    (2, 4, None, "parallel.ep=4 needs at least 4 processes, but WORLD_SIZE=2"),
    (6, 4, None, "WORLD_SIZE=6 is not a multiple of parallel.ep=4"),
    (4, 2, 3, "parallel.dp=3 × parallel.ep=2 = 6 processes, but WORLD_SIZE=4"),
])
def test_mesh_shape_refuses_what_does_not_fit(world, ep, dp, fragment):
    with pytest.raises(ConfigError, match=fragment):
        mesh_shape(world, ep, dp)


def test_one_process_sets_up_nothing(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert init_parallel(compose_config(["model=tiny"])) is None
    assert not torch.distributed.is_initialized()
    with pytest.raises(ConfigError, match=r"parallel\.ep=2 needs at least 2 processes, but WORLD_SIZE=1"):
        init_parallel(compose_config(["model=tiny", "parallel.ep=2"]))


def test_train_with_ep_but_one_process_fails_before_writing(tmp_path, capsys):
    assert main(["train", "model=tiny", "parallel.ep=2", f"run.dir={tmp_path / 'run'}"]) == 2
    assert "launch with torchrun --nproc_per_node=2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_trainer_under_torchrun_without_a_process_group_refuses(monkeypatch):
    from modular.errors import UserError
    from modular.models import build_model
    from modular.train.trainer import Trainer

    cfg = compose_config(["model=tiny"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; this command never called init_parallel
    with pytest.raises(UserError, match="one of WORLD_SIZE=2 started by torchrun"):
        Trainer(cfg, "unused", build_model(cfg), loader=None, val_sets={})


# -- the loader: shards of one global batch ----------------------------------------------------


@pytest.fixture
def shards():
    from modular.data.config import sample_data_config
    from modular.data.shards import build_all_shards

    return build_all_shards(sample_data_config(("en", "de")), "train", progress=False)


def test_shards_of_a_global_batch_are_the_one_process_batch(shards):
    from modular.data.loader import MixtureLoader

    whole = MixtureLoader(shards, 6, 16, seed=3)
    parts = [MixtureLoader(shards, 2, 16, seed=3, shard=r, num_shards=3) for r in range(3)]
    for _ in range(3):
        batch = next(whole)
        pieces = [next(p) for p in parts]
        assert torch.equal(torch.cat([p.tokens for p in pieces]), batch.tokens)
        assert torch.equal(torch.cat([p.domain_ids for p in pieces]), batch.domain_ids)
    # the state records the global batch, so it resumes at another world size
    state = json.loads(json.dumps(parts[1].state_dict()))
    assert state["batch_size"] == 6
    resumed = MixtureLoader(shards, 6, 16, seed=3)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed).tokens, next(whole).tokens)
    sharded_again = MixtureLoader(shards, 3, 16, seed=3, shard=1, num_shards=2)
    sharded_again.load_state_dict(state)
    assert torch.equal(next(sharded_again).tokens, whole.batch_at(3).tokens[3:])


def test_bad_shard_arguments(shards):
    from modular.data.loader import MixtureLoader

    with pytest.raises(ConfigError, match="shard=2 is not allowed; use 0 <= shard < num_shards=2"):
        MixtureLoader(shards, 2, 16, shard=2, num_shards=2)
    with pytest.raises(ConfigError, match="num_shards=0 is not allowed"):
        MixtureLoader(shards, 2, 16, num_shards=0)
