"""The pair encoder without the weights: what an HTTP worker needs when an engine process holds the model.

The model directory's own loader (``app.engine.model_dir.load_pair_encoder``: the tokenizer as transformers
loads it, checked against the tokenizer's own pair encoding) is used where it exists. Without it, the encoder
is built from ``tokenizer.json`` with the ``tokenizers`` library alone. Either way the engine process compares
its encoding of a probe pair with the worker's when they connect (``EngineClient``), so a worker never sends
pairs the model would read differently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.config import Settings
from app.engine.base import PairEncoder, PairTemplate

# RoBERTa-family models reserve padding_idx + 1 positions (514 positions hold 512 tokens).
OFFSET_POSITION_TYPES = {"roberta", "xlm-roberta", "camembert"}


def load_encoder(settings: Settings) -> PairEncoder:
    try:
        from app.engine.model_dir import load_pair_encoder
    except ImportError:
        return tokenizer_json_encoder(
            settings.model_path, max_length=settings.max_length, max_query_share=settings.max_query_share
        )
    return load_pair_encoder(settings)


def tokenizer_json_encoder(model_path: Path, *, max_length: int, max_query_share: float) -> PairEncoder:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    config: dict[str, Any] = json.loads((model_path / "config.json").read_text())
    positions = int(config.get("max_position_embeddings") or max_length)
    usable = positions - (2 if config.get("model_type") in OFFSET_POSITION_TYPES else 0)

    def tokenize(texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]

    return PairEncoder(
        tokenize,
        post_processor_template(tokenizer),
        max_length=min(max_length, usable),
        max_query_share=max_query_share,
    )


def post_processor_template(tokenizer: Any) -> PairTemplate:
    """Where the tokenizer's post-processor puts the special tokens around a pair of probe texts."""
    first = tokenizer.encode("a", add_special_tokens=False)
    second = tokenizer.encode("b", add_special_tokens=False)
    pair = tokenizer.post_process(first, second, add_special_tokens=True)
    ids, types, sequence_ids = pair.ids, pair.type_ids, pair.sequence_ids
    first_at = [i for i, s in enumerate(sequence_ids) if s == 0]
    second_at = [i for i, s in enumerate(sequence_ids) if s == 1]
    if not first_at or not second_at:
        raise ValueError("the tokenizer's post-processor does not build (query, document) pairs")
    return PairTemplate(
        prefix=tuple(ids[: first_at[0]]),
        middle=tuple(ids[first_at[-1] + 1 : second_at[0]]),
        suffix=tuple(ids[second_at[-1] + 1 :]),
        first_type=types[first_at[0]],
        second_type=types[second_at[0]],
    )
