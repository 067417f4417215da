"""Build LLM reranker directories offline, laid out the way the published ones are on the Hugging Face Hub.

Like ``tests/model_factory.py`` for cross-encoders: model hubs are unreachable from the test machines, so the tests
and the benchmark build their own LLM rerankers here. Each directory holds what a user downloads: the published
``config.json`` fields (architecture, special-token ids, rope, tying, dtype), ``generation_config.json``, the
tokenizer files the authors ship (``tokenizer.json`` built the way transformers' converters build it, plus
``vocab.json``/``merges.txt`` or ``tokenizer.model``), ``tokenizer_config.json`` (class, special tokens,
``added_tokens_decoder``, chat template), ``special_tokens_map.json`` where the repository has one, and the model
card's front matter. Only the vocabulary is small (trained on the spot) and the weights random.

Families (``LLM_FAMILIES``):

- ``qwen3-reranker``: ``Qwen/Qwen3-Reranker-0.6B`` (``Qwen3ForCausalLM``, tied embeddings, bf16). Its Qwen2
  tokenizer: NFC, Qwen's split regex then byte-level, byte-level BPE; the 26 added tokens (``<|endoftext|>`` ...
  ``</think>``) right after the BPE vocabulary in the published order; pad ``<|endoftext|>``, eos ``<|im_end|>``,
  no bos, and no special token added by ``tokenizer("x")``. The score is ``z_yes - z_no`` at the last position.
  The published repository has no ``special_tokens_map.json`` (checked against the ModelScope copy), so none is
  written.
- ``qwen3-reranker-seq-cls``: the converted form (``tomaarsen/Qwen3-Reranker-0.6B-seq-cls``, or vLLM's
  ``examples/pooling/score/convert_model_to_seq_cls.py --method from_2_way_softmax``):
  ``Qwen3ForSequenceClassification`` with one label and ``score.weight = lm_head[yes] - lm_head[no]`` of a
  ``qwen3-reranker`` built with the same seed, ``pad_token_id`` and ``use_pad_token`` as that converter sets them,
  saved in float32 (the converter loads the causal model in transformers' default dtype), same tokenizer files.
- ``qwen3-chat``: ``Qwen/Qwen3-0.6B``, a plain chat LLM (same architecture and tokenizer; ``pipeline_tag:
  text-generation``; no reranker anywhere), for proving that such a model is refused.
- ``bge-reranker-v2-gemma``: ``BAAI/bge-reranker-v2-gemma`` (``GemmaForCausalLM`` on gemma-2b, float32). Gemma's
  tokenizer: a SentencePiece BPE with byte fallback (``tokenizer.model``) and the ``tokenizer.json`` that
  transformers 4.38's Gemma converter wrote from it (``▁`` for spaces, no pre-tokenizer, ``<bos> $A``
  post-processor); ``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3, ``add_bos_token`` true. Its tokenizer_config
  names no ``padding_side`` (gemma-2b's file, 1,108 bytes as published), so callers that read ``logits[:, -1]``
  must pad on the left themselves. The score is the raw ``Yes`` logit at the last position.
- ``mxbai-rerank-base-v2``: ``mixedbread-ai/mxbai-rerank-base-v2`` (``Qwen2ForCausalLM``). Its config.json and card
  were not at hand: the config's fields are those of its base model, Qwen2.5-0.5B (hidden 896, 24 layers, 14 heads,
  2 kv heads, tied embeddings), its tokenizer Qwen's (as above; Qwen3's added tokens, a superset of Qwen2.5's), and
  no README is written: tests name the directory as the hub does. The score is ``z("1") - z("0")`` at the last
  position, with mixedbread's prompt around the pair (``mxbai_rerank/mxbai_rerank_v2.py``).

Shapes: ``tiny`` (2 layers, hidden 64, 4 heads, 2 kv heads, head_dim 16, intermediate 128; the vocabulary is the
trained tokenizer's) or ``full`` (the published dimensions, random weights in the published dtype, for
benchmarks). In ``full`` the Qwen tokenizers are padded with unreachable filler entries up to id 151643, so the
added tokens sit at their published ids (``<|endoftext|>`` = 151643 ... ``</think>`` = 151668) and the config's
``bos_token_id``/``eos_token_id`` are the published ones; ``vocab_size`` is the published 151669 (151936 for
Qwen3-0.6B). In ``tiny`` the added tokens follow the trained vocabulary and the config's ids are theirs.

The tiny models' answers are made informative: after random initialisation the (tied) embedding rows of the answer
tokens (``yes``/``no`` for Qwen, ``Yes`` for Gemma) are set so that the score over varied reranker prompts has a
spread of about ``SCORE_STD`` around 0, neither constant nor saturated.

Usage: ``python -m tests.llm_factory --family qwen3-reranker --shape tiny /tmp/qwen3-reranker``
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.llm_reference import GEMMA_DEFAULT_PROMPT, QWEN3_DEFAULT_INSTRUCTION, QWEN3_PREFIX, QWEN3_SUFFIX
from tests.model_factory import _training_text, make_words

SCORE_STD = 1.5  # spread of a tiny model's score (z_yes - z_no, or z_Yes) over varied reranker prompts


def qwen3_format(query: str, doc: str, instruction: str | None = None) -> str:
    """The Qwen3-Reranker model card's ``format_instruction``."""
    if instruction is None:
        instruction = QWEN3_DEFAULT_INSTRUCTION
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"


# --- what each published repository holds ---------------------------------------------------------------------

# Qwen/Qwen3-Reranker-0.6B config.json (Qwen3-0.6B's is the same but for transformers_version and vocab_size).
_QWEN3_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "model_type": "qwen3",
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.3",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151669,
}
_QWEN3_GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
    "transformers_version": "4.51.3",
}
# The added tokens of the Qwen2 tokenizer (Qwen3 release), in their published order (ids 151643...), and whether
# each is marked special.
_QWEN_ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]
QWEN_FIRST_ADDED_ID = 151643  # <|endoftext|> in the published vocabulary
# transformers' Qwen2Tokenizer PRETOKENIZE_REGEX, as in the published tokenizer.json's Split pre-tokenizer.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen/Qwen3-Reranker-0.6B's chat_template (Qwen3's), verbatim.
_QWEN3_CHAT_TEMPLATE = "\n".join(
    [
        "{%- if tools %}",
        "    {{- '<|im_start|>system\\n' }}",
        "    {%- if messages[0].role == 'system' %}",
        "        {{- messages[0].content + '\\n\\n' }}",
        "    {%- endif %}",
        (
            '    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user q'
            "uery.\\n\\nYou are provided with function signatures within <tools></tools> XML ta"
            'gs:\\n<tools>" }}'
        ),
        "    {%- for tool in tools %}",
        '        {{- "\\n" }}',
        "        {{- tool | tojson }}",
        "    {%- endfor %}",
        (
            '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with functio'
            'n name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"n'
            'ame\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end'
            '|>\\n" }}'
        ),
        "{%- else %}",
        "    {%- if messages[0].role == 'system' %}",
        "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}",
        "    {%- endif %}",
        "{%- endif %}",
        "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}",
        "{%- for message in messages[::-1] %}",
        "    {%- set index = (messages|length - 1) - loop.index0 %}",
        (
            '    {%- if ns.multi_step_tool and message.role == "user" and not(message.content'
            ".startswith('<tool_response>') and message.content.endswith('</tool_response>'))"
            " %}"
        ),
        "        {%- set ns.multi_step_tool = false %}",
        "        {%- set ns.last_query_index = index %}",
        "    {%- endif %}",
        "{%- endfor %}",
        "{%- for message in messages %}",
        '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}',
        "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
        '    {%- elif message.role == "assistant" %}',
        "        {%- set content = message.content %}",
        "        {%- set reasoning_content = '' %}",
        "        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}",
        "            {%- set reasoning_content = message.reasoning_content %}",
        "        {%- else %}",
        "            {%- if '</think>' in message.content %}",
        "                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}",
        (
            "                {%- set reasoning_content = message.content.split('</think>')[0]"
            ".rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
        ),
        "            {%- endif %}",
        "        {%- endif %}",
        "        {%- if loop.index0 > ns.last_query_index %}",
        "            {%- if loop.last or (not loop.last and reasoning_content) %}",
        (
            "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_co"
            "ntent.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
        ),
        "            {%- else %}",
        "                {{- '<|im_start|>' + message.role + '\\n' + content }}",
        "            {%- endif %}",
        "        {%- else %}",
        "            {{- '<|im_start|>' + message.role + '\\n' + content }}",
        "        {%- endif %}",
        "        {%- if message.tool_calls %}",
        "            {%- for tool_call in message.tool_calls %}",
        "                {%- if (loop.first and content) or (not loop.first) %}",
        "                    {{- '\\n' }}",
        "                {%- endif %}",
        "                {%- if tool_call.function %}",
        "                    {%- set tool_call = tool_call.function %}",
        "                {%- endif %}",
        '                {{- \'<tool_call>\\n{"name": "\' }}',
        "                {{- tool_call.name }}",
        '                {{- \'", "arguments": \' }}',
        "                {%- if tool_call.arguments is string %}",
        "                    {{- tool_call.arguments }}",
        "                {%- else %}",
        "                    {{- tool_call.arguments | tojson }}",
        "                {%- endif %}",
        "                {{- '}\\n</tool_call>' }}",
        "            {%- endfor %}",
        "        {%- endif %}",
        "        {{- '<|im_end|>\\n' }}",
        '    {%- elif message.role == "tool" %}',
        '        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}',
        "            {{- '<|im_start|>user' }}",
        "        {%- endif %}",
        "        {{- '\\n<tool_response>\\n' }}",
        "        {{- message.content }}",
        "        {{- '\\n</tool_response>' }}",
        '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}',
        "            {{- '<|im_end|>\\n' }}",
        "        {%- endif %}",
        "    {%- endif %}",
        "{%- endfor %}",
        "{%- if add_generation_prompt %}",
        "    {{- '<|im_start|>assistant\\n' }}",
        "    {%- if enable_thinking is defined and enable_thinking is false %}",
        "        {{- '<think>\\n\\n</think>\\n\\n' }}",
        "    {%- endif %}",
        "{%- endif %}",
    ]
)

_QWEN3_RERANKER_README = """---
license: apache-2.0
base_model:
- Qwen/Qwen3-0.6B-Base
library_name: transformers
pipeline_tag: text-ranking
---
# Qwen3-Reranker-0.6B

**Qwen3-Reranker-0.6B** has the following features:

- Model Type: Text Reranking
- Supported Languages: 100+ Languages
- Number of Paramaters: 0.6B
- Context Length: 32k

(Offline test copy: same layout as the published repository, a small trained vocabulary and random weights.)
"""
_QWEN3_SEQ_CLS_README = """---
license: apache-2.0
base_model:
- Qwen/Qwen3-Reranker-0.6B
tags:
- transformers
- sentence-transformers
- text-embeddings-inference
pipeline_tag: text-ranking
---
# Qwen3-Reranker-0.6B-seq-cls

This is a copy of the Qwen3-Reranker-0.6B model, part of the Qwen3 Reranker series, modified as a sequence
classification model instead: its single logit is `lm_head[yes] - lm_head[no]` applied to the last token, which
is the log-odds the original model card computes.

(Offline test copy: same layout as the published repository, a small trained vocabulary and random weights.)
"""
_QWEN3_CHAT_README = """---
library_name: transformers
license: apache-2.0
license_link: https://huggingface.co/Qwen/Qwen3-0.6B/blob/main/LICENSE
pipeline_tag: text-generation
base_model:
- Qwen/Qwen3-0.6B-Base
---

# Qwen3-0.6B

Qwen3 is the latest generation of large language models in Qwen series, offering a comprehensive suite of dense
and mixture-of-experts (MoE) models.

(Offline test copy: same layout as the published repository, a small trained vocabulary and random weights.)
"""
_GEMMA_README = """---
license: apache-2.0
pipeline_tag: text-classification
tags:
- transformers
- sentence-transformers
language:
- multilingual
---

# Reranker

**More details please refer to our Github: [FlagEmbedding](https://github.com/FlagOpen/FlagEmbedding/tree/master).**

- [Model List](#model-list)
- [Usage](#usage)

Different from embedding model, reranker uses question and document as input and directly output similarity
instead of embedding. You can get a relevance score by inputting query and passage to the reranker. And the score
can be mapped to a float value in [0,1] by sigmoid function.

BAAI/bge-reranker-v2-gemma is an LLM-based reranker on gemma-2b: multilingual, performs well in both English
proficiency and multilingual capabilities.

(Offline test copy: same layout as the published repository, a small trained vocabulary and random weights.)
"""

# BAAI/bge-reranker-v2-gemma config.json (659 bytes as published) and generation_config.json (132 bytes).
_GEMMA_CONFIG: dict[str, Any] = {
    "_name_or_path": "google/gemma-2b",
    "architectures": ["GemmaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "head_dim": 256,
    "hidden_act": "gelu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 16384,
    "max_position_embeddings": 8192,
    "model_type": "gemma",
    "num_attention_heads": 8,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "torch_dtype": "float32",
    "transformers_version": "4.38.2",
    "use_cache": True,
    "vocab_size": 256000,
}
_GEMMA_GENERATION_CONFIG: dict[str, Any] = {
    "_from_model_config": True,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "transformers_version": "4.38.2",
}
_GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3


@dataclass(frozen=True)
class LLMFamily:
    """What one published LLM reranker's directory holds, apart from the trained vocabulary and random weights."""

    tokenizer: str  # qwen2 or gemma
    config: dict[str, Any]
    generation_config: dict[str, Any]
    readme: str
    answer_tokens: tuple[str, ...]  # the tokens whose logits make the score: (yes, no) or (Yes,)
    tiny: dict[str, int]
    full: dict[str, int]
    seq_cls: bool = False
    prompt: str = ""  # whose prompt the calibration builds: qwen3 (default for qwen2 tokenizers), gemma, mxbai


_LLM_TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
)
_QWEN3_FULL = dict(
    hidden_size=1024,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=3072,
    vocab_size=151669,
)

LLM_FAMILIES: dict[str, LLMFamily] = {
    "qwen3-reranker": LLMFamily(
        tokenizer="qwen2",
        config=_QWEN3_CONFIG,
        generation_config=_QWEN3_GENERATION_CONFIG,
        readme=_QWEN3_RERANKER_README,
        answer_tokens=("yes", "no"),
        tiny=_LLM_TINY,
        full=_QWEN3_FULL,
    ),
    "qwen3-reranker-seq-cls": LLMFamily(
        tokenizer="qwen2",
        config=_QWEN3_CONFIG,
        generation_config=_QWEN3_GENERATION_CONFIG,
        readme=_QWEN3_SEQ_CLS_README,
        answer_tokens=("yes", "no"),
        tiny=_LLM_TINY,
        full=_QWEN3_FULL,
        seq_cls=True,
    ),
    "qwen3-chat": LLMFamily(
        tokenizer="qwen2",
        config=dict(_QWEN3_CONFIG, transformers_version="4.51.0", vocab_size=151936),
        generation_config=dict(_QWEN3_GENERATION_CONFIG, transformers_version="4.51.0"),
        readme=_QWEN3_CHAT_README,
        answer_tokens=(),
        tiny=_LLM_TINY,
        full=dict(_QWEN3_FULL, vocab_size=151936),
    ),
    "bge-reranker-v2-gemma": LLMFamily(
        tokenizer="gemma",
        config=_GEMMA_CONFIG,
        generation_config=_GEMMA_GENERATION_CONFIG,
        readme=_GEMMA_README,
        answer_tokens=("Yes",),
        tiny=_LLM_TINY,
        full=dict(
            hidden_size=2048,
            num_hidden_layers=18,
            num_attention_heads=8,
            num_key_value_heads=1,
            head_dim=256,
            intermediate_size=16384,
            vocab_size=256000,
        ),
    ),
}


# --- tokenizers -------------------------------------------------------------------------------------------------


_MXBAI_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
MXBAI_PREFIX = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n"
)
MXBAI_TASK = (
    "You are a search relevance expert who evaluates how well documents match search queries. For each "
    "query-document pair, carefully analyze the semantic relationship between them, then provide your binary "
    "relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:"
)
MXBAI_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
LLM_FAMILIES["mxbai-rerank-base-v2"] = LLMFamily(
    tokenizer="qwen2",
    config=_MXBAI_CONFIG,
    generation_config={"bos_token_id": 151643, "eos_token_id": 151643, "max_new_tokens": 2048},
    readme="",
    answer_tokens=("1", "0"),
    tiny=_LLM_TINY,
    full=dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
    ),
    prompt="mxbai",
)


def _reranker_text(seed: int = 7) -> list[str]:
    """Text the prompts are made of, with the answers on their own lines, so the BPE learns ``yes``/``no``/``Yes``
    as whole tokens (the model cards look them up by ``convert_tokens_to_ids("yes")`` / ``tokenizer('Yes')``)."""
    rng = random.Random(seed)
    lines = []
    for index in range(400):
        query, doc = make_words(rng.randint(2, 8), seed=index), make_words(rng.randint(5, 30), seed=10_000 + index)
        lines.append(QWEN3_PREFIX + qwen3_format(query, doc) + QWEN3_SUFFIX + rng.choice(["yes", "no"]))
        lines.append(f"A: {query}\nB: {doc}\n{GEMMA_DEFAULT_PROMPT}\n" + rng.choice(["Yes", "No"]))
    answers = ["yes", "no", "Yes", "No", "yes\nno", "no\nyes", "Yes\nNo", "\nyes", "\nno", "\nYes", "\nNo"]
    return lines + answers * 300


def _qwen_training_text() -> list[str]:
    return _training_text() + _reranker_text()


def _qwen2_tokenizer(target: Path, *, published_ids: bool) -> dict[str, int]:
    """tokenizer.json, vocab.json and merges.txt as the Qwen2 tokenizer ships: NFC, Qwen's regex split then
    byte-level pre-tokenizing, a byte-level BPE, ByteLevel post-processor and decoder, the added tokens after the
    vocabulary. Returns the added tokens' ids."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    def pipeline(model: Any) -> Any:
        tokenizer = Tokenizer(model)
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )
        tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        return tokenizer

    trainer = trainers.BpeTrainer(
        vocab_size=4000,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    trained = pipeline(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    trained.train_from_iterator(_qwen_training_text(), trainer=trainer)
    state = json.loads(trained.to_str())["model"]
    vocab: dict[str, int] = dict(state["vocab"])
    merges = [tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge) for merge in state["merges"]]
    for answer in ("yes", "no"):
        assert answer in vocab, f"the trained Qwen vocabulary lacks {answer!r}"
    if published_ids:
        # Entries no merge produces, so the added tokens get their published ids (151643...).
        for index in range(len(vocab), QWEN_FIRST_ADDED_ID):
            vocab[f"<|reserved_filler_{index}|>"] = index
    tokenizer = pipeline(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    ids = {}
    for content, special in _QWEN_ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
        ids[content] = tokenizer.token_to_id(content)
    assert list(ids.values()) == list(range(len(vocab), len(vocab) + len(ids)))
    tokenizer.save(str(target / "tokenizer.json"))
    tokenizer.model.save(str(target))  # vocab.json + merges.txt ("#version: 0.2" header)
    return ids


def _qwen2_tokenizer_config(ids: dict[str, int]) -> dict[str, Any]:
    """Qwen/Qwen3-Reranker-0.6B's tokenizer_config.json, keys in the published order."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(ids[content]): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for content, special in _QWEN_ADDED_TOKENS
        },
        "additional_special_tokens": [content for content, special in _QWEN_ADDED_TOKENS[1:14]],
        "bos_token": None,
        "chat_template": _QWEN3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "extra_special_tokens": {},
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _gemma_tokenizer(target: Path) -> int:
    """tokenizer.model (a SentencePiece BPE with byte fallback, trained as Gemma's: no dummy prefix, whitespace
    kept, digits split) and the tokenizer.json transformers 4.38's GemmaConverter wrote from it."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers.tokenization_utils_base import generate_merges

    buffer = io.BytesIO()
    text = _training_text() + _reranker_text()
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(text),
            model_writer=buffer,
            vocab_size=4000,
            model_type="bpe",
            byte_fallback=True,
            split_digits=True,
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            normalization_rule_name="identity",
            character_coverage=1.0,
            max_sentence_length=100_000,
            hard_vocab_limit=False,
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            pad_piece="<pad>",
            eos_piece="<eos>",
            bos_piece="<bos>",
            unk_piece="<unk>",
            user_defined_symbols=["<mask>"],  # id 4, as in Gemma's vocabulary (transformers 5 adds it otherwise)
            logstream=quiet,
        )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    (target / "tokenizer.model").write_bytes(proto.SerializeToString())

    pieces = [(piece.piece, piece.score) for piece in proto.pieces]
    assert [piece for piece, _ in pieces[:5]] == [*_GEMMA_SPECIALS, "<mask>"]
    vocab = {piece: index for index, (piece, _) in enumerate(pieces)}
    merges = generate_merges(vocab, {piece: score for piece, score in pieces})
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True, dropout=None)
    )
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", 2)]
    )
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in _GEMMA_SPECIALS])
    tokenizer.save(str(target / "tokenizer.json"))
    assert tokenizer.encode("Yes", add_special_tokens=False).ids == [vocab["Yes"]], "'Yes' is not one token"
    return tokenizer.get_vocab_size()


def _special(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _gemma_tokenizer_config() -> dict[str, Any]:
    """BAAI/bge-reranker-v2-gemma's tokenizer_config.json (gemma-2b's, 1,108 bytes as published)."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(index): dict(_special(token), special=True) for index, token in enumerate(_GEMMA_SPECIALS)
        },
        "bos_token": "<bos>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "legacy": None,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def _gemma_special_tokens_map() -> dict[str, Any]:
    """BAAI/bge-reranker-v2-gemma's special_tokens_map.json (555 bytes as published)."""
    return {f"{name}_token": _special(f"<{name}>") for name in ("bos", "eos", "pad", "unk")}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _write_tokenizer(target: Path, spec: LLMFamily, *, published_ids: bool) -> tuple[int, dict[str, int]]:
    """Write the family's tokenizer files; return the tokenizer's size and the config's special-token ids."""
    if spec.tokenizer == "qwen2":
        ids = _qwen2_tokenizer(target, published_ids=published_ids)
        _write_json(target / "tokenizer_config.json", _qwen2_tokenizer_config(ids))
        size = max(ids.values()) + 1
        return size, {
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        }
    size = _gemma_tokenizer(target)
    _write_json(target / "tokenizer_config.json", _gemma_tokenizer_config())
    _write_json(target / "special_tokens_map.json", _gemma_special_tokens_map())
    return size, {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}


# --- the model --------------------------------------------------------------------------------------------------


def _config_dict(spec: LLMFamily, dims: dict[str, int], ids: dict[str, int]) -> dict[str, Any]:
    """The published config.json with the shape's dimensions and the tokenizer's special-token ids."""
    config = dict(spec.config)
    for key, value in dims.items():
        config[key] = value
    if "max_window_layers" in config:
        config["max_window_layers"] = dims["num_hidden_layers"]
    config["bos_token_id"], config["eos_token_id"] = ids["bos_token_id"], ids["eos_token_id"]
    if "pad_token_id" in config:
        config["pad_token_id"] = ids["pad_token_id"]
    return config


def _generation_config_dict(spec: LLMFamily, ids: dict[str, int]) -> dict[str, Any]:
    config = dict(spec.generation_config)
    config["bos_token_id"] = ids["bos_token_id"]
    config["pad_token_id"] = ids["pad_token_id"]
    if isinstance(config["eos_token_id"], list):  # Qwen: [<|im_end|>, <|endoftext|>]
        config["eos_token_id"] = [ids["eos_token_id"], ids["bos_token_id"]]
    else:
        config["eos_token_id"] = ids["eos_token_id"]
    return config


def _calibration_prompts(tokenizer: Any, spec: LLMFamily) -> list[list[int]]:
    """Varied reranker prompts of the family, as the model cards build them (pseudo-text queries and documents)."""
    rng = random.Random(1234)
    instructions = [None, "Given a question, retrieve passages that answer it", "Judge relevance to the query"]
    prompts = []
    for index in range(48):
        query = make_words(rng.randint(1, 8), seed=50_000 + index)
        doc = make_words(rng.randint(3, 60), seed=60_000 + index)
        if spec.prompt == "mxbai":
            text = f"{MXBAI_PREFIX}query: {query}\ndocument: {doc}\n{MXBAI_TASK}{MXBAI_SUFFIX}"
            prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        elif spec.tokenizer == "qwen2":
            text = QWEN3_PREFIX + qwen3_format(query, doc, instructions[index % 3]) + QWEN3_SUFFIX
            prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            text = f"A: {query}\nB: {doc}\n{GEMMA_DEFAULT_PROMPT}"
            prompts.append([tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def _last_hidden(model: Any, prompts: list[list[int]]) -> Any:
    import torch

    with torch.no_grad():
        return torch.cat([model.model(input_ids=torch.tensor([ids])).last_hidden_state[:, -1] for ids in prompts])


def _calibrate_answers(model: Any, target: Path, spec: LLMFamily) -> None:
    """Set the (tied) embedding rows of the answer tokens so the score spreads over varied prompts.

    The score is ``h . w`` with ``h`` the last position's final hidden state and ``w`` = ``e_yes - e_no`` (Qwen) or
    ``e_Yes`` (Gemma). ``w`` is put along the direction in which ``h`` varies most across prompts, made orthogonal
    to the mean ``h`` (so the scores centre on 0) and scaled to a spread of ``SCORE_STD``. Qwen keeps the pair's
    midpoint. The answer tokens also appear in the prompts, so this is repeated until it settles; rows are rounded
    to the checkpoint's dtype at every step, so the saved model scores exactly as measured.
    """
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    answer_ids = [tokenizer.convert_tokens_to_ids(token) for token in spec.answer_tokens]
    prompts = _calibration_prompts(tokenizer, spec)
    embedding = model.get_input_embeddings().weight
    dtype = torch.bfloat16 if spec.config["torch_dtype"] == "bfloat16" else torch.float32
    with torch.no_grad():
        for _ in range(6):
            hidden = _last_hidden(model, prompts)
            mean = hidden.mean(0)
            centred = hidden - mean
            direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
            unit_mean = mean / mean.norm()
            direction = direction - (direction @ unit_mean) * unit_mean
            direction = direction * (SCORE_STD / float((hidden @ direction).std()))
            if len(answer_ids) == 2:
                middle = (embedding[answer_ids[0]] + embedding[answer_ids[1]]) / 2
                embedding[answer_ids[0]] = (middle + direction / 2).to(dtype).float()
                embedding[answer_ids[1]] = (middle - direction / 2).to(dtype).float()
            else:
                embedding[answer_ids[0]] = direction.to(dtype).float()
        scores = _scores(model, prompts, answer_ids)
    spread, centre = float(scores.std()), float(scores.mean())
    assert 0.5 * SCORE_STD < spread < 2 * SCORE_STD and abs(centre) < spread, (spread, centre)


def _scores(model: Any, prompts: list[list[int]], answer_ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        logits = torch.cat([model(input_ids=torch.tensor([ids])).logits[:, -1] for ids in prompts])
    return logits[:, answer_ids[0]] - logits[:, answer_ids[1]] if len(answer_ids) == 2 else logits[:, answer_ids[0]]


def _finish(target: Path) -> Path:
    for path in target.iterdir():
        path.chmod(0o644)  # readable by the container's non-root user when mounted read-only
    return target


def _build_causal(target: Path, spec: LLMFamily, shape: str, seed: int) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in ("tiny", "full"):
        raise ValueError(f"unknown shape {shape!r}")
    target.mkdir(parents=True, exist_ok=True)
    size, ids = _write_tokenizer(target, spec, published_ids=shape == "full")
    dims = dict(spec.tiny, vocab_size=size) if shape == "tiny" else dict(spec.full)
    config_dict = _config_dict(spec, dims, ids)
    config = AutoConfig.for_model(**{key: value for key, value in config_dict.items() if key != "_name_or_path"})
    dtype = torch.bfloat16 if spec.config["torch_dtype"] == "bfloat16" else torch.float32
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    if shape == "tiny":
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(dtype).float())  # the checkpoint's precision, so what is measured is saved
        if spec.answer_tokens:
            _calibrate_answers(model, target, spec)
    # A copy is cast for saving: casting in place would round the rotary buffers too, and the tiny model's
    # reload check compares against this one.
    (copy.deepcopy(model) if shape == "tiny" else model).to(dtype).save_pretrained(target, safe_serialization=True)
    _write_json(target / "config.json", config_dict)  # the published keys (save_pretrained writes v5 names)
    _write_json(target / "generation_config.json", _generation_config_dict(spec, ids))
    if spec.readme:
        (target / "README.md").write_text(spec.readme)
    if shape == "tiny" and spec.answer_tokens:
        _check_reload(model, target, spec)
    return _finish(target)


def _check_reload(model: Any, target: Path, spec: LLMFamily) -> None:
    """The saved directory scores as the model in memory did."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    answer_ids = [tokenizer.convert_tokens_to_ids(token) for token in spec.answer_tokens]
    prompts = _calibration_prompts(tokenizer, spec)[:8]
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    expected = _scores(model.float(), prompts, answer_ids)
    torch.testing.assert_close(_scores(reloaded, prompts, answer_ids), expected, atol=1e-5, rtol=0)


def _convert_to_seq_cls(causal: Path, target: Path) -> Path:
    """vLLM's convert_model_to_seq_cls.py, method from_2_way_softmax with tokens ["no", "yes"]: one label,
    ``score.weight = lm_head[yes] - lm_head[no]`` in float32, ``use_pad_token`` false, the tokenizer's pad id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    target.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(causal)
    causal_lm = AutoModelForCausalLM.from_pretrained(causal, dtype=torch.float32)
    seq_cls_model = AutoModelForSequenceClassification.from_pretrained(
        causal, num_labels=1, ignore_mismatched_sizes=True, dtype=torch.float32
    )
    lm_head_weights = causal_lm.lm_head.weight
    false_id = tokenizer.convert_tokens_to_ids("no")
    true_id = tokenizer.convert_tokens_to_ids("yes")
    score_weight = lm_head_weights[true_id].to(torch.float32) - lm_head_weights[false_id].to(torch.float32)
    with torch.no_grad():
        seq_cls_model.score.weight.copy_(score_weight.unsqueeze(0))
        if seq_cls_model.score.bias is not None:
            seq_cls_model.score.bias.zero_()
    seq_cls_model.save_pretrained(target, safe_serialization=True)
    config = json.loads((causal / "config.json").read_text())
    config.update(
        architectures=["Qwen3ForSequenceClassification"],
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        use_pad_token=False,
    )
    _write_json(target / "config.json", dict(sorted(config.items())))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json"):
        shutil.copyfile(causal / name, target / name)
    (target / "README.md").write_text(LLM_FAMILIES["qwen3-reranker-seq-cls"].readme)
    return _finish(target)


def build_llm_reranker(target: Path | str, *, family: str, shape: str = "tiny", seed: int = 0) -> Path:
    """Write a loadable LLM (reranker) directory of ``family`` at ``target`` and return its path."""
    spec = LLM_FAMILIES[family]
    target = Path(target)
    if not spec.seq_cls:
        return _build_causal(target, spec, shape, seed)
    with tempfile.TemporaryDirectory() as scratch:
        causal = _build_causal(Path(scratch) / "Qwen3-Reranker-0.6B", LLM_FAMILIES["qwen3-reranker"], shape, seed)
        return _convert_to_seq_cls(causal, target)


def build_qwen3_pair(root: Path | str, *, seed: int = 0) -> tuple[Path, Path]:
    """A tiny ``qwen3-reranker`` and its seq-cls conversion: (causal dir, seq-cls dir) under ``root``."""
    root = Path(root)
    causal = build_llm_reranker(root / "Qwen3-Reranker-0.6B", family="qwen3-reranker", seed=seed)
    return causal, _convert_to_seq_cls(causal, root / "Qwen3-Reranker-0.6B-seq-cls")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("target", type=Path)
    parser.add_argument("--family", choices=sorted(LLM_FAMILIES), default="qwen3-reranker")
    parser.add_argument("--shape", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_llm_reranker(args.target, family=args.family, shape=args.shape, seed=args.seed))


if __name__ == "__main__":
    main()
