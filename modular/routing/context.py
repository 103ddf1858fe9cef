"""What every MoE layer may know about the tokens besides their hidden states: the routing context.

The decoder builds one `RoutingContext` per forward and hands it to every MoE layer (and adapter):
the input token ids (hash routing), and per batch row the domain it belongs to (domain-owned experts
route a row only among the experts its domain may use; domain adapters apply to their rows). Domain
ids index `domain_names`, the domains the model knows (ModularLM.domains). Legend: B rows, T
positions, N = B·T tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class RoutingContext:
    token_ids: Tensor | None = None  # [B, T] int64: the input token ids
    domain_ids: Tensor | None = None  # [B] int64: the domain of each row (None: no domain routing)
    domain_names: tuple[str, ...] = ()  # what the domain ids index
    _present: tuple[int, ...] | None = field(default=None, repr=False)

    def present_domains(self) -> tuple[int, ...]:
        """The distinct domain ids of the batch, ascending (read from the device once per forward)."""
        if self.domain_ids is None:
            return ()
        if self._present is None:
            self._present = tuple(sorted(set(self.domain_ids.reshape(-1).tolist())))
        return self._present

    @staticmethod
    def of(value) -> RoutingContext:
        """A context from what a caller passed: a context, bare token ids (the older call), or None."""
        if isinstance(value, RoutingContext):
            return value
        return RoutingContext(token_ids=value)

    def flat_token_ids(self) -> Tensor | None:
        """[N] token ids in the layer's flattened token order, or None."""
        return None if self.token_ids is None else self.token_ids.reshape(-1)

    def token_domains(self, num_tokens: int) -> Tensor | None:
        """[N] the domain of every token (rows repeated over their positions), or None."""
        if self.domain_ids is None:
            return None
        rows = self.domain_ids.reshape(-1)
        if num_tokens % rows.numel():
            raise ValueError(f"{num_tokens} tokens cannot be split into the context's {rows.numel()} rows.")
        return rows.repeat_interleave(num_tokens // rows.numel())
