"""Build a cross-encoder model directory offline: random weights and a tokenizer trained on the spot.

Model hubs are unreachable from the test machines, so the tests, the Docker end-to-end suite and the benchmark
build their own model here and load it through the same loader production uses. Two shapes:

- ``tiny``: a 2-layer XLM-RoBERTa classifier, fast enough for unit and integration tests;
- ``bge-reranker-base``: bge-reranker-base's exact architecture (vocab 250002, hidden 768, 12 layers, 12 heads,
  intermediate 3072, 514 positions, one label). Random weights cost exactly what the real ones cost, so the
  benchmark uses this shape.

Usage: ``python -m tests.model_factory --shape tiny /tmp/tiny-model``
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

# A fixed word list keeps the tokenizer (and so token counts) identical from run to run.
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qui", "dor", "fen", "gal", "hux"]
WORDS = sorted({a + b + c for a in _SYLLABLES for b in _SYLLABLES for c in ("", "n", "s")})[:2000]


def corpus_sentences(count: int, *, seed: int = 0) -> list[str]:
    """Deterministic pseudo-text: every word is in the tokenizer's vocabulary, so one word is one token."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(count)]


def make_words(count: int, *, seed: int) -> str:
    """``count`` in-vocabulary words (about ``count`` tokens with the trained tokenizer)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(count))


def _train_tokenizer(target: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R's order: pad id 1, as the model expects
    tokenizer = Tokenizer(models.WordPiece(unk_token="<unk>", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=4000, special_tokens=specials, min_frequency=1)
    extra = ["The quick brown fox jumps over the lazy dog.", "What's the weather? Is it sunny today?",
             "Hello~ RAGFlower! Hi, there! Ohh, my friend!", "naïve café 東京 🙂 data 12345"]
    tokenizer.train_from_iterator(WORDS + corpus_sentences(3000) + extra * 50, trainer=trainer)
    # XLM-R's pair layout: <s> A </s></s> B </s>
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>",
        pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
        model_max_length=512,
        model_input_names=["input_ids", "attention_mask"],
    )
    wrapped.save_pretrained(target)
    return tokenizer.get_vocab_size()


def build_cross_encoder(target: Path | str, *, shape: str = "tiny", seed: int = 0) -> Path:
    """Write a loadable cross-encoder directory at ``target`` and return its path."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    vocab = _train_tokenizer(target)
    if shape == "tiny":
        dims = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64)
    elif shape == "bge-reranker-base":
        dims = dict(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    config = XLMRobertaConfig(
        **dims, max_position_embeddings=514, type_vocab_size=1, num_labels=1,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = XLMRobertaForSequenceClassification(config)
    if shape == "tiny":
        # Larger random weights spread the logits, so rankings in tests are far from ties.
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() > 1:
                    param.mul_(4.0)
            model.classifier.out_proj.weight.mul_(25.0)
    model.eval()
    model.save_pretrained(target, safe_serialization=True)
    for path in target.iterdir():
        path.chmod(0o644)  # readable by the container's non-root user when mounted read-only
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path)
    parser.add_argument("--shape", choices=["tiny", "bge-reranker-base"], default="tiny")
    args = parser.parse_args()
    print(build_cross_encoder(args.target, shape=args.shape))


if __name__ == "__main__":
    main()
