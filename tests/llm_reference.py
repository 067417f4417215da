"""Reference scorers for the LLM rerankers, copying the model authors' own published code as closely as possible.

- Qwen3-Reranker: the transformers code of the model card, https://huggingface.co/Qwen/Qwen3-Reranker-0.6B
  (``format_instruction``, ``process_inputs``, ``compute_logits``), returning the card's probability and the raw
  log-odds ``z_yes - z_no`` next to it.
- Its seq-cls conversion (``tomaarsen/Qwen3-Reranker-0.6B-seq-cls``; vLLM's
  ``examples/pooling/score/convert_model_to_seq_cls.py``): the same prompt through
  ``AutoModelForSequenceClassification``, whose single logit is that log-odds.
- mxbai-rerank-v2: mixedbread's own package, https://github.com/mixedbread-ai/mxbai-rerank,
  ``mxbai_rerank/mxbai_rerank_v2.py`` (``prepare_predefined_inputs``, ``prepare_inputs``, ``forward``), returning
  the raw ``z("1") - z("0")`` its ``predict`` returns by default.
- bge-reranker-v2-gemma: the ``get_inputs`` of BAAI's model card, https://huggingface.co/BAAI/bge-reranker-v2-gemma
  (also in FlagEmbedding's README), returning the raw ``Yes`` logit.

All in float32 on the CPU, under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# The Qwen3-Reranker model card's strings, verbatim (https://huggingface.co/Qwen/Qwen3-Reranker-0.6B).
QWEN3_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
# bge-reranker-v2-gemma's default prompt, verbatim from its model card and FlagEmbedding's FlagLLMReranker.
GEMMA_DEFAULT_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the query by providing "
    "a prediction of either 'Yes' or 'No'."
)

Pair = tuple[str, str]


def unpadded(inputs: Any) -> list[int]:
    """The first row of a padded batch, its padding left out."""
    mask = inputs["attention_mask"][0].bool()
    return [int(token) for token in inputs["input_ids"][0][mask]]


def _tokenizer(model_dir_or_tokenizer: Any, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    if isinstance(model_dir_or_tokenizer, (str, Path)):
        return AutoTokenizer.from_pretrained(model_dir_or_tokenizer, local_files_only=True, **kwargs)
    return model_dir_or_tokenizer


# --- Qwen3-Reranker ---------------------------------------------------------------------------------------------
# Source: https://huggingface.co/Qwen/Qwen3-Reranker-0.6B, "Transformers Usage" (checked against the ModelScope copy
# of the card). The only changes: the globals (tokenizer, model, prefix/suffix tokens, max_length) are arguments,
# the model is loaded in float32 on the CPU, and compute_logits also returns z_yes - z_no.


def format_instruction(instruction: str | None, query: str, doc: str) -> str:
    if instruction is None:
        instruction = QWEN3_DEFAULT_INSTRUCTION
    output = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}".format(  # noqa: UP032 (the card's code)
        instruction=instruction, query=query, doc=doc
    )
    return output


def _qwen3_process_inputs(tokenizer: Any, pairs: list[str], max_length: int) -> Any:
    prefix_tokens = tokenizer.encode(QWEN3_PREFIX, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(QWEN3_SUFFIX, add_special_tokens=False)
    inputs = tokenizer(
        pairs,
        padding=False,
        truncation="longest_first",
        return_attention_mask=False,
        max_length=max_length - len(prefix_tokens) - len(suffix_tokens),
    )
    for i, ele in enumerate(inputs["input_ids"]):
        inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
    inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
    return inputs


@torch.no_grad()
def _qwen3_compute_logits(model: Any, tokenizer: Any, inputs: Any) -> tuple[list[float], list[float]]:
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    batch_scores = model(**inputs).logits[:, -1, :]
    true_vector = batch_scores[:, token_true_id]
    false_vector = batch_scores[:, token_false_id]
    raw = (true_vector - false_vector).tolist()
    batch_scores = torch.stack([false_vector, true_vector], dim=1)
    batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
    scores = batch_scores[:, 1].exp().tolist()
    return scores, raw


def qwen3_card_input_ids(
    model_dir_or_tokenizer: Any, query: str, doc: str, instruction: str | None = None, max_length: int = 8192
) -> list[int]:
    """The token ids the card feeds the model for one pair (no padding)."""
    tokenizer = _tokenizer(model_dir_or_tokenizer, padding_side="left")
    inputs = _qwen3_process_inputs(tokenizer, [format_instruction(instruction, query, doc)], max_length)
    return [int(token) for token in inputs["input_ids"][0]]


def qwen3_card_scores(
    model_dir: str | Path, pairs: Sequence[Pair], instruction: str | None = None, max_length: int = 8192
) -> tuple[list[float], list[float]]:
    """(the card's probabilities, the raw log-odds z_yes - z_no) for (query, document) pairs, in one batch."""
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    texts = [format_instruction(instruction, query, doc) for query, doc in pairs]
    inputs = _qwen3_process_inputs(tokenizer, texts, max_length)
    return _qwen3_compute_logits(model, tokenizer, inputs)


@torch.no_grad()
def qwen3_seqcls_scores(
    seqcls_dir: str | Path, pairs: Sequence[Pair], instruction: str | None = None, max_length: int = 8192
) -> list[float]:
    """The seq-cls conversion's single logit for the card's prompt (left padding, as the card pads)."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = _tokenizer(seqcls_dir, padding_side="left")
    model = AutoModelForSequenceClassification.from_pretrained(
        seqcls_dir, dtype=torch.float32, local_files_only=True
    ).eval()
    texts = [format_instruction(instruction, query, doc) for query, doc in pairs]
    inputs = _qwen3_process_inputs(tokenizer, texts, max_length)
    return model(**inputs).logits[:, 0].tolist()


# --- bge-reranker-v2-gemma --------------------------------------------------------------------------------------
# Source: https://huggingface.co/BAAI/bge-reranker-v2-gemma, "Using Huggingface transformers" / "For LLM-based
# reranker" (get_inputs), the same code as in FlagEmbedding's reranker README. Changes: the tokenizer pads on the left
# (the published tokenizer_config names no padding_side, and the card reads logits[:, -1], which is the last real
# token only with left padding), the model is loaded in float32 on the CPU.
#
# FlagEmbedding's library class FlagLLMReranker.compute_score (FlagEmbedding/flag_reranker.py) differs: max_length
# defaults to 512 (the card's get_inputs: 1024); prepare_for_model truncates to max_length + len(sep) + len(prompt)
# (the card: to max_length, so the card leaves the pair fewer tokens); it sorts pairs by length into batches of 16;
# it pads with its collater and reads the last non-padding position from the attention mask (last_logit_pool), so it
# works with either padding side; optional sigmoid (normalize=True).


def _prepare_for_model(tokenizer: Any, ids: list[int], pair_ids: list[int], **kwargs: Any) -> dict[str, list[int]]:
    """``tokenizer.prepare_for_model`` as the card calls it. transformers 5 dropped the method from tokenizers-backed
    tokenizers; this is transformers 4's behaviour for the card's arguments (no special tokens, no padding,
    ``truncation='only_second'``): drop the overflow from the end of ``pair_ids`` (truncation side right), and, when
    the second sequence is not longer than the overflow, truncate nothing (transformers 4 logs an error then)."""
    if hasattr(tokenizer, "prepare_for_model"):
        return dict(tokenizer.prepare_for_model(ids, pair_ids, **kwargs))
    assert kwargs["truncation"] == "only_second" and not kwargs["add_special_tokens"] and not kwargs["padding"]
    overflow = len(ids) + len(pair_ids) - kwargs["max_length"]
    if overflow > 0 and len(pair_ids) > overflow:
        pair_ids = pair_ids[:-overflow] if tokenizer.truncation_side == "right" else pair_ids[overflow:]
    return {"input_ids": ids + pair_ids}


def get_inputs(pairs: Sequence[Pair], tokenizer: Any, prompt: str | None = None, max_length: int = 1024) -> Any:
    if prompt is None:
        prompt = GEMMA_DEFAULT_PROMPT
    sep = "\n"
    prompt_inputs = tokenizer(prompt, return_tensors=None, add_special_tokens=False)["input_ids"]
    sep_inputs = tokenizer(sep, return_tensors=None, add_special_tokens=False)["input_ids"]
    inputs = []
    for query, passage in pairs:
        query_inputs = tokenizer(
            f"A: {query}",
            return_tensors=None,
            add_special_tokens=False,
            max_length=max_length * 3 // 4,
            truncation=True,
        )
        passage_inputs = tokenizer(
            f"B: {passage}",
            return_tensors=None,
            add_special_tokens=False,
            max_length=max_length,
            truncation=True,
        )
        item = _prepare_for_model(
            tokenizer,
            [tokenizer.bos_token_id] + query_inputs["input_ids"],
            sep_inputs + passage_inputs["input_ids"],
            truncation="only_second",
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            add_special_tokens=False,
        )
        item["input_ids"] = item["input_ids"] + sep_inputs + prompt_inputs
        item["attention_mask"] = [1] * len(item["input_ids"])
        inputs.append(item)
    return tokenizer.pad(
        inputs,
        padding=True,
        max_length=max_length + len(sep_inputs) + len(prompt_inputs),
        pad_to_multiple_of=8,
        return_tensors="pt",
    )


def gemma_flag_input_ids(
    model_dir_or_tokenizer: Any, query: str, doc: str, prompt: str | None = None, max_length: int = 1024
) -> list[int]:
    """The token ids the card feeds the model for one pair, without the padding to a multiple of 8."""
    tokenizer = _tokenizer(model_dir_or_tokenizer, padding_side="left")
    inputs = get_inputs([(query, doc)], tokenizer, prompt=prompt, max_length=max_length)
    return unpadded(inputs)


@torch.no_grad()
def gemma_flag_scores(
    model_dir: str | Path, pairs: Sequence[Pair], prompt: str | None = None, max_length: int = 1024
) -> list[float]:
    """The raw ``Yes`` logits of the card's recipe for (query, passage) pairs, in one batch."""
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    yes_loc = tokenizer("Yes", add_special_tokens=False)["input_ids"][0]
    inputs = get_inputs(pairs, tokenizer, prompt=prompt, max_length=max_length)
    scores = model(**inputs, return_dict=True).logits[:, -1, yes_loc].view(-1).float()
    return scores.tolist()


# --- mxbai-rerank-v2 --------------------------------------------------------------------------------------------
# Source: https://github.com/mixedbread-ai/mxbai-rerank, mxbai_rerank/mxbai_rerank_v2.py (MxbaiRerankV2). The class
# attributes verbatim; prepare_inputs and forward as written, with the model's globals as arguments.

MXBAI_SEP = "\n"
MXBAI_INSTRUCTION_PROMPT = "instruction: {instruction}"
MXBAI_QUERY_PROMPT = "query: {query}"
MXBAI_DOC_PROMPT = "document: {document}"
MXBAI_TASK_PROMPT = (
    "You are a search relevance expert who evaluates how well documents match search queries. For each "
    "query-document pair, carefully analyze the semantic relationship between them, then provide your binary "
    "relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:"
)
MXBAI_CHAT_TEMPLATE = {
    "prefix": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n",
    "suffix": "<|im_end|>\n<|im_start|>assistant\n",
}


def mxbai_v2_inputs(
    tokenizer: Any, pairs: Sequence[Pair], *, instruction: str | None, max_length: int, model_max_length: int
) -> Any:
    """``prepare_predefined_inputs`` + ``prepare_inputs``: the padded batch and the answer tokens' ids."""

    def get_input_ids(x: str) -> list[int]:
        return list(tokenizer(x, return_tensors=None, add_special_tokens=False)["input_ids"])

    task_prompt_inputs = get_input_ids(MXBAI_TASK_PROMPT)
    sep_inputs = get_input_ids(MXBAI_SEP)
    prefix_inputs = get_input_ids(MXBAI_CHAT_TEMPLATE["prefix"])
    suffix_inputs = get_input_ids(MXBAI_CHAT_TEMPLATE["suffix"])
    predefined_length = len(prefix_inputs) + len(task_prompt_inputs) + len(suffix_inputs) + len(sep_inputs)
    if max_length + predefined_length > model_max_length:
        max_length = model_max_length - predefined_length
    inputs = []
    instruction_prompt = MXBAI_INSTRUCTION_PROMPT.format(instruction=instruction) if instruction else None
    for query, document in pairs:
        query_prompt = MXBAI_QUERY_PROMPT.format(query=query)
        if instruction_prompt:
            query_prompt = "".join([instruction_prompt, MXBAI_SEP, query_prompt])
        query_inputs = tokenizer(
            query_prompt, return_tensors=None, add_special_tokens=False, max_length=max_length * 3 // 4, truncation=True
        )
        available_tokens = model_max_length - len(query_inputs["input_ids"]) - predefined_length
        doc_maxlen = min(available_tokens, max_length)
        document_inputs = tokenizer(
            MXBAI_DOC_PROMPT.format(document=document),
            return_tensors=None,
            add_special_tokens=False,
            max_length=doc_maxlen,
            truncation=True,
        )
        item = _prepare_for_model(
            tokenizer,
            query_inputs["input_ids"],
            sep_inputs + document_inputs["input_ids"],
            truncation="only_second",
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            add_special_tokens=False,
        )
        item["input_ids"] = prefix_inputs + item["input_ids"] + sep_inputs + task_prompt_inputs + suffix_inputs
        item["attention_mask"] = [1] * len(item["input_ids"])
        inputs.append(item)
    return tokenizer.pad(inputs, padding="longest", pad_to_multiple_of=8, return_tensors="pt")


def mxbai_v2_input_ids(
    model_dir: str | Path, query: str, doc: str, instruction: str | None = None, max_length: int = 8192
) -> list[int]:
    """The token ids mixedbread's code feeds the model for one pair, without the padding."""
    from transformers import AutoConfig

    tokenizer = _tokenizer(model_dir, padding_side="left")
    model_max_length = AutoConfig.from_pretrained(model_dir, local_files_only=True).max_position_embeddings
    inputs = mxbai_v2_inputs(
        tokenizer, [(query, doc)], instruction=instruction, max_length=max_length, model_max_length=model_max_length
    )
    return unpadded(inputs)


@torch.no_grad()
def mxbai_v2_scores(
    model_dir: str | Path, pairs: Sequence[Pair], instruction: str | None = None, max_length: int = 8192
) -> list[float]:
    """``MxbaiRerankV2.forward``'s logits: ``z("1") - z("0")`` at the last position (left padding)."""
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer(model_dir, padding_side="left")
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    yes_loc = tokenizer("1", return_tensors=None, add_special_tokens=False)["input_ids"][0]
    no_loc = tokenizer("0", return_tensors=None, add_special_tokens=False)["input_ids"][0]
    inputs = mxbai_v2_inputs(
        tokenizer,
        pairs,
        instruction=instruction,
        max_length=max_length,
        model_max_length=model.config.max_position_embeddings,
    )
    outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], return_dict=True)
    logits = outputs.logits[:, -1, yes_loc] - outputs.logits[:, -1, no_loc]
    return logits.float().tolist()
