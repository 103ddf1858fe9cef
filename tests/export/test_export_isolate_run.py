"""The path a user takes with a grown (continual=isolate) run: `modular export` writes every domain merged (the
default), one domain's route (export.domain) or base + PEFT adapters (export.peft), each with a report per
domain; MoE formats refuse per-sequence routing; `modular generate` prints the route it chose; bad input is one
sentence, exit 2, nothing written."""

import json

import pytest
import torch

from modular.cli import main

transformers = pytest.importorskip("transformers")

RUN = ["continual=isolate", "model=tiny", "experts.num_experts=4", "experts.ffn_dim=32", "continual.stream=[en,de]",
       "continual.steps_per_stage=3", "train.batch_size=2", "train.seq_len=32", "train.eval_batches=1",
       "train.progress=false", "continual.usage_batches=1", "continual.stage_warmup_steps=1", "continual.plots=false",
       "continual.inference.steps=20", "continual.adapter_rank=4", "train.threads=1",
       "continual.adapter_targets=[q_proj,k_proj,v_proj,o_proj,norms]"]
FAST_EXPORT = ["export.calibration_batches=1"]


@pytest.fixture(scope="module")
def isolate_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("isolate") / "run"
    assert main(["continual", *RUN, f"run.dir={run}"]) == 0
    return run


def test_every_domain_merged_is_the_default_export_and_reports_each_domain(isolate_run, tmp_path, capsys):
    out = tmp_path / "all"
    assert main(["export", f"run.dir={isolate_run}", f"export.out={out}", *FAST_EXPORT]) == 0
    printed = capsys.readouterr().out
    assert "every domain merged" in printed and "route" in printed
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    report = json.loads((out / "export_report.json").read_text())
    assert {"en", "de"} <= set(report["domains"])
    assert report["domains"]["en"]["route"] == "en" and report["domains"]["de"]["route"] == "de"  # oracle routes
    assert report["domains"]["fr"]["route"] == "en"  # a domain the run never saw: the anchor's route
    info = json.loads((out / "modular_export.json").read_text())
    assert info["kind"] == "domains-merged-dense" and set(info["routes"]) == {"en", "de"}


def test_one_domains_route_dense_and_as_mixtral(isolate_run, tmp_path, capsys):
    out = tmp_path / "de"
    assert main(["export", f"run.dir={isolate_run}", "export.domain=de", f"export.out={out}", *FAST_EXPORT]) == 0
    report = json.loads((out / "export_report.json").read_text())
    assert {row["route"] for row in report["domains"].values()} == {"de"}  # ours under de's route throughout
    assert json.loads((out / "modular_export.json").read_text())["domain"] == "de"
    exact = tmp_path / "de-mixtral"
    assert main(["export", f"run.dir={isolate_run}", "export.domain=de", "export.format=mixtral",
                 f"export.out={exact}"]) == 0
    report = json.loads((exact / "export_report.json").read_text())
    for row in report["domains"].values():  # the route itself, exactly
        assert row["exported"]["loss"] == pytest.approx(row["moe"]["loss"], rel=1e-5, abs=1e-6)
    # the default folder names the domain
    assert main(["export", f"run.dir={isolate_run}", "export.domain=en", "export.report=false", *FAST_EXPORT]) == 0
    assert (isolate_run / "export" / "llama-dense-en" / "config.json").is_file()


def test_peft_export_loads_with_peft(isolate_run, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    out = tmp_path / "peft"
    assert main(["export", f"run.dir={isolate_run}", "export.peft=true", f"export.out={out}", *FAST_EXPORT]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(str(out / "base"), local_files_only=True)
    model = peft.PeftModel.from_pretrained(base, str(out / "de"))
    ids = torch.randint(0, 259, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    assert not (out / "en").exists()  # the anchor is the base
    report = json.loads((out / "export_report.json").read_text())
    assert {"en", "de"} <= set(report["domains"])


def test_bad_exports_of_a_routed_run_are_one_sentence_and_write_nothing(isolate_run, tmp_path, capsys):
    for args, fragment in [
        (["export.domain=fr"], "export.domain=fr names a domain this run never saw; its domains are: en, de."),
        (["export.format=mixtral"], "cannot express this model: per-sequence domain routing"),
        (["export.format=qwen2-moe"], "cannot express this model: per-sequence domain routing"),
        (["export.format=moe"], "cannot express this model: per-sequence domain routing"),
        (["export.peft=true", "export.format=mixtral"], "export.peft=true writes a dense Llama base"),
        (["export.peft=true", "export.domain=de"], "cannot be combined"),
        (["export.domain_merge=average"], "export.domain_merge='average' is unknown"),
    ]:
        out = tmp_path / "out"
        assert main(["export", f"run.dir={isolate_run}", f"export.out={out}", *args]) == 2, args
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not out.exists() and not list(tmp_path.iterdir()), args


def test_generate_prints_the_route_it_chose(isolate_run, capsys):
    assert main(["generate", f"run.dir={isolate_run}", "prompt=Der Hund und die Katze", "generate.max_new_tokens=8"]) == 0
    first = capsys.readouterr().out.splitlines()
    assert first[0].startswith("route: ") and "posterior en " in first[0] and ", de " in first[0]
    assert first[1].startswith("Der Hund und die Katze")
    assert main(["generate", f"run.dir={isolate_run}", "prompt=Der Hund und die Katze", "generate.max_new_tokens=8"]) == 0
    assert capsys.readouterr().out.splitlines() == first  # greedy: deterministic
    assert main(["generate", f"run.dir={isolate_run}", "prompt=The dog", "generate.domain=de",
                 "generate.max_new_tokens=4"]) == 0
    assert capsys.readouterr().out.startswith("route: de (forced)")
    assert main(["generate", f"run.dir={isolate_run}", "prompt=The dog", "generate.domain=fr"]) == 2
    assert "generate.domain=fr names a domain this run never saw" in capsys.readouterr().err


def test_generate_refuses_classifier_inference_without_a_trained_classifier(tmp_path, capsys):
    run = tmp_path / "likelihood"
    assert main(["continual", *RUN, "continual.stream=[en]", "continual.inference.method=likelihood",
                 f"run.dir={run}"]) == 0
    capsys.readouterr()
    assert main(["generate", f"run.dir={run}", "prompt=Hello", "generate.max_new_tokens=2"]) == 0
    assert "inferred, likelihood" in capsys.readouterr().out
    assert main(["generate", f"run.dir={run}", "prompt=Hello", "continual.inference.method=classifier"]) == 2
    err = capsys.readouterr().err
    assert "no trained domain classifier" in err and err.count("\n") == 1
