"""The decoder's vocabulary matrices, the token embedding and the output head, kept as blocks of rows:
the rows the model was built with, then one block per growth of the tokenizer, owned by the domain that grew it.

Freezing old rows is then requires_grad on whole blocks (no gradient mask), and the rows a domain added are
known by id (`owned_token_ids`). The state dict holds one `weight` [V, D] per matrix, Hugging Face's names, split
into the blocks on load. Legend: V vocabulary, D d_model, N rows of one block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class VocabRows(nn.Module):
    """A [V, D] matrix as blocks of rows: `weight` [N0, D], the rows the model was built with (nn.Embedding's
    and nn.Linear's name, so parameter names match the state dict until the vocabulary grows), then block_1
    [N1, D], block_2, …; `owners[k]` is the domain that added block k (None for the first). `full_weight` is
    the whole matrix."""

    def __init__(self, num_rows: int, dim: int):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.empty(num_rows, dim))
        self._owners: list[str | None] = [None]
        self.tied = False  # True: every block is the embedding's own parameter (tied output head)

    # -- the rows ---------------------------------------------------------------------------------------
    @property
    def owners(self) -> list[str | None]:
        return list(self._owners)

    @property
    def blocks(self) -> list[nn.Parameter]:
        return [self.weight] + [getattr(self, f"block_{k}") for k in range(1, len(self._owners))]

    @property
    def num_rows(self) -> int:
        return sum(b.shape[0] for b in self.blocks)

    @property
    def full_weight(self) -> Tensor:
        """All rows [V, D]: `weight` itself until the vocabulary grows, then the blocks' concatenation."""
        blocks = self.blocks
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=0)

    def tie_to(self, source: VocabRows) -> None:
        """Hold `source`'s parameters as this module's (tied embeddings, as assigning nn.Linear.weight does):
        they are registered once, under `source`, and grow with it (`add_block(..., shared=)`)."""
        self.keep_blocks(1)
        self.weight = source.weight
        self.tied = True

    def own_blocks(self) -> list[tuple[str, nn.Parameter, str | None]]:
        """(parameter name, block, owner) of the rows this module holds itself (none when tied)."""
        if self.tied:
            return []
        names = ["weight"] + [f"block_{k}" for k in range(1, len(self._owners))]
        return list(zip(names, self.blocks, self._owners))

    @torch.no_grad()
    def add_block(self, rows_ND: Tensor | None, owner: str | None, shared: nn.Parameter | None = None) -> nn.Parameter:
        """Append rows (ids num_rows … num_rows + N − 1) owned by `owner`, or, tied, the embedding's new block
        `shared`; returns the new parameter."""
        if shared is not None:
            block = shared
        else:
            if rows_ND.dim() != 2 or rows_ND.shape[1] != self.dim:
                raise ValueError(f"new rows must be [N, {self.dim}], got {tuple(rows_ND.shape)}")
            block = nn.Parameter(rows_ND.detach().to(device=self.weight.device, dtype=self.weight.dtype).clone())
        self.register_parameter(f"block_{len(self._owners)}", block)
        self._owners.append(owner)
        return block

    def keep_blocks(self, count: int) -> None:
        """Drop every block after the first `count` (structure being re-applied before a load)."""
        for k in range(max(1, count), len(self._owners)):
            delattr(self, f"block_{k}")
        self._owners = self._owners[:max(1, count)]

    def owned_token_ids(self) -> dict[str | None, range]:
        """{owner: ids of its rows}; the rows the model was built with are under None."""
        out: dict[str | None, range] = {}
        start = 0
        for block, owner in zip(self.blocks, self.owners):
            stop = start + block.shape[0]
            previous = out.get(owner)
            out[owner] = range(previous.start if previous else start, stop)  # a domain's blocks are adjacent
            start = stop
        return out

    # -- the state dict: one `weight` [V, D], as nn.Embedding / nn.Linear have ------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = self.full_weight
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k != key
                                   and "." not in k[len(prefix):])
        if key not in state_dict:
            if not self.tied:  # tied rows are loaded with the embedding they belong to
                missing_keys.append(key)
            return
        value = state_dict[key]
        if tuple(value.shape) != (self.num_rows, self.dim):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, the "
                              f"shape in current model is {(self.num_rows, self.dim)}.")
            return
        if self.tied:
            return
        with torch.no_grad():
            for block, rows in zip(self.blocks, value.split([b.shape[0] for b in self.blocks])):
                block.copy_(rows)


class TokenEmbedding(VocabRows):
    """ids [B, T] -> vectors [B, T, D] (nn.Embedding's lookup)."""

    def __init__(self, num_rows: int, dim: int):
        super().__init__(num_rows, dim)
        # nn.Embedding's own initialisation (the decoder re-initialises every matrix): drawn all the same, so
        # the random stream, and every weight drawn after it, stays what it was with nn.Embedding
        nn.init.normal_(self.weight)

    def forward(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids, self.full_weight)


class OutputHead(VocabRows):
    """hidden [B, T, D] -> logits [B, T, V] (nn.Linear without bias); tied, it reads the embedding's rows."""

    def __init__(self, num_rows: int, dim: int):
        super().__init__(num_rows, dim)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's, for the same random stream

    def forward(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.full_weight)


# -- growth of a model's vocabulary -------------------------------------------------------------------------


def add_vocab_rows(model, embedding_rows_ND: Tensor, head_rows_ND: Tensor | None, owner: str) -> range:
    """Append N tokens to `model` (a ModularLM): embedding rows, and output-head rows unless the head is tied.

    Returns the ids of the new tokens.
    """
    first = model.embed_tokens.num_rows
    if not model.lm_head.tied and (head_rows_ND is None or head_rows_ND.shape != embedding_rows_ND.shape):
        raise ValueError("an untied output head needs new rows of the embedding's shape")
    block = model.embed_tokens.add_block(embedding_rows_ND, owner)
    if model.lm_head.tied:
        model.lm_head.add_block(None, owner, shared=block)
    else:
        model.lm_head.add_block(head_rows_ND, owner)
    return range(first, model.embed_tokens.num_rows)


def vocab_structure(model) -> list[dict]:
    """[{"rows", "domain"} per block] of the vocabulary (what a checkpoint records to rebuild it)."""
    return [{"rows": int(b.shape[0]), "domain": owner}
            for b, owner in zip(model.embed_tokens.blocks, model.embed_tokens.owners)]


def apply_vocab_structure(model, blocks: list[dict] | None) -> None:
    """Give the model's vocabulary matrices exactly these blocks (weights are loaded after)."""
    blocks = blocks or [{"rows": model.embed_tokens.weight.shape[0], "domain": None}]
    if vocab_structure(model) == blocks:
        return
    base = model.embed_tokens.weight
    if blocks[0]["rows"] != base.shape[0]:
        from modular.errors import CheckpointError

        raise CheckpointError(f"The checkpoint's vocabulary starts with {blocks[0]['rows']} tokens but the model "
                              f"was built with {base.shape[0]}; it belongs to another model.")
    for matrix in (model.embed_tokens, model.lm_head):
        matrix.keep_blocks(1)
    for b in blocks[1:]:
        empty = base.new_zeros(int(b["rows"]), base.shape[1])
        add_vocab_rows(model, empty, None if model.lm_head.tied else empty, b["domain"])
