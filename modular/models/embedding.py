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
    """A [V, D] matrix as parameters block_0 [N0, D], block_1 [N1, D], …; `owners[k]` is the domain of block k
    (None for the rows the model was built with)."""

    def __init__(self, num_rows: int, dim: int):
        super().__init__()
        self.dim = dim
        self.block_0 = nn.Parameter(torch.empty(num_rows, dim))
        self._owners: list[str | None] = [None]
        self._source: VocabRows | None = None  # tied: the rows are another module's (the embedding's)

    # -- the rows ---------------------------------------------------------------------------------------
    @property
    def tied(self) -> bool:
        return self._source is not None

    @property
    def owners(self) -> list[str | None]:
        return self._source.owners if self._source is not None else list(self._owners)

    @property
    def blocks(self) -> list[nn.Parameter]:
        if self._source is not None:
            return self._source.blocks
        return [getattr(self, f"block_{k}") for k in range(len(self._owners))]

    @property
    def num_rows(self) -> int:
        return sum(b.shape[0] for b in self.blocks)

    @property
    def weight(self) -> Tensor:
        """All rows [V, D]: the one block itself until the vocabulary grows, then their concatenation."""
        blocks = self.blocks
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=0)

    def tie_to(self, source: VocabRows) -> None:
        """Use `source`'s rows from now on (tied embeddings); this module's own rows are dropped."""
        for k in range(len(self._owners)):
            delattr(self, f"block_{k}")
        self._owners = []
        object.__setattr__(self, "_source", source)  # not a submodule: its parameters are registered once

    def own_blocks(self) -> list[tuple[str, nn.Parameter, str | None]]:
        """(parameter name, block, owner) of the rows this module holds itself (none when tied)."""
        if self._source is not None:
            return []
        return [(f"block_{k}", getattr(self, f"block_{k}"), owner) for k, owner in enumerate(self._owners)]

    @torch.no_grad()
    def add_block(self, rows_ND: Tensor, owner: str | None) -> nn.Parameter:
        """Append rows (ids num_rows … num_rows + N − 1) owned by `owner`; returns the new parameter."""
        if self._source is not None:
            raise ValueError("a tied matrix grows with the one it is tied to")
        if rows_ND.dim() != 2 or rows_ND.shape[1] != self.dim:
            raise ValueError(f"new rows must be [N, {self.dim}], got {tuple(rows_ND.shape)}")
        first = self.block_0
        block = nn.Parameter(rows_ND.detach().to(device=first.device, dtype=first.dtype).clone())
        self.register_parameter(f"block_{len(self._owners)}", block)
        self._owners.append(owner)
        return block

    def keep_blocks(self, count: int) -> None:
        """Drop every block after the first `count` (structure being re-applied before a load)."""
        if self._source is not None:
            return
        for k in range(count, len(self._owners)):
            delattr(self, f"block_{k}")
        self._owners = self._owners[:count]

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

    # -- the state dict: one `weight`, as nn.Embedding / nn.Linear have -------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = self.weight
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k != key
                                   and "." not in k[len(prefix):])
        if key not in state_dict:
            if self._source is None:  # tied rows are loaded with the matrix they belong to
                missing_keys.append(key)
            return
        value = state_dict[key]
        if tuple(value.shape) != (self.num_rows, self.dim):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, the "
                              f"shape in current model is {(self.num_rows, self.dim)}.")
            return
        if self._source is not None:
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
        nn.init.normal_(self.block_0)

    def forward(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids, self.weight)


class OutputHead(VocabRows):
    """hidden [B, T, D] -> logits [B, T, V] (nn.Linear without bias); tied, it reads the embedding's rows."""

    def __init__(self, num_rows: int, dim: int):
        super().__init__(num_rows, dim)
        nn.init.kaiming_uniform_(self.block_0, a=math.sqrt(5))  # nn.Linear's, for the same random stream

    def forward(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.weight)


# -- growth of a model's vocabulary -------------------------------------------------------------------------


def add_vocab_rows(model, embedding_rows_ND: Tensor, head_rows_ND: Tensor | None, owner: str) -> range:
    """Append N tokens to `model` (a ModularLM): embedding rows, and output-head rows unless the head is tied.

    Returns the ids of the new tokens.
    """
    first = model.embed_tokens.num_rows
    if not model.lm_head.tied:
        if head_rows_ND is None or head_rows_ND.shape != embedding_rows_ND.shape:
            raise ValueError("an untied output head needs new rows of the embedding's shape")
        model.lm_head.add_block(head_rows_ND, owner)
    model.embed_tokens.add_block(embedding_rows_ND, owner)
    return range(first, model.embed_tokens.num_rows)


def vocab_structure(model) -> list[dict]:
    """[{"rows", "domain"} per block] of the vocabulary (what a checkpoint records to rebuild it)."""
    return [{"rows": int(b.shape[0]), "domain": owner}
            for b, owner in zip(model.embed_tokens.blocks, model.embed_tokens.owners)]


def apply_vocab_structure(model, blocks: list[dict] | None) -> None:
    """Give the model's vocabulary matrices exactly these blocks (weights are loaded after)."""
    blocks = blocks or [{"rows": model.embed_tokens.blocks[0].shape[0], "domain": None}]
    if vocab_structure(model) == blocks:
        return
    base = model.embed_tokens.blocks[0]
    if blocks[0]["rows"] != base.shape[0]:
        from modular.errors import CheckpointError

        raise CheckpointError(f"The checkpoint's vocabulary starts with {blocks[0]['rows']} tokens but the model "
                              f"was built with {base.shape[0]}; it belongs to another model.")
    for matrix in (model.embed_tokens, model.lm_head):
        matrix.keep_blocks(1)
    for b in blocks[1:]:
        empty = base.new_zeros(int(b["rows"]), base.shape[1])
        add_vocab_rows(model, empty, None if model.lm_head.tied else empty, b["domain"])
