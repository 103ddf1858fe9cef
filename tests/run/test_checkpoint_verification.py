"""One verification path for every checkpoint load, strict manifests, and a full disk in one sentence."""

import errno
import hashlib
import json

import pytest
import torch

from modular.cli import main
from modular.errors import CheckpointError, ResourceError
from modular.train import checkpoint as ckpt

T = ["model=tiny", "data=sample_en", "train.max_steps=2", "train.batch_size=2", "train.seq_len=32",
     "train.eval_every=1000", "experts.num_experts=4", "experts.ffn_dim=32", "train.progress=false",
     "train.eval_batches=1", "train.threads=1"]


@pytest.fixture()
def base(tmp_path):
    run = tmp_path / "base"
    assert main(["train", *T, f"run.dir={run}"]) == 0
    return ckpt.latest_checkpoint(run)


def corrupt_weights(checkpoint):
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, another sha256
    weights.write_bytes(bytes(data))


def test_init_from_verifies_the_checkpoint_it_starts_from(base, tmp_path, capsys):
    corrupt_weights(base)
    new = tmp_path / "new"
    assert main(["train", *T, f"train.init_from={base}", f"run.dir={new}"]) == 1
    assert "sha256 does not match" in capsys.readouterr().err
    assert not new.exists()  # refused before anything was written


def test_init_from_a_folder_without_manifest_is_refused(base, tmp_path, capsys):
    (base / "manifest.json").unlink()
    assert main(["train", *T, f"train.init_from={base}", f"run.dir={tmp_path / 'new'}"]) == 1
    assert "has no manifest.json" in capsys.readouterr().err


@pytest.mark.parametrize("manifest,fragment", [
    ({"step": 2, "files": {}}, "does not list model.safetensors"),
    ([1, 2, 3], "not an object listing each file"),
    ({"files": {"model.safetensors": {"bytes": "many"}}}, "not an object listing each file"),
    ("not json at all", "not readable JSON"),
    ({"files": {**{name: {"bytes": 1, "sha256": "x"} for name in ckpt.FILES}, "../../x": {"bytes": 1, "sha256": "x"}}},
     "not an object listing each file"),
])
def test_a_malformed_manifest_is_a_damaged_checkpoint(base, manifest, fragment, capsys):
    (base / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    with pytest.raises(CheckpointError, match=fragment.replace(".", r"\.")):
        ckpt.verify_checkpoint(base)
    corrupt_weights(base)
    assert main(["eval", f"run.dir={base.parent.parent}"]) == 1  # eval never loads the corrupted weights
    err = capsys.readouterr().err
    assert "is damaged" in err or "is missing" in err
    assert "Traceback" not in err


def test_a_checkpoint_that_lists_only_some_files_is_damaged(base):
    manifest = json.loads((base / "manifest.json").read_text())
    del manifest["files"]["optimizer.pt"]
    (base / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"does not list optimizer\.pt"):
        ckpt.verify_checkpoint(base)


def test_a_continual_stage_checkpoint_goes_through_the_same_verification(base, tmp_path, capsys):
    """A continual run started from a corrupted base is refused before its folder exists."""
    corrupt_weights(base)
    run = tmp_path / "stream"
    assert main(["continual", *T, "continual=naive", "continual.stream=[en]", "continual.first_stage_steps=0",
                 f"train.init_from={base}", f"run.dir={run}"]) == 1
    assert "sha256 does not match" in capsys.readouterr().err
    assert not run.exists()


def test_checkpoint_weights_are_loaded_only_by_the_checkpointer():
    """Every load in modular goes through run/checkpointer.py, which verifies first: no other module calls the
    weight or optimizer loaders of a checkpoint."""
    from pathlib import Path

    import modular

    root = Path(modular.__file__).parent
    callers = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                     if any(f"{name}(" in line and "def " not in line for line in p.read_text().splitlines()
                            for name in ("load_model_weights", "load_optimizer_state")))
    assert callers == ["run/checkpointer.py"]


@pytest.mark.parametrize("failure", ["safetensors", "oserror"])
def test_a_full_disk_while_saving_is_one_sentence(base, failure, monkeypatch, capsys):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        if failure == "safetensors":
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                  'message: "No space left on device" })')
        raise OSError(errno.ENOSPC, "No space left on device")

    run = base.parent.parent
    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(ResourceError, match="is full"):
        ckpt.save_checkpoint(run, 99, torch.nn.Linear(1, 1), None, {}, {})
    assert main(["train", f"run.dir={run}", "train.max_steps=3"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "step_0000003 was not written (step_0000002 is intact)" in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]


def test_the_manifest_of_an_upcycled_model_is_checked_like_any_checkpoint(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "weights"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))
    ckpt.write_manifest(folder, ckpt.WEIGHTS)
    ckpt.verify_checkpoint(folder, required=ckpt.WEIGHTS)
    digest = json.loads((folder / "manifest.json").read_text())["files"]["model.safetensors"]["sha256"]
    assert digest == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    with pytest.raises(CheckpointError, match=r"does not list optimizer\.pt"):
        ckpt.verify_checkpoint(folder)  # a full checkpoint needs all its files
