"""The whole path a user takes: a continual run grows experts, `modular export` writes folders that
transformers' Auto classes load offline and generate from."""

import json

import pytest
import torch

from modular.cli import main

transformers = pytest.importorskip("transformers")


def test_export_of_a_continual_run_loads_and_generates(tmp_path):
    run = tmp_path / "run"
    assert main(["continual", "model=tiny", "experts.num_experts=4", "experts.ffn_dim=32",
                 "continual.stream=[en,de]", "continual.steps_per_stage=3", "train.batch_size=2",
                 "train.seq_len=32", "train.eval_batches=1", "train.progress=false", "continual.usage_batches=1",
                 "continual.plots=false", f"run.dir={run}"]) == 0
    assert json.loads((run / "report.json").read_text())["stages"][-1]["experts_per_layer"]["0"] == 6
    for fmt in ("llama-dense", "mixtral"):
        out = tmp_path / fmt
        assert main(["export", f"run.dir={run}", f"export.format={fmt}", f"export.out={out}"]) == 0
        model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
        assert type(model).__name__ == {"llama-dense": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}[fmt]
        inputs = tokenizer("Der Hund", return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert generated.shape[1] == inputs["input_ids"].shape[1] + 6
        assert isinstance(tokenizer.decode(generated[0], skip_special_tokens=True), str)
        report = json.loads((out / "export_report.json").read_text())
        assert set(report["domains"]) >= {"en", "de"}
