"""Export never harms the run it reads, shares what it writes (umask), and upcycled runs can move."""

import json
import os
import shutil
import stat

import pytest
from export_helpers import TINY
from test_export_command import data_overrides, make_run, save_seed_llama

from modular.cli import main
from modular.train import checkpoint as ckpt


@pytest.mark.parametrize("where", ["run", "parent", "checkpoints", "run/exported"])
def test_export_out_never_is_holds_or_sits_inside_the_run(tmp_path, where, capsys):
    run, _ = make_run(tmp_path)
    out = {"run": run, "parent": run.parent, "checkpoints": run / "checkpoints",
           "run/exported": run / "exported"}[where]
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert main(["export", f"run.dir={run}", f"export.out={out}", "export.overwrite=true", "export.report=false"]) == 2
    err = capsys.readouterr().err
    assert "which an export must never overwrite" in err and len(err.strip().splitlines()) == 1
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    ckpt.verify_checkpoint(ckpt.latest_checkpoint(run))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_files_follow_the_umask(tmp_path, umask):
    run = tmp_path / "run"
    previous = os.umask(umask)
    try:
        assert main(["train", *TINY, *data_overrides(tmp_path), "train.max_steps=1", f"run.dir={run}"]) == 0
        assert main(["export", f"run.dir={run}", "export.format=mixtral", "export.report=false",
                     f"export.out={tmp_path / 'out'}"]) == 0
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~umask
    weights = ckpt.latest_checkpoint(run) / "model.safetensors"
    assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~umask


def test_an_upcycled_run_keeps_relative_paths_and_can_move(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_seed_llama(tmp_path / "seed")
    assert main(["upcycle", "upcycle.source=seed", "upcycle.num_experts=2", "run.dir=runs/up",
                 *data_overrides(tmp_path)]) == 0
    saved = json.loads((tmp_path / "runs/up/overrides.json").read_text())
    assert not [o for o in saved if str(tmp_path / "runs") in o]  # nothing in the run is named by absolute path
    assert "train.init_from=${run.dir}/upcycled" in saved and "run.dir=runs/up" in saved
    assert json.loads((tmp_path / "runs/up/upcycle.json").read_text())["source"] == "seed"
    ckpt.verify_checkpoint(tmp_path / "runs/up/upcycled", required=ckpt.WEIGHTS)
    shutil.move("runs/up", "moved")
    assert main(["train", "run.dir=moved", "train.max_steps=1"]) == 0
    assert ckpt.latest_checkpoint(tmp_path / "moved") is not None


def test_an_upcycled_model_whose_weights_were_tampered_with_is_refused(tmp_path, capsys):
    save_seed_llama(tmp_path / "seed")
    run = tmp_path / "up"
    assert main(["upcycle", f"upcycle.source={tmp_path / 'seed'}", "upcycle.num_experts=2", f"run.dir={run}",
                 *data_overrides(tmp_path)]) == 0
    weights = run / "upcycled" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["train", f"run.dir={run}", "train.max_steps=1"]) == 1
    assert "sha256 does not match" in capsys.readouterr().err


def test_upcycle_names_the_tensor_that_does_not_fit(tmp_path):
    from modular.errors import CheckpointError
    from modular.export import load_hf_llama

    seed = tmp_path / "seed"
    save_seed_llama(seed)
    config = json.loads((seed / "config.json").read_text())
    config["intermediate_size"] = 40  # the weights say 48
    (seed / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"shape mismatch: .*layers\.0\.mlp\.gate_proj\.weight \(48, 32\) vs "
                                              r"model \(40, 32\)"):
        load_hf_llama(seed)
