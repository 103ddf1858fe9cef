"""Seed → upcycle → train → export: how much of an MoE's gain over its dense seed each dense merge keeps.

Trains a tiny dense byte-level model on the embedded English sample, upcycles it to 4 experts, trains on,
then writes the MoE (Mixtral) and one merged dense Llama per merge method, each reloaded by transformers.
    python examples/merge_to_dense.py [OUT_DIR]      (a few minutes on a 2-core CPU)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

import modular
from modular.config import compose_config
from modular.data.tokenizer import ByteTokenizer
from modular.export import export_dense, export_moe, export_report, upcycle
from modular.models import build_model

SEQ, BATCH = 64, 8


def windows(split: str, tokenizer: ByteTokenizer) -> torch.Tensor:
    """The sample's documents packed as [bos] text [eos] and cut into SEQ+1 windows."""
    path = Path(modular.__file__).parent / "data" / "sample" / "en" / f"{split}.jsonl"
    ids: list[int] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        ids += [tokenizer.bos_id] + tokenizer.encode(json.loads(line)["text"]) + [tokenizer.eos_id]
    n = len(ids) // (SEQ + 1)
    return torch.tensor(ids[: n * (SEQ + 1)]).view(n, SEQ + 1)


def train(model, data: torch.Tensor, steps: int, lr: float = 3e-3, seed: int = 0) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        rows = data[torch.randint(0, len(data), (BATCH,), generator=g)]
        loss = model(rows[:, :-1], rows[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def main(out_root: Path) -> None:
    torch.manual_seed(0)
    tokenizer = ByteTokenizer()
    train_data, val_data = windows("train", tokenizer), windows("val", tokenizer)
    eval_batches = {"en": [(val_data[i:i + BATCH, :-1], val_data[i:i + BATCH, 1:])
                           for i in range(0, min(len(val_data), 8 * BATCH), BATCH)]}

    cfg = compose_config(["model=tiny", "model.moe_layers=none", "model.ffn_dim=128", f"train.seq_len={SEQ}"])
    seed = build_model(cfg)
    train(seed, train_data, steps=150)
    moe, moe_cfg = upcycle(seed, cfg, num_experts=4, top_k=2, noise=0.01)
    train(moe, train_data, steps=150, lr=1e-3, seed=1)
    calibration = [row[:, :-1] for row in train_data[: 4 * BATCH].split(BATCH)]

    print(f"{'export':<22} {'width':>6} {'val ppl':>8}  retained share of the MoE's gain over the seed")
    moe_dir = export_moe(moe, moe_cfg, tokenizer, out_root / "mixtral", overwrite=True)
    report = export_report(moe, moe_dir, eval_batches, seed_model=seed)
    row = report["domains"]["en"]
    print(f"{'seed (dense)':<22} {cfg.model.ffn_dim:>6} {row['seed']['perplexity']:8.3f}")
    print(f"{'MoE (ours)':<22} {'4x128':>6} {row['moe']['perplexity']:8.3f}")
    print(f"{'Mixtral (reloaded)':<22} {'4x128':>6} {row['exported']['perplexity']:8.3f}  {row['retained_share']:.1%}")
    for merge in ("uniform", "frequency", "task_arithmetic", "ties", "concat"):
        out = export_dense(moe, moe_cfg, tokenizer, out_root / f"dense-{merge}", merge=merge, seed_ffn=seed,
                           calibration_batches=calibration, overwrite=True)
        report = export_report(moe, out, eval_batches, seed_model=seed, out_path=out / "export_report.json")
        row = report["domains"]["en"]
        width = json.loads((out / "config.json").read_text())["intermediate_size"]
        share = row["retained_share"]
        print(f"{'dense ' + merge:<22} {width:>6} {row['exported']['perplexity']:8.3f}  "
              f"{'-' if share is None else f'{share:.1%}'}")
    print(f"folders in {out_root}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="merge-to-dense-")))
