"""No code from a model or tokenizer folder ever runs: loads are local-only with trust_remote_code=False, and a
folder that asks for its own code is refused in one sentence, with no prompt even when stdin says yes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
PAYLOAD = "import pathlib; pathlib.Path(__file__).with_name('PWNED').write_text('ran')\n"


def custom_code_folder(folder: Path, config_name: str, with_tokenizer_json: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((folder / config_name).read_text()) if (folder / config_name).is_file() else {}
    config["auto_map"] = {"AutoTokenizer": ["custom.CustomTokenizer", None], "AutoConfig": "custom.CustomConfig",
                          "AutoModelForCausalLM": "custom.CustomModel"}
    (folder / config_name).write_text(json.dumps(config))
    (folder / "custom.py").write_text(PAYLOAD + "class CustomTokenizer: pass\nclass CustomConfig: pass\n"
                                      "class CustomModel: pass\n")
    if with_tokenizer_json:
        from modular.data.tokenizer import train_bpe

        train_bpe(["some text to learn from " * 20], 300, folder)
    return folder


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modular", *args], input="y\ny\n", capture_output=True, text=True,
                          env=ENV, timeout=300)


@pytest.mark.parametrize("with_tokenizer_json", [False, True])
def test_a_tokenizer_folder_with_custom_code_is_refused(tmp_path, with_tokenizer_json):
    folder = custom_code_folder(tmp_path / "tok", "tokenizer_config.json", with_tokenizer_json)
    proc = run_cli("train", "model=tiny", "data=sample_en", "train.max_steps=1", "train.progress=false",
                   "data.tokenizer.kind=hf", f"data.tokenizer.path={folder}", "model.vocab_size=400",
                   f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 1, proc.stderr
    assert "asks to run its own Python code" in proc.stderr and "custom.CustomTokenizer" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "[y/N]" not in proc.stdout + proc.stderr
    assert not (folder / "PWNED").exists()
    assert not (tmp_path / "run").exists()


def test_upcycle_from_a_model_folder_with_custom_code_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    source = tmp_path / "seed"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256)).save_pretrained(str(source))
    custom_code_folder(source, "config.json")
    custom_code_folder(source, "tokenizer_config.json")
    proc = run_cli("upcycle", f"upcycle.source={source}", "upcycle.num_experts=2", f"run.dir={tmp_path / 'up'}")
    assert proc.returncode == 1, proc.stderr
    assert "asks to run its own Python code" in proc.stderr and "[y/N]" not in proc.stdout + proc.stderr
    assert not (source / "PWNED").exists() and not (tmp_path / "up").exists()


def test_every_transformers_load_goes_through_hf_folders():
    import modular

    root = Path(modular.__file__).parent
    callers = sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if ".from_pretrained(" in p.read_text())
    assert callers == ["hf_folders.py"]
    from modular.hf_folders import LOCAL_ONLY

    assert LOCAL_ONLY == {"local_files_only": True, "trust_remote_code": False}
