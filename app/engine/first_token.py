"""The last encoder layer, computed for the first token only.

A BERT-family cross-encoder scores a pair from the first token's final vector alone (the classifier reads
``hidden[:, 0]``). Every other token's last-layer output is computed and thrown away: in the last layer only
its keys and values matter, because the first token attends to them. So the last layer here projects keys and
values for every token and does everything else (query, attention, output projection, feed-forward, layer
norms) for the first token only. That is the same arithmetic for the one vector that is used, and it skips
10/12 of the last layer's work: about 7 % of a 12-layer model's FLOPs, on the CPU and on a GPU alike.

The first-token path is also where a low-precision error lands directly in the score, and it is one token
long, so under bf16 autocast (float32 weights on the CPU) it runs in float32 at no measurable cost.

``prune_last_layer`` installs it only on models laid out like BERT (``encoder.layer[i].attention.self.query``
…) whose head reads the first token; ``TorchBackend`` then checks on a probe batch that the scores are the
unpruned model's, and puts the original layer back if they are not.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional

# Model types whose sequence-classification head reads only the first token of the last hidden state.
FIRST_TOKEN_HEADS = {"bert", "roberta", "xlm-roberta", "camembert", "electra"}


def layers_return_tuples() -> bool:
    """transformers 4.x encoder layers return ``(hidden_states, ...)``; 5.x return the tensor itself."""
    import transformers

    return int(transformers.__version__.split(".")[0]) < 5


class FirstTokenLastLayer(torch.nn.Module):
    """Wraps a BERT-layout encoder layer; returns the first token's output, shape ``(batch, 1, hidden)`` (in a
    1-tuple where the installed transformers' layers return tuples)."""

    def __init__(self, layer: Any, *, float32_path: bool) -> None:  # transformers' layers are untyped
        super().__init__()
        self.layer = layer
        self.float32_path = float32_path
        self.tuple_output = layers_return_tuples()
        attention = layer.attention.self
        self.heads = int(attention.num_attention_heads)
        self.head_size = int(attention.attention_head_size)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any
    ) -> torch.Tensor | tuple[torch.Tensor]:
        attention: Any = self.layer.attention.self
        # Shapes by splitting the last dimension only: the compiled graph's batch size is symbolic (any size).
        heads = (self.heads, self.head_size)
        # Keys and values of every token: the one part of the layer that needs all of them.
        keys = attention.key(hidden_states).unflatten(-1, heads).transpose(1, 2)
        values = attention.value(hidden_states).unflatten(-1, heads).transpose(1, 2)
        # The first token as a (batch, hidden) matrix: kept two-dimensional, inductor's fusion of a product
        # with the residual add needs no guard on the symbolic batch size (a float32 one does, in 3-D).
        first = hidden_states[:, 0]
        if attention_mask is not None:
            attention_mask = attention_mask[..., :1, :]  # the first query's row of the mask
        if self.float32_path:
            with torch.autocast(first.device.type, enabled=False):
                output = self._first_token(first.float(), keys.float(), values.float(), attention_mask)
        else:
            output = self._first_token(first, keys, values, attention_mask)
        return (output.unsqueeze(1),) if self.tuple_output else output.unsqueeze(1)

    def _first_token(
        self, first: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        layer: Any = self.layer
        query = layer.attention.self.query(first).unflatten(-1, (self.heads, self.head_size)).unsqueeze(2)
        # Boolean (True = attend) or additive float masks, as the model built them: SDPA takes both.
        context = functional.scaled_dot_product_attention(query, keys, values, attn_mask=attention_mask)
        context = context.flatten(1)  # (batch, heads, 1, head size) -> (batch, hidden)
        attended = layer.attention.output(context, first)  # dense, dropout, LayerNorm(+ residual)
        return layer.output(layer.intermediate(attended), attended)  # type: ignore[no-any-return]


def prune_last_layer(model: Any, *, float32_path: bool) -> torch.nn.Module | None:
    """Swap the last encoder layer for its first-token version; returns the original layer, or None if the
    model is not laid out for it (then nothing is changed)."""
    if getattr(model.config, "model_type", None) not in FIRST_TOKEN_HEADS:
        return None
    base = getattr(model, "base_model", None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        return None
    last: Any = layers[-1]
    if isinstance(last, FirstTokenLastLayer):
        return None
    try:
        attention = last.attention
        parts = (
            attention.self.query,
            attention.self.key,
            attention.self.value,
            attention.output,
            last.intermediate,
            last.output,
        )
    except AttributeError:
        return None
    if not all(isinstance(part, torch.nn.Module) for part in parts):
        return None
    original: torch.nn.Module = last
    layers[-1] = FirstTokenLastLayer(original, float32_path=float32_path)
    return original


def restore_last_layer(model: Any, original: torch.nn.Module) -> None:
    model.base_model.encoder.layer[-1] = original
