"""The Avalanche baselines: EWC penalty and importances, LwF loss, the replay buffer and loader, end to end."""

import json
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("avalanche", reason="needs the avalanche extra (pip install -e '.[avalanche]')")

from modular.cli import main
from modular.config import compose_config
from modular.continual import avalanche_adapter as av
from modular.data.loader import MixtureLoader
from modular.errors import CheckpointError, ConfigError
from modular.models import build_model

SMALL = ["model=tiny", "experts.num_experts=4", "experts.ffn_dim=32", "continual.steps_per_stage=2",
         "train.batch_size=2", "train.seq_len=32", "train.eval_batches=1", "train.progress=false",
         "continual.usage_batches=1", "continual.stage_warmup_steps=1", "continual.plots=false",
         "continual.stream=[en,de]"]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model(compose_config(["model=tiny", "experts.num_experts=4", "experts.ffn_dim=32"]))


def random_windows(n, t, vocab, seed=1):
    return torch.randint(0, vocab, (n, t + 1), generator=torch.Generator().manual_seed(seed))


# -- EWC ----------------------------------------------------------------------------------------


def test_ewc_importances_are_mean_squared_minibatch_gradients_of_token_cross_entropy():
    model = tiny_model()
    windows = random_windows(6, 16, model.vocab_size)
    importances, params = av.compute_ewc_state(model, windows, batch_size=2, device=torch.device("cpu"))
    assert all(p.grad is None for p in model.parameters())  # no gradient left for the next training step
    model.eval()
    names = [n for n, _ in model.named_parameters()]
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for b in range(3):
        x, y = windows[2 * b:2 * b + 2, :-1], windows[2 * b:2 * b + 2, 1:]
        loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                expected[n] += g.pow(2) / 3
    assert set(importances) == set(names) == set(params)
    for n, p in model.named_parameters():
        torch.testing.assert_close(importances[n], expected[n], rtol=1e-4, atol=1e-12)  # float32 gradients
        assert torch.equal(params[n], p.detach())
    assert sum(int((imp > 0).sum()) for imp in importances.values()) > 0.9 * sum(p.numel() for p in model.parameters())


def test_ewc_penalty_is_zero_at_the_snapshot_and_matches_float64_after_a_move(tmp_path):
    model = tiny_model()
    imp1, par1 = av.compute_ewc_state(model, random_windows(4, 16, model.vocab_size, 1), 2, torch.device("cpu"))
    # a second stage with its own snapshot: the penalty sums over every earlier stage
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    imp2, par2 = av.compute_ewc_state(model, random_windows(4, 16, model.vocab_size, 2), 2, torch.device("cpu"), stage=1)
    av.save_ewc_state(tmp_path / "s0.safetensors", imp1, par1, {"stage": "0"})
    loaded = av.load_ewc_state(tmp_path / "s0.safetensors", model, torch.device("cpu"))
    assert all(torch.equal(loaded[0][n], imp1[n]) and torch.equal(loaded[1][n], par1[n]) for n in imp1)
    lam = 37.0
    one = av.ewc_hook(model, [loaded], lam, torch.device("cpu"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(par1[n])
    assert float(one(None, None).detach()) == 0.0

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    both = av.ewc_hook(model, [(imp1, par1), (imp2, par2)], lam, torch.device("cpu"))
    penalty = both(None, None)
    expected = sum(lam / 2 * (imp[n].double() * (p.detach().double() - par[n].double()) ** 2).sum()
                   for imp, par in ((imp1, par1), (imp2, par2)) for n, p in model.named_parameters())
    assert float(penalty.detach()) > 0
    # float32 sums over ~10^5 products: relative rounding ~sqrt(n)·eps ≈ 4e-5
    assert float(penalty.detach()) == pytest.approx(float(expected), rel=1e-4)
    penalty.backward()  # its gradient pulls every parameter back: λ · Σ F (θ − θ*)
    for n, p in model.named_parameters():
        want = sum(lam * imp[n] * (p.detach() - par[n]) for imp, par in ((imp1, par1), (imp2, par2)))
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-10)


# -- LwF ----------------------------------------------------------------------------------------


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits, self.vocab_size = logits, logits.shape[-1]

    def forward(self, x):
        return SimpleNamespace(logits=self.logits)


def test_lwf_loss_equals_a_hand_computation_on_given_logits():
    g = torch.Generator().manual_seed(3)
    B, T, V, alpha, temp = 2, 5, 11, 0.7, 2.5
    teacher_logits = 3 * torch.randn(B, T, V, generator=g)
    student_logits = (3 * torch.randn(B, T, V, generator=g)).requires_grad_()
    batch = SimpleNamespace(inputs=torch.zeros(B, T, dtype=torch.int64))
    hook = av.lwf_hook(FixedLogits(teacher_logits), alpha, temp)
    loss = hook(batch, SimpleNamespace(logits=student_logits))
    q = torch.softmax(teacher_logits.double() / temp, -1)
    log_p = torch.log_softmax(student_logits.detach().double() / temp, -1)
    expected = alpha * (q * (q.log() - log_p)).sum() / (B * T)  # KL per token, averaged over the B·T tokens
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert student_logits.grad.abs().sum() > 0
    same = hook(batch, SimpleNamespace(logits=teacher_logits.clone()))
    assert abs(float(same)) < 1e-6


# -- Replay -------------------------------------------------------------------------------------


def fake_loader(batch_size=4, seq_len=8, seed=5, domain="code_py"):
    shard = SimpleNamespace(tokens=np.arange(2000, dtype=np.int64) % 200, num_tokens=2000)
    return MixtureLoader({domain: shard}, batch_size, seq_len, seed=seed)


def buffer_rows(seq_len=8):
    windows = 500 + torch.arange(7 * (seq_len + 1)).view(7, seq_len + 1)  # tokens >= 500: never in the shard
    return windows, ["en"] * 4 + ["de"] * 3


def test_replay_loader_replaces_the_expected_share_of_rows_with_buffer_windows():
    windows, domains = buffer_rows()
    loader = av.ReplayLoader(fake_loader(), windows, domains, share=0.5, seed=[0, 1])
    assert loader.domain_names == ("code_py", "en", "de")
    for _ in range(20):
        b = next(loader)
        from_buffer = (b.tokens >= 500).all(1)
        assert from_buffer.tolist() == [False, False, True, True]  # exactly half, in the last rows
        for row, d in zip(b.tokens[2:], b.domain_ids[2:]):
            k = int(row[0] - 500) // 9
            assert torch.equal(row, windows[k]) and b.domain_names[d] == domains[k]
        assert (b.domain_ids[:2] == 0).all()
    fractional = av.ReplayLoader(fake_loader(), windows, domains, share=0.3, seed=[0, 1])
    shares = [float((next(fractional).tokens >= 500).all(1).float().mean()) for _ in range(400)]
    assert set(shares) <= {0.25, 0.5}  # ⌊1.2⌋ = 1 row, one more with probability 0.2
    assert np.mean(shares) == pytest.approx(0.3, abs=0.02)  # 4 standard errors


def test_replay_loader_is_deterministic_and_resumes_from_its_state():
    windows, domains = buffer_rows()
    a = av.ReplayLoader(fake_loader(), windows, domains, share=0.3, seed=[0, 1])
    b = av.ReplayLoader(fake_loader(), windows, domains, share=0.3, seed=[0, 1])
    for _ in range(6):
        assert torch.equal(next(a).tokens, next(b).tokens)
    state = json.loads(json.dumps(a.state_dict()))
    rest = [next(a) for _ in range(6)]
    # the Trainer restores the inner loader before the stage wraps it; both ways continue exactly
    inner = fake_loader()
    inner.load_state_dict(state)
    via_inner = av.ReplayLoader(inner, windows, domains, share=0.3, seed=[0, 1])
    via_wrapper = av.ReplayLoader(fake_loader(), windows, domains, share=0.3, seed=[0, 1])
    via_wrapper.load_state_dict(state)
    for want in rest:
        assert torch.equal(next(via_inner).tokens, want.tokens)
        got = next(via_wrapper)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.domain_ids, want.domain_ids)
    other = av.ReplayLoader(fake_loader(), windows + 1, domains, share=0.3, seed=[0, 1])
    with pytest.raises(CheckpointError, match="replay buffer"):
        other.load_state_dict(state)


def test_replay_buffer_is_balanced_over_stages_deterministic_and_persisted(tmp_path):
    stages = [fake_loader(batch_size=2, seed=s, domain=d) for s, d in enumerate(["en", "de"])]
    for loader in stages:
        for _ in range(10):
            next(loader)
    drawn = [{tuple(loader.batch_at(k).tokens[r].tolist()) for k in range(10) for r in range(2)} for loader in stages]

    def fill(buffer, upto):
        for s in range(upto):
            av.update_replay_buffer(buffer, av.StageWindows(stages[s], 10, s), seed=100 + s)
        return buffer

    one = fill(av.new_replay_buffer(6), 1)
    tokens, domain_idx = av.buffer_windows(one)
    assert tokens.shape == (6, 9) and domain_idx.tolist() == [0] * 6
    assert all(tuple(w.tolist()) in drawn[0] for w in tokens) and len({tuple(w.tolist()) for w in tokens}) == 6
    av.save_replay_buffer(tmp_path / "b.safetensors", one, {"stage": "0"})
    resumed = av.load_replay_buffer(tmp_path / "b.safetensors", 6)
    assert torch.equal(av.buffer_windows(resumed)[0], tokens)
    av.update_replay_buffer(resumed, av.StageWindows(stages[1], 10, 1), seed=101)
    straight = fill(av.new_replay_buffer(6), 2)
    tokens2, domain_idx2 = av.buffer_windows(straight)
    assert torch.equal(av.buffer_windows(resumed)[0], tokens2)  # the reservoir keys survive the file
    assert sorted(domain_idx2.tolist()) == [0, 0, 0, 1, 1, 1]  # memory split equally over the two stages
    assert all(tuple(w.tolist()) in drawn[int(d)] for w, d in zip(tokens2, domain_idx2))
    assert torch.equal(av.buffer_windows(fill(av.new_replay_buffer(6), 2))[0], tokens2)


# -- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["ewc", "lwf", "avalanche_replay"])
def test_presets_compose(strategy):
    cfg = compose_config([f"continual={strategy}"])
    assert cfg.continual.strategy == strategy and list(cfg.continual.stream) == ["en", "de", "code_py"]
    assert cfg.continual.steps_per_stage == 120
    av.validate_avalanche(cfg)


@pytest.mark.parametrize("override,fragment", [("continual.ewc_lambda=-1", "ewc_lambda=-1"),
                                               ("continual.lwf_temperature=0", "lwf_temperature=0"),
                                               ("continual.avalanche_mem_size=0", "avalanche_mem_size=0")])
def test_bad_knobs_are_one_sentence(override, fragment):
    cfg = compose_config(["continual=lwf", override])
    with pytest.raises(ConfigError, match=fragment) as info:
        av.validate_avalanche(cfg)
    assert str(info.value).count(". ") == 0


# -- end to end ---------------------------------------------------------------------------------


def report(run):
    return json.loads((run / "report.json").read_text())


@pytest.mark.parametrize("strategy,files", [("lwf", ["lwf_stage00", "lwf_stage01"]),
                                            ("avalanche_replay", ["replay_stage00", "replay_stage01"])])
def test_strategy_runs_end_to_end(strategy, files, tmp_path):
    run = tmp_path / strategy
    assert main(["continual", *SMALL, f"continual={strategy}", f"run.dir={run}"]) == 0
    r = report(run)
    assert r["strategy"] == strategy and len(r["matrix"]) == 2
    assert sorted(p.stem for p in (run / "avalanche").iterdir()) == files
    if strategy == "avalanche_replay":
        # stage 1 trained on batches with rows of the stage-0 buffer: the loader state says so
        from modular.train import checkpoint as ckpt

        state = ckpt.read_trainer_state(ckpt.latest_checkpoint(run / "stages" / "01-de"))["loader"]
        assert state["replay"]["share"] == 0.5 and state["replay"]["windows"] == 4  # 2 steps × 2 rows of en


def test_ewc_end_to_end_resumes_mid_stage_with_the_persisted_state(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    from modular.continual.strategies.ewc import EWC

    lam = 1e4
    run = tmp_path / "ewc"
    original = EWC.attach

    def stop_in_stage_1(self, run, model, stage, trainer):
        original(self, run, model, stage, trainer)
        if stage == 1:  # SIGINT during stage 1's first step: the Trainer saves step 1 and the stream stops
            trainer.loss_hooks.append(lambda batch, out: signal.raise_signal(signal.SIGINT) or 0.0)

    monkeypatch.setattr(EWC, "attach", stop_in_stage_1)
    assert main(["continual", *SMALL, "continual=ewc", f"continual.ewc_lambda={lam}", f"run.dir={run}"]) == 130
    assert len(json.loads((run / "continual_state.json").read_text())["stages"]) == 1
    step1 = run / "stages" / "01-de" / "checkpoints" / "step_0000001"
    assert step1.is_dir()

    saved = run / "avalanche" / "ewc_stage00.safetensors"
    saved.rename(tmp_path / "aside")
    capsys.readouterr()
    monkeypatch.setattr(EWC, "attach", original)
    assert main(["continual", f"run.dir={run}"]) == 1
    err = capsys.readouterr().err
    assert "EWC importances" in err and "ewc_stage00" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "aside").rename(saved)

    penalties = []

    def record_penalties(self, run, model, stage, trainer):
        original(self, run, model, stage, trainer)
        ewc = trainer.loss_hooks[-1]

        def spy(batch, out):
            penalty = ewc(batch, out)
            penalties.append(float(penalty.detach()))
            return penalty

        trainer.loss_hooks[-1] = spy

    monkeypatch.setattr(EWC, "attach", record_penalties)
    assert main(["continual", f"run.dir={run}"]) == 0
    r = report(run)
    assert r["strategy"] == "ewc" and len(r["matrix"]) == 2
    assert sorted(p.name for p in (run / "avalanche").iterdir()) == ["ewc_stage00.safetensors",
                                                                    "ewc_stage01.safetensors"]
    # the resumed step 2 starts from the step-1 weights; its penalty is the one the stage-0 file implies
    state, weights = load_file(saved), load_file(step1 / "model.safetensors")
    names = [k[len("param."):] for k in state if k.startswith("param.")]
    expected = sum(lam / 2 * (state[f"importance.{n}"].double()
                              * (weights[n].double() - state[f"param.{n}"].double()) ** 2).sum() for n in names)
    assert len(penalties) == 1 and penalties[0] > 0
    assert penalties[0] == pytest.approx(float(expected), rel=1e-4)
