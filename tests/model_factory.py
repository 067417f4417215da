"""Build cross-encoder model directories offline, laid out the way the published rerankers are.

Model hubs are unreachable from the test machines, so the tests, the Docker end-to-end suite and the benchmark
build their own models here and load them through the production loader. What matters is that each directory
is what a user downloads: per family the published tokenizer class, special tokens, post-processor (the
``TemplateProcessing`` that transformers' converters write into ``tokenizer.json``), tokenizer files
(``sentencepiece.bpe.model`` / ``spm.model`` / ``vocab.txt``), config fields (architecture, label count,
position count, type vocabulary) and safetensors weights. Only the vocabulary is small (trained on the spot)
and the weights random.

Families (``FAMILIES``), named after the model they copy:

- ``bge-reranker-base`` (default), ``bge-reranker-large``, ``bge-reranker-v2-m3``: XLM-RoBERTa, SentencePiece
  Unigram tokenizer, ``<s> A </s></s> B </s>``, no type ids; v2-m3 has 8,194 positions;
- ``ms-marco-MiniLM-L-6-v2``, ``ms-marco-TinyBERT-L-2-v2``: BERT, WordPiece, ``[CLS] A [SEP] B [SEP]`` with type
  ids 0/1;
- ``ms-marco-electra-base``: ELECTRA, WordPiece, type ids;
- ``mxbai-rerank-base-v1``: DeBERTa-v2, SentencePiece (``spm.model``), type ids in the tokenizer, none in the
  model;
- ``gte-reranker-modernbert-base``: ModernBERT, byte-level BPE, ``PreTrainedTokenizerFast``, mean pooling;
- ``generic``: the old home-made layout (a ``PreTrainedTokenizerFast`` with a ``RobertaProcessing``), kept
  only for tests that need exactly that.

Shapes: ``tiny`` (a 2-layer model of the family, for tests) or ``full`` (the published dimensions; random
weights cost exactly what the real ones cost, so the benchmark uses ``bge-reranker-base`` ``full``).
``shape="bge-reranker-base"`` is kept as a name for that.

Usage: ``python -m tests.model_factory --family bge-reranker-base --shape tiny /tmp/tiny-model``
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A fixed word list keeps the tokenizer (and so token counts) identical from run to run.
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qui", "dor", "fen", "gal", "hux"]
WORDS = sorted({a + b + c for a in _SYLLABLES for b in _SYLLABLES for c in ("", "n", "s")})[:2000]
# Real text too, so probes and tests in plain English, with accents, CJK and emoji tokenise into known pieces.
_EXTRA = [
    "The quick brown fox jumps over the lazy dog.",
    "What's the weather? Is it sunny today?",
    "Hello~ RAGFlower! Hi, there! Ohh, my friend!",
    "naïve café 東京 🙂 data 12345",
    "What is a panda? The giant panda is a bear species endemic to China.",
    "which passage mentions the harbour; the harbour was busy, a short one.",
]


def corpus_sentences(count: int, *, seed: int = 0) -> list[str]:
    """Deterministic pseudo-text: every word is in the tokenizer's vocabulary, so one word is one token."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(count)]


def make_words(count: int, *, seed: int) -> str:
    """``count`` in-vocabulary words (about ``count`` tokens with the trained tokenizers)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(count))


def _training_text() -> list[str]:
    return WORDS + corpus_sentences(3000) + _EXTRA * 50


@dataclass(frozen=True)
class Family:
    """What one published reranker's directory holds, apart from the trained vocabulary and random weights."""

    model_type: str  # xlm-roberta, bert, electra, deberta-v2, modernbert
    tokenizer: str  # how its tokenizer is built: xlmr-spm, wordpiece, deberta-spm, bpe, generic
    tokenizer_config: dict[str, Any]
    config: dict[str, Any]  # published config fields (besides the dimensions)
    tiny: dict[str, int]
    full: dict[str, int]
    extra_files: dict[str, Any] = field(default_factory=dict)


_XLMR_TOKENS = {
    "bos_token": "<s>",
    "cls_token": "<s>",
    "eos_token": "</s>",
    "sep_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "mask_token": {
        "__type": "AddedToken",
        "content": "<mask>",
        "lstrip": True,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    },
}
_XLMR_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
# config.json fields every XLM-RoBERTa sequence classifier here shares (the published rerankers and "generic").
_XLMR_CONFIG: dict[str, Any] = dict(
    architectures=["XLMRobertaForSequenceClassification"],
    type_vocab_size=1,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    layer_norm_eps=1e-5,
    num_labels=1,
)
_BERT_TOKENS = {
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "mask_token": "[MASK]",
}
_BERT_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _xlmr(positions: int, max_length: int, full: dict[str, int]) -> Family:
    return Family(
        model_type="xlm-roberta",
        tokenizer="xlmr-spm",
        tokenizer_config={
            **_XLMR_TOKENS,
            "clean_up_tokenization_spaces": True,
            "model_max_length": max_length,
            "sp_model_kwargs": {},
            "tokenizer_class": "XLMRobertaTokenizer",
        },
        config=dict(
            _XLMR_CONFIG,
            max_position_embeddings=positions,
            id2label={0: "LABEL_0"},
            label2id={"LABEL_0": 0},
            position_embedding_type="absolute",
        ),
        tiny=_XLMR_TINY,
        full=dict(vocab_size=250002, **full),
    )


def _bert_like(model_type: str, architecture: str, tokenizer_class: str, full: dict[str, int]) -> Family:
    return Family(
        model_type=model_type,
        tokenizer="wordpiece",
        tokenizer_config={
            **_BERT_TOKENS,
            "do_lower_case": True,
            "model_max_length": 512,
            "strip_accents": None,
            "tokenize_chinese_chars": True,
            "tokenizer_class": tokenizer_class,
            "clean_up_tokenization_spaces": True,
            "do_basic_tokenize": True,
            "never_split": None,
        },
        config=dict(
            architectures=[architecture],
            max_position_embeddings=512,
            type_vocab_size=2,
            pad_token_id=0,
            num_labels=1,
            id2label={0: "LABEL_0"},
            label2id={"LABEL_0": 0},
        ),
        tiny=_BERT_TINY,
        full=dict(vocab_size=30522, **full),
    )


FAMILIES: dict[str, Family] = {
    "bge-reranker-base": _xlmr(
        514, 512, dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    ),
    "bge-reranker-large": _xlmr(
        514, 512, dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    ),
    "bge-reranker-v2-m3": _xlmr(
        8194, 8192, dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    ),
    "ms-marco-MiniLM-L-6-v2": _bert_like(
        "bert",
        "BertForSequenceClassification",
        "BertTokenizer",
        dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    ),
    "ms-marco-TinyBERT-L-2-v2": _bert_like(
        "bert",
        "BertForSequenceClassification",
        "BertTokenizer",
        dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    ),
    "ms-marco-electra-base": _bert_like(
        "electra",
        "ElectraForSequenceClassification",
        "ElectraTokenizer",
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    ),
    "mxbai-rerank-base-v1": Family(
        model_type="deberta-v2",
        tokenizer="deberta-spm",
        tokenizer_config={
            "bos_token": "[CLS]",
            "cls_token": "[CLS]",
            "eos_token": "[SEP]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "mask_token": "[MASK]",
            "do_lower_case": False,
            "split_by_punct": False,
            "model_max_length": 512,
            "sp_model_kwargs": {},
            "vocab_type": "spm",
            "clean_up_tokenization_spaces": True,
            "tokenizer_class": "DebertaV2Tokenizer",
        },
        config=dict(
            architectures=["DebertaV2ForSequenceClassification"],
            max_position_embeddings=512,
            type_vocab_size=0,
            relative_attention=True,
            position_buckets=256,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,
            max_relative_positions=-1,
            layer_norm_eps=1e-7,
            pad_token_id=0,
            num_labels=1,
            id2label={0: "LABEL_0"},
            label2id={"LABEL_0": 0},
        ),
        tiny=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
        full=dict(
            vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
        ),
    ),
    "gte-reranker-modernbert-base": Family(
        model_type="modernbert",
        tokenizer="bpe",
        tokenizer_config={
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "mask_token": "[MASK]",
            "model_max_length": 8192,
            "clean_up_tokenization_spaces": True,
            "model_input_names": ["input_ids", "attention_mask"],
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
        config=dict(
            architectures=["ModernBertForSequenceClassification"],
            max_position_embeddings=8192,
            classifier_pooling="mean",
            global_attn_every_n_layers=3,
            local_attention=128,
            num_labels=1,
            id2label={0: "LABEL_0"},
            label2id={"LABEL_0": 0},
        ),
        tiny=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
        full=dict(
            vocab_size=50368, hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152
        ),
    ),
    "generic": Family(
        model_type="xlm-roberta",
        tokenizer="generic",
        tokenizer_config={},
        config=dict(_XLMR_CONFIG, max_position_embeddings=514),
        tiny=_XLMR_TINY,
        full=dict(
            vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
        ),
    ),
}
DEFAULT_FAMILY = "bge-reranker-base"
HEAD_STD = 0.25  # logit spread of a tiny model over pseudo-text pairs (see _calibrate_head)


# --- tokenizers -------------------------------------------------------------------------------------------------


def _train_sentencepiece(**options: Any) -> Any:
    """A SentencePiece Unigram model trained on the spot (the kind XLM-R and DeBERTa-v2 ship)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    buffer = io.BytesIO()
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_training_text()),
            model_writer=buffer,
            vocab_size=4000,
            model_type="unigram",
            hard_vocab_limit=False,
            character_coverage=1.0,
            normalization_rule_name="nmt_nfkc",
            logstream=quiet,
            **options,
        )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    return proto


def _special(content: str, token_id: int, *, lstrip: bool = False) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": lstrip,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _unigram_tokenizer(proto: Any, vocab: list[tuple[str, float]], *, replacements: tuple[str, ...] = ()) -> Any:
    """What transformers' SentencePiece converters build from a trained model: its Unigram pieces, its
    normalisation rules, Metaspace pre-tokenising (the caller adds the post-processor and special tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence(
        [
            *(normalizers.Replace(old, '"') for old in replacements),
            normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tokenizer


def _xlmr_tokenizer(target: Path) -> int:
    """sentencepiece.bpe.model + the tokenizer.json that transformers' XLM-R converter writes from it."""
    from tokenizers import AddedToken, processors

    proto = _train_sentencepiece()
    (target / "sentencepiece.bpe.model").write_bytes(proto.SerializeToString())
    # fairseq's ids: <s> <pad> </s> <unk>, then the SentencePiece pieces after its own three controls, <mask> last.
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece.piece, piece.score) for piece in proto.pieces[3:]]
    vocab.append(("<mask>", 0.0))
    tokenizer = _unigram_tokenizer(proto, vocab)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in ("<s>", "<pad>", "</s>", "<unk>")]
    )
    tokenizer.add_special_tokens([AddedToken("<mask>", special=True, normalized=False, lstrip=True)])
    tokenizer.save(str(target / "tokenizer.json"))
    return int(tokenizer.get_vocab_size())


def _deberta_tokenizer(target: Path) -> int:
    """spm.model + the tokenizer.json of DeBERTa-v2's converter: [CLS] A [SEP] B [SEP], type ids 0/1."""
    from tokenizers import AddedToken, processors

    specials = {"pad": "[PAD]", "bos": "[CLS]", "eos": "[SEP]", "unk": "[UNK]"}
    proto = _train_sentencepiece(
        **{f"{name}_id": index for index, name in enumerate(specials)},
        **{f"{name}_piece": piece for name, piece in specials.items()},
    )
    (target / "spm.model").write_bytes(proto.SerializeToString())
    vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    mask_id = len(vocab)
    vocab.append(("[MASK]", 0.0))
    tokenizer = _unigram_tokenizer(proto, vocab, replacements=("``", "''"))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 1), ("[SEP]", 2)],
    )
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in (*specials.values(), "[MASK]")]
    )
    tokenizer.save(str(target / "tokenizer.json"))
    (target / "added_tokens.json").write_text(json.dumps({"[MASK]": mask_id}))
    return int(tokenizer.get_vocab_size())


def _wordpiece_tokenizer(target: Path) -> int:
    """vocab.txt + the tokenizer.json of BERT's converter: lower-cased WordPiece, [CLS] A [SEP] B [SEP]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    # The published BERT vocabulary starts [PAD], [unused...], then [UNK] [CLS] [SEP] [MASK]; the order of the
    # specials is all the loader sees, so a short prefix keeps it.
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=4000, special_tokens=specials, min_frequency=1)
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.save(str(target / "tokenizer.json"))
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    (target / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab))
    return tokenizer.get_vocab_size()


def _bpe_tokenizer(target: Path) -> int:
    """ModernBERT's tokenizer: byte-level BPE (OLMo's), specials after the merges, [CLS] A [SEP] B [SEP]."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4000, min_frequency=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[]
    )
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in ("[UNK]", "[CLS]", "[SEP]", "[PAD]")]
    )
    tokenizer.add_special_tokens([AddedToken("[MASK]", special=True, normalized=False, lstrip=True)])
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.save(str(target / "tokenizer.json"))
    return tokenizer.get_vocab_size()


def _generic_tokenizer(target: Path) -> int:
    """The layout the tests used before: a generic PreTrainedTokenizerFast with a RobertaProcessing."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="<unk>", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=4000, special_tokens=specials, min_frequency=1)
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=512,
        model_input_names=["input_ids", "attention_mask"],
    )
    wrapped.save_pretrained(target)
    return tokenizer.get_vocab_size()


_TOKENIZER_BUILDERS = {
    "xlmr-spm": _xlmr_tokenizer,
    "deberta-spm": _deberta_tokenizer,
    "wordpiece": _wordpiece_tokenizer,
    "bpe": _bpe_tokenizer,
    "generic": _generic_tokenizer,
}


def _write_tokenizer_config(target: Path, family: Family) -> None:
    if not family.tokenizer_config:
        return
    config = dict(family.tokenizer_config)
    (target / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    specials = {key: value for key, value in config.items() if key.endswith("_token")}
    (target / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))


# --- the model --------------------------------------------------------------------------------------------------


def _model_config(family: Family, dims: dict[str, int]) -> Any:
    from transformers import AutoConfig

    fields = {key: value for key, value in family.config.items() if key != "architectures"}
    if family.model_type == "modernbert":
        # ModernBERT's specials sit after the BPE merges; its config names their ids.
        fields.update(
            pad_token_id=dims["vocab_size"] - 2,
            cls_token_id=dims["vocab_size"] - 4,
            sep_token_id=dims["vocab_size"] - 3,
            bos_token_id=dims["vocab_size"] - 4,
            eos_token_id=dims["vocab_size"] - 3,
        )
    return AutoConfig.for_model(family.model_type, **dims, **fields)


def _last_linear(model: Any) -> Any:
    import torch

    head = model.classifier
    return head if isinstance(head, torch.nn.Linear) else head.out_proj


def _calibrate_head(model: Any, target: Path, family: str) -> None:
    """Scale the last projection so the logits of pseudo-text pairs centre on 0 with a std of ``HEAD_STD``.

    Random weights leave each family's logits somewhere else: bunched far from 0 or saturated (ModernBERT's
    ~+40), where every score is 0 or 1 and a comparison proves nothing. One affine change of the output layer
    keeps the model a plain checkpoint of its family and every family's scores informative (~0.4-0.6). Not
    more spread: a random encoder barely tells documents apart, so its rounding noise is a fixed few per cent
    of whatever spread the head gives, and the precision tests need it well under their 0.01 bound.
    """
    import torch
    from transformers import AutoTokenizer

    if family == "generic":  # the old fixture, kept exactly as it was
        with torch.no_grad():
            _last_linear(model).weight.mul_(25.0)
        return
    tokenizer = AutoTokenizer.from_pretrained(target)
    queries, documents = corpus_sentences(32, seed=1), corpus_sentences(32, seed=2) + _EXTRA
    batch = tokenizer(
        queries * 2,
        documents[:32] + (documents[32:] * 10)[:32],
        padding=True,
        truncation=True,
        max_length=128,
        return_tensors="pt",
    )
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits[:, 0]
        scale = HEAD_STD / max(float(logits.std()), 1e-6)
        last = _last_linear(model)
        last.weight.mul_(scale)
        if last.bias is not None:
            last.bias.mul_(scale).sub_(float(logits.mean()) * scale)


def build_cross_encoder(
    target: Path | str, *, shape: str = "tiny", family: str = DEFAULT_FAMILY, seed: int = 0
) -> Path:
    """Write a loadable cross-encoder directory of ``family`` at ``target`` and return its path."""
    import torch
    from transformers import AutoModelForSequenceClassification

    if shape == "bge-reranker-base":  # the benchmark's name for the published bge-reranker-base dimensions
        shape, family = "full", "bge-reranker-base"
    spec = FAMILIES[family]
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    vocab = _TOKENIZER_BUILDERS[spec.tokenizer](target)
    _write_tokenizer_config(target, spec)
    if shape == "tiny":
        dims = dict(spec.tiny, vocab_size=vocab)
    elif shape == "full":
        dims = dict(spec.full)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    if spec.model_type == "modernbert":
        dims["vocab_size"] = vocab  # the specials' ids in the config must be the tokenizer's
    config = _model_config(spec, dims)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    if shape == "tiny":
        # Larger random weights spread the logits, so rankings in tests are far from ties.
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() > 1:
                    param.mul_(4.0)
        _calibrate_head(model, target, family)
    model.eval()
    model.save_pretrained(target, safe_serialization=True)
    for path in target.iterdir():
        path.chmod(0o644)  # readable by the container's non-root user when mounted read-only
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("target", type=Path)
    parser.add_argument("--shape", choices=["tiny", "full", "bge-reranker-base"], default="tiny")
    parser.add_argument("--family", choices=sorted(FAMILIES), default=DEFAULT_FAMILY)
    args = parser.parse_args()
    print(build_cross_encoder(args.target, shape=args.shape, family=args.family))


if __name__ == "__main__":
    main()
