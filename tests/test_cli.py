"""`modular info` and the promised message + exit code 2 for bad configs."""

import json
import subprocess
import sys

import pytest

from modular.cli import main

BAD_CONFIGS = [
    (["model.foo=1"], ["model.foo", "allowed keys in model"]),
    (["model.d_model=abc"], ["model.d_model=abc", "integer"]),
    (["routing.top_k=9"], ["routing.top_k=9", "8 experts"]),
    (["experts.num_experts=0"], ["experts.num_experts=0", "at least 1"]),
    (["model.d_model=250"], ["model.d_model=250", "multiple of n_heads"]),
    (["experts.type=moe_magic"], ["experts.type='moe_magic'", "swiglu"]),
    (["routing.type=random"], ["routing.type='random'", "topk"]),
    (["model.moe_layers=[0,7]"], ["model.moe_layers", "7", "0 to 3"]),
    (["model=huge"], ["model preset 'huge'", "small"]),
    (["kernels.backend=cuda"], ["kernels.backend='cuda'", "auto"]),
    (["model.n_kv_heads=3"], ["model.n_kv_heads=3", "multiple of n_kv_heads"]),
    (["routing.type=expert_choice", "routing.capacity_factor=null"], ["routing.capacity_factor", "expert_choice"]),
    (["experts.num_experts_per_layer=[4]"], ["experts.num_experts_per_layer", "4 MoE layers"]),
    (["model.tie_embeddings=maybe"], ["model.tie_embeddings=maybe", "true or false"]),
    (["routing.capacity_factor=-1"], ["routing.capacity_factor=-1", "> 0"]),
    (["model.moe_layers=some"], ["model.moe_layers='some'", "every_n"]),
    (["notakey"], ["notakey", "key=value"]),
    (["kernels.backend=megablocks"], ["megablocks", "not installed"]),
]


@pytest.mark.parametrize("overrides,fragments", BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_one_sentence_exit_2(overrides, fragments, capsys, tmp_path):
    code = main(["info", *overrides, f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (tmp_path / "run").exists()  # nothing written


def test_bad_config_through_the_console_script_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "modular", "info", "routing.top_k=0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: routing.top_k=0 is not allowed; it must be an integer >= 1."


@pytest.mark.parametrize("overrides", [[], ["experts=lowrank"], ["routing=expert_choice"], ["model=interleaved"],
                                       ["experts=shared", "routing=aux_free"], ["model=dense"],
                                       ["routing=sinkhorn", "experts=gelu"], ["routing=hash"]])
def test_info_composes_presets(overrides, capsys):
    assert main(["info", *overrides]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "FLOPs per token" in out


def test_info_writes_model_json(tmp_path, capsys):
    assert main(["info", "model=tiny", f"run.dir={tmp_path}"]) == 0
    data = json.loads((tmp_path / "model.json").read_text())
    assert {"total_params", "active_params", "flops_per_token", "layers"} <= set(data)
    assert data["active_params"] < data["total_params"]
    assert len(data["layers"]) == 2 and data["config"]["model"]["name"] == "tiny"


def test_unknown_command():
    assert main(["fly"]) == 2
