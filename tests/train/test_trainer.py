"""The training loop: loss falls, resume is exact, checkpoints are atomic and safe, bad input is refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modular.cli import main
from modular.errors import CheckpointError
from modular.train import checkpoint as ckpt

TINY = ["model=tiny", "data=sample_en", "train.batch_size=4", "train.seq_len=32", "train.eval_batches=2",
        "train.warmup_steps=2", "train.progress=false", "experts.num_experts=4", "experts.ffn_dim=32"]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def test_training_lowers_validation_loss(tmp_path, capsys):
    from modular.config import compose_config
    from modular.models import build_model
    from modular.train.evaluate import evaluate
    from modular.train.run import prepare_data

    overrides = TINY + ["train.max_steps=40", "train.eval_every=40", "train.log_every=10", "train.lr=5e-3"]
    cfg = compose_config(overrides)
    _, _, val_sets = prepare_data(cfg)
    torch.manual_seed(cfg.seed)
    before = evaluate(build_model(cfg), val_sets, torch.device("cpu"))["en"]["loss"]
    assert main(["train", *overrides, f"run.dir={tmp_path}"]) == 0
    after = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["eval"]["en"]["loss"]
    assert after < before - 1.0  # from ~ln(259)=5.6 nats towards byte-level English (~3)
    out = capsys.readouterr().out
    assert "bits/byte" in out and "en" in out
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "tokens", "loss", "lr", "grad_norm", "aux_loss", "moe", "tokens_per_s"} <= set(record)
    assert len(record["moe"]["layer_0"]["tokens_per_expert"]) == 4


def test_resume_is_exact(tmp_path):
    common = TINY + ["train.max_steps=6", "train.log_every=1", "train.eval_every=100", "train.checkpoint_every=3"]
    assert main(["train", *common, f"run.dir={tmp_path / 'full'}"]) == 0
    assert main(["train", *common, "train.max_steps=3", f"run.dir={tmp_path / 'split'}"]) == 0
    assert ckpt.latest_checkpoint(tmp_path / "split").name == "step_0000003"
    # resume: the saved overrides come back, the new max_steps applies on top
    assert main(["train", "train.max_steps=6", f"run.dir={tmp_path / 'split'}"]) == 0
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert [s for s, _ in split] == [1, 2, 3, 4, 5, 6]
    assert full == split  # bit for bit: equal floats, not approximately


def test_kill_9_and_restart_continue_exactly(tmp_path):
    common = TINY + ["train.max_steps=12", "train.log_every=1", "train.eval_every=100", "train.checkpoint_every=2",
                     "train.threads=1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "modular", "train", *common, f"run.dir={reference}"], check=True,
                   env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "modular", "train", *common, f"run.dir={killed}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoints" / "step_0000004").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = ckpt.latest_checkpoint(killed)
    assert stopped_at is not None and int(stopped_at.name.split("_")[1]) < 12
    subprocess.run([sys.executable, "-m", "modular", "train", f"run.dir={killed}"], check=True, env=env,
                   capture_output=True)
    assert losses(killed) == losses(reference)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    args = TINY + ["train.max_steps=100000", "train.log_every=1", "train.eval_every=100000",
                   "train.checkpoint_every=100000", f"run.dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "-m", "modular", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((tmp_path / "metrics.jsonl").exists()
                                          and (tmp_path / "metrics.jsonl").read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None
    ckpt.verify_checkpoint(latest)
    assert "resume with: modular train run.dir=" in out


@pytest.fixture()
def trained_run(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=100",
                 f"run.dir={run}"]) == 0
    return run


def test_interrupted_checkpoint_write_keeps_the_previous_one(trained_run, monkeypatch):
    from modular.config import compose_config
    from modular.models import build_model

    previous = ckpt.latest_checkpoint(trained_run)
    cfg = compose_config(TINY)
    model = build_model(cfg)
    calls = {"n": 0}
    real_save = torch.save

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(trained_run, 99, model, torch.optim.AdamW(model.parameters()), {}, {}, keep=1)
    monkeypatch.setattr(torch, "save", real_save)
    assert calls["n"] == 1
    assert ckpt.latest_checkpoint(trained_run) == previous
    assert not any(p.name.startswith(".") for p in (trained_run / "checkpoints").iterdir())
    ckpt.verify_checkpoint(previous)
    ckpt.load_model_weights(build_model(cfg), previous)


def test_truncated_checkpoint_is_detected_not_loaded(trained_run, capsys):
    latest = ckpt.latest_checkpoint(trained_run)
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ckpt.verify_checkpoint(latest)
    assert main(["eval", f"run.dir={trained_run}"]) == 1
    assert "truncated or corrupt" in capsys.readouterr().err


def test_a_pickle_that_runs_code_is_refused(trained_run, tmp_path):
    import hashlib
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    latest = ckpt.latest_checkpoint(trained_run)
    (latest / "optimizer.pt").write_bytes(pickle.dumps({"state": Exploit()}))
    manifest = json.loads((latest / "manifest.json").read_text())  # a stranger can forge the manifest too
    data = (latest / "optimizer.pt").read_bytes()
    manifest["files"]["optimizer.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (latest / "manifest.json").write_text(json.dumps(manifest))
    ckpt.verify_checkpoint(latest)
    with pytest.raises(CheckpointError, match="more than tensors"):
        ckpt.load_optimizer_state(torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]), latest)
    assert not marker.exists()


def test_checkpoint_of_another_shape_names_the_tensors(trained_run):
    from modular.config import compose_config
    from modular.models import build_model

    other = build_model(compose_config(TINY + ["model.d_model=32"]))
    with pytest.raises(CheckpointError, match=r"shape mismatch: .*embed_tokens.weight \(259, 64\) vs model \(259, 32\)"):
        ckpt.load_model_weights(other, ckpt.latest_checkpoint(trained_run))


def test_keeps_only_the_last_n_checkpoints(trained_run):
    assert main(["train", "train.max_steps=10", "train.keep_checkpoints=2", f"run.dir={trained_run}"]) == 0
    names = [p.name for p in ckpt.list_checkpoints(trained_run)]
    assert names == ["step_0000008", "step_0000010"]


def test_eval_command_prints_the_domain_table(trained_run, capsys):
    assert main(["eval", f"run.dir={trained_run}"]) == 0
    out = capsys.readouterr().out
    assert "step 4" in out and "bits/byte" in out and "\nen " in out


def test_nonfinite_loss_is_skipped_then_stops(tmp_path, monkeypatch, capsys):
    from modular.models.decoder import ModularLM

    real_forward = ModularLM.forward

    def nan_forward(self, input_ids, targets=None):
        out = real_forward(self, input_ids, targets)
        if targets is not None:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(ModularLM, "forward", nan_forward)
    code = main(["train", *TINY, "train.max_steps=20", "train.max_nonfinite=3", f"run.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 1
    assert "non-finite for 3 steps in a row" in err


def test_bad_data_inputs_leave_no_run_folder(tmp_path, capsys):
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"good text " * 10 + b"\xff\xfe broken")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["data.domains.en.train=/nonexistent/corpus.jsonl"], "/nonexistent/corpus.jsonl"),
        ([f"data.domains.en.train={empty}"], "empty"),
        ([f"data.domains.en.train={bad_utf8}"], "byte"),
        (["train.seq_len=256", "model.max_seq_len=256", "train.eval_batches=1",
          f"data.domains.en.val={tmp_path / 'tiny_val.jsonl'}"], "seq_len"),
        (["model.vocab_size=200"], "model.vocab_size"),
    ]
    (tmp_path / "tiny_val.jsonl").write_text(json.dumps({"text": "a short validation text " * 3}) + "\n")
    for i, (overrides, fragment) in enumerate(cases):
        run = tmp_path / f"run{i}"
        code = main(["train", *TINY, *overrides, f"run.dir={run}"])
        err = capsys.readouterr().err
        assert code != 0, overrides
        assert err.startswith("error: ") and fragment in err, (overrides, err)
        assert "Traceback" not in err
        assert not run.exists(), overrides


def test_bad_train_config_values(capsys):
    for override, fragment in [("train.seq_len=4096", "model.max_seq_len"), ("train.schedule=linear", "wsd"),
                               ("train.lr=0", "train.lr=0"), ("train.batch_size=0", "train.batch_size=0"),
                               ("train.foo=1", "allowed keys in train")]:
        assert main(["train", *TINY, override]) == 2
        assert fragment in capsys.readouterr().err
