"""The embedding and output head as row blocks: the same numbers as one matrix (float64 reference, forward and
gradients), one `weight` per matrix in the state dict, tied heads stay tied, structure rebuilds the blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from helpers import tiny_cfg
from modular.models import build_model
from modular.models.embedding import OutputHead, TokenEmbedding, add_vocab_rows
from modular.models.structure import apply_structure, model_structure
from modular.train.checkpoint import unique_state_dict


def grown_matrices(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    embedding, head = TokenEmbedding(7, 5), OutputHead(7, 5)
    for m in (embedding, head):
        with torch.no_grad():
            m.weight.copy_(torch.randn(7, 5, generator=g))
        m.add_block(torch.randn(3, 5, generator=g), "ru")
        m.add_block(torch.randn(2, 5, generator=g), "ja")
        m.to(dtype)
    return embedding, head


def test_blocks_compute_what_one_matrix_computes_forward_and_backward():
    embedding, head = grown_matrices()
    ids = torch.tensor([[0, 6, 7, 9, 11, 3]])
    h = torch.randn(1, 6, 5, dtype=torch.float64, requires_grad=True)
    ref_e = torch.cat([b.detach() for b in embedding.blocks]).requires_grad_(True)
    ref_h = torch.cat([b.detach() for b in head.blocks]).requires_grad_(True)
    out = (embedding(ids) * h).sum() + head(h).pow(2).sum()
    ref = (F.embedding(ids, ref_e) * h).sum() + (h @ ref_h.T).pow(2).sum()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.backward()
    ref_grads = torch.autograd.grad(ref, (ref_e, ref_h))
    for matrix, want in zip((embedding, head), ref_grads):
        torch.testing.assert_close(torch.cat([b.grad for b in matrix.blocks]), want, rtol=1e-12, atol=1e-12)


def test_a_frozen_block_gets_no_gradient_and_the_others_do():
    embedding, _ = grown_matrices(torch.float32)
    embedding.weight.requires_grad_(False)
    embedding(torch.tensor([[0, 8, 10]])).sum().backward()
    assert embedding.weight.grad is None
    assert embedding.block_1.grad.abs().sum() > 0 and embedding.block_2.grad.abs().sum() > 0


def test_the_state_dict_holds_one_weight_and_loads_back_into_the_blocks():
    embedding, _ = grown_matrices()
    state = embedding.state_dict()
    assert list(state) == ["weight"] and state["weight"].shape == (12, 5)
    fresh = TokenEmbedding(7, 5).to(torch.float64)
    fresh.add_block(torch.zeros(3, 5), "ru")
    fresh.add_block(torch.zeros(2, 5), "ja")
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.weight, embedding.weight, rtol=0, atol=0)
    assert fresh.owned_token_ids() == {None: range(7), "ru": range(7, 10), "ja": range(10, 12)}
    missing = fresh.load_state_dict({}, strict=False)
    assert missing.missing_keys == ["weight"]
    result = fresh.load_state_dict({"weight": state["weight"], "block_1": state["weight"]}, strict=False)
    assert result.unexpected_keys == ["block_1"]


def test_a_grown_model_checkpoints_like_a_plain_one_of_the_whole_vocabulary():
    for tied in (True, False):
        cfg = tiny_cfg(f"model.tie_embeddings={str(tied).lower()}", "experts.num_experts=4", "experts.ffn_dim=32")
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        rows = torch.randn(5, model.d_model)
        add_vocab_rows(model, rows, None if tied else rows.flip(0), "ru")
        assert model.vocab_size == 264 and model.lm_head.tied is tied
        state = unique_state_dict(model)
        assert ("lm_head.weight" in state) is not tied  # tied: stored once, as before growth
        assert state["embed_tokens.weight"].shape == (264, 64)
        plain_cfg = tiny_cfg(f"model.tie_embeddings={str(tied).lower()}", "experts.num_experts=4",
                             "experts.ffn_dim=32", "model.vocab_size=264")
        plain = build_model(plain_cfg).eval()
        plain.load_state_dict(model.state_dict(), strict=True)
        ids = torch.randint(0, 264, (2, 16), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=0)
        # structure: a fresh model of the config rebuilds the blocks, then the weights load
        structure = model_structure(model)
        assert structure["vocab"] == [{"rows": 259, "domain": None}, {"rows": 5, "domain": "ru"}]
        again = build_model(cfg).eval()
        apply_structure(again, structure)
        again.load_state_dict(state, strict=False)
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
        assert again.embed_tokens.owned_token_ids()["ru"] == range(259, 264)
        apply_structure(again, {k: v for k, v in structure.items() if k != "vocab"})  # back to the base vocabulary
        assert again.vocab_size == 259 and len(again.lm_head.blocks) == 1


def test_tied_rows_stay_tied_through_growth_and_copies():
    import copy

    model = build_model(tiny_cfg("experts.num_experts=4", "experts.ffn_dim=32"))
    add_vocab_rows(model, torch.randn(3, model.d_model), None, "ru")
    assert model.lm_head.blocks[1] is model.embed_tokens.blocks[1]
    assert [n for n, _ in model.named_parameters() if "lm_head" in n or "embed" in n] == \
        ["embed_tokens.weight", "embed_tokens.block_1"]
    twin = copy.deepcopy(model)
    assert twin.lm_head.blocks[1] is twin.embed_tokens.blocks[1] and twin.embed_tokens.blocks[1] is not \
        model.embed_tokens.blocks[1]
