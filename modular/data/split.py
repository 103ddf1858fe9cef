"""Deterministic train/validation split by document hash, the rule the shared corpora were split with.
A document is `val` when int(sha1(utf-8 text)) % 100 < val_fraction * 100; otherwise `train`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from modular.data.config import DomainConfig

SPLITS = ("train", "val")


def is_val_document(text: str, val_fraction: float) -> bool:
    """True when the hash rule puts this document in the validation split."""
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()
    return int(digest, 16) % 100 < round(val_fraction * 100)


@dataclass(frozen=True)
class SplitPlan:
    """Which files make up one split of a domain, and which of their documents it keeps."""

    source: str  # the config path (file, directory or glob) to read
    source_field: str  # the DomainConfig field it came from: "train" or "val"
    keep: str | None  # None: every document; "train" / "val": only those the hash rule assigns there
    val_fraction: float

    def keeps(self, text: str) -> bool:
        if self.keep is None:
            return True
        return is_val_document(text, self.val_fraction) == (self.keep == "val")

    def describe(self) -> dict:
        return {"source": self.source, "keep": self.keep or "all",
                "val_fraction": self.val_fraction if self.keep else None}


def plan_split(domain: DomainConfig, split: str, val_fraction: float) -> SplitPlan:
    """A domain with a `val` path uses each file whole; without one, both splits come from `train`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if domain.val is not None:
        return SplitPlan(source=getattr(domain, split), source_field=split, keep=None,
                         val_fraction=val_fraction)
    return SplitPlan(source=domain.train, source_field="train", keep=split, val_fraction=val_fraction)
