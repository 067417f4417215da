"""LLM rerankers as one logit per pair: the decoder's hidden state at each pair's last real token, times one row.

A causal-LM reranker answers with a token ("yes"): its logit is the answer token's logit minus another's ("no"),
or the logit itself, at the last position. That is the final hidden state times one row of the LM head
(``w_yes - w_no``, made in float32 once, at load, as vLLM's ``from_2_way_softmax`` does), so the head over the
whole vocabulary (151,669 rows for Qwen3, at every position, in the model card's code) is never computed, and the
head of an untied model (Qwen3-Reranker-8B's 1.2 GB) is freed. A ``*-seq-cls`` conversion carries the row as its
classifier already.

Batches are right-padded. Under the causal mask a real token never attends to the padding after it, and positions
count from each pair's first token, so padding never changes a pair's logit. The mask goes to the model as the
4-D mask transformers would build (causal, padded keys masked), built without reading any tensor on the host, so a
forward pass can be captured as a CUDA graph (transformers' own mask code asks whether the batch is padded).

Every pair of a batch starts with the same tokens (the system prompt and, with one instruction, the instruction;
within a request, the query too). ``forward_shared`` runs that common prefix once, as one sequence, and the rest
of every pair against its keys and values, with positions continuing after it: the same arithmetic for every
token a score depends on, on fewer tokens. Measured through the backend with Qwen3-Reranker-0.6B's shape on 2 CPU
cores in bf16 (16 documents of ~100 and ~200 words, an ~80-token prefix; ``python -m bench.llm --backend-only
100,200``): 1.11x and 1.10-1.26x the pairs/s of whole pairs, scores equal within 1e-5 in float32 (tests). The
cache keeps nothing between layers: a growing one made the same pass 0.85x whole pairs (README, "LLM rerankers on
the CPU").
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.engine.base import EncodedPair

# Shorter common prefixes are not worth a pass of their own.
MIN_SHARED_PREFIX = 16


@dataclass
class ScorerOutput:
    logits: torch.Tensor  # (pairs, 1), float32


def head_row(model: Any, answer_tokens: tuple[int, int | None] | None) -> tuple[torch.Tensor, float]:
    """The one row (and bias) whose product with the last hidden state is the recipe's logit, in float32.

    ``answer_tokens`` (a causal LM): the LM head's row of the first token, minus the second's when given. None (a
    ``*ForSequenceClassification``): its classifier's one row, or with two labels (not relevant, relevant) their
    difference, the log-odds of "relevant"."""
    if answer_tokens is not None:
        head = model.get_output_embeddings()
        positive, negative = answer_tokens
    else:
        head = model.score
        positive, negative = (1, 0) if head.weight.shape[0] == 2 else (0, None)
    weight = head.weight.detach().float()
    bias = head.bias.detach().float() if getattr(head, "bias", None) is not None else None
    row = weight[positive].clone()
    offset = float(bias[positive]) if bias is not None else 0.0
    if negative is not None:
        row -= weight[negative]
        offset -= float(bias[negative]) if bias is not None else 0.0
    return row, offset


def causal_mask(attention_mask: torch.Tensor, *, additive_dtype: torch.dtype | None) -> torch.Tensor:
    """The ``(pairs, 1, tokens, tokens)`` mask of right-padded pairs: query ``i`` sees keys ``j <= i`` that are
    real. Boolean (True = attend) for SDPA, or additive (0 / the dtype's minimum) for eager attention. Every row sees
    its first key, so no row is all masked (a padded row's output is finite, and never read)."""
    tokens = attention_mask.shape[-1]
    positions = torch.arange(tokens, device=attention_mask.device)
    allowed = (positions[None, :] <= positions[:, None])[None, None] & attention_mask[:, None, None, :].bool()
    if additive_dtype is None:
        return allowed
    blocked = torch.zeros(allowed.shape, dtype=additive_dtype, device=allowed.device)
    return blocked.masked_fill(~allowed, torch.finfo(additive_dtype).min)


def common_prefix(pairs: Sequence[EncodedPair]) -> int:
    """How many leading tokens every pair shares, leaving each pair at least one token of its own (its last,
    whose hidden state is the score)."""
    limit = min(len(pair) for pair in pairs) - 1
    if limit <= 0 or len(pairs) < 2:
        return 0
    heads = np.stack([np.asarray(pair.input_ids[:limit]) for pair in pairs])
    differing = np.flatnonzero((heads != heads[0]).any(axis=0))
    return int(differing[0]) if differing.size else limit


class LastTokenScorer(torch.nn.Module):
    """A decoder reranker reduced to ``(input_ids, attention_mask) -> logits (pairs, 1)``: the interface the
    padded path, the CUDA graphs and the readiness check already call for cross-encoders."""

    def __init__(self, model: Any, answer_tokens: tuple[int, int | None] | None) -> None:
        super().__init__()
        config = model.config
        if getattr(config, "final_logit_softcapping", None):
            # tanh(z / cap) per token: the difference of two capped logits is not one row's product.
            raise ValueError("a model that soft-caps its logits cannot be read through one head row")
        self.config = config
        row, bias = head_row(model, answer_tokens)
        self.decoder = model.base_model
        self.head = torch.nn.Linear(row.shape[0], 1, dtype=torch.float32, device=row.device)
        with torch.no_grad():
            self.head.weight.copy_(row.view(1, -1))
            self.head.bias.fill_(bias)

    def _additive_dtype(self) -> torch.dtype | None:
        """None for SDPA (a boolean mask); eager attention adds its mask, in the weights' dtype."""
        if getattr(self.decoder.config, "_attn_implementation", "sdpa") == "sdpa":
            return None
        return self.decoder.get_input_embeddings().weight.dtype  # type: ignore[no-any-return]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> ScorerOutput:
        mask = causal_mask(attention_mask, additive_dtype=self._additive_dtype())
        hidden = self.decoder(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        return self._read(hidden, attention_mask)

    def _read(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> ScorerOutput:
        last = attention_mask.sum(dim=-1) - 1  # right padding: each pair's last real token
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            # float32: a half-precision logit would round z_yes - z_no visibly in the [0, 1] score
            return ScorerOutput(self.head(hidden[rows, last].float()))

    def forward_shared(
        self, prefix_ids: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> ScorerOutput:
        """Logits of pairs ``prefix + input_ids[i]`` (the rest right-padded, ``attention_mask`` over the rest): the
        prefix (``(1, P)``) runs once, its keys and values serve every row."""
        decoder, rows, prefix = self.decoder, input_ids.shape[0], prefix_ids.shape[1]
        keyword = _cache_keyword(decoder)
        cached = decoder(input_ids=prefix_ids, use_cache=True)
        cache = getattr(cached, "cache", None) or cached.past_key_values
        for layer in cache.layers:
            layer.update = prefix_then(layer.keys, layer.values, rows)
        keys = torch.cat([attention_mask.new_ones(rows, prefix), attention_mask], dim=1)
        # Query i (at position P + i) sees every prefix key and the rest's real keys up to itself.
        mask = causal_mask(keys, additive_dtype=self._additive_dtype())[:, :, prefix:, :]
        positions = torch.arange(prefix, prefix + input_ids.shape[1], device=input_ids.device)[None]
        output = decoder(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **{keyword: cache}
        )
        return self._read(output.last_hidden_state, attention_mask)


def prefix_then(keys: torch.Tensor, values: torch.Tensor, rows: int) -> Any:
    """A cache layer's ``update`` that returns the prefix's keys and values (a view over the rows, no copy) followed
    by the rows' own, and keeps nothing: a growing cache would hold every layer's keys for the whole pass (on the
    CPU, ~20 MB a layer for 16 pairs, fresh pages each time), and the next layer never reads them."""
    keys, values = keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1)

    def update(key_states: torch.Tensor, value_states: torch.Tensor, *_: Any, **__: Any) -> Any:
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    return update


def _cache_keyword(decoder: Any) -> str:
    # transformers 5 names the forward's cache argument ``cache`` (``past_key_values`` still warns); 4.x
    # knows only ``past_key_values``.
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
