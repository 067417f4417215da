"""mxbai-rerank-v2 (mixedbread-ai/mxbai-rerank-base-v2, -large-v2: ``Qwen2ForCausalLM``), as mixedbread's own
package scores it (``mxbai_rerank/mxbai_rerank_v2.py``, ``MxbaiRerankV2.prepare_inputs`` and ``forward``):

    ids   = tok(prefix) + tok("[instruction: {i}\\n]query: {q}") + tok("\\n") + tok("document: {d}")
            + tok("\\n") + tok(task_prompt) + tok(suffix)                 (every part without special tokens)
    logit = z("1") - z("0") at the last position, with "1"/"0" = tokenizer(x, add_special_tokens=False)[0]

``predict`` returns that difference as it is (its default, ``normalize=False``): so does ``raw_scores`` here,
and ``relevance_score`` is its sigmoid, as vLLM's reference for this model computes it. (mixedbread's optional
``normalize=True`` is ``sigmoid(z - estimated_max / 2)`` with a per-checkpoint constant: the same ranking, other
numbers.) The instruction, when given, is part of the query's text, as in ``prepare_inputs``.
"""

from __future__ import annotations

from typing import ClassVar

from app.engine.base import PairTemplate
from app.engine.recipes.base import ModelFiles, PromptRecipe, RecipeError, Tokenize

SEP = "\n"
TASK_PROMPT = (
    "You are a search relevance expert who evaluates how well documents match search queries. For each "
    "query-document pair, carefully analyze the semantic relationship between them, then provide your binary "
    "relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:"
)
PREFIX = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n"
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
MODEL_NAMES = ("mxbai-rerank-base-v2", "mxbai-rerank-large-v2")


class MxbaiRerankV2(PromptRecipe):
    name: ClassVar[str] = "mxbai-rerank-v2"
    takes_instruction: ClassVar[bool] = True
    source: ClassVar[str] = "mixedbread's mxbai-rerank package (MxbaiRerankV2)"

    def __init__(self, files: ModelFiles, tokenize: Tokenize, *, instruction: str | None = None) -> None:
        super().__init__(files, tokenize, instruction=instruction)
        one = self.tokenizer("1", add_special_tokens=False)["input_ids"]
        zero = self.tokenizer("0", add_special_tokens=False)["input_ids"]
        if not one or not zero:
            raise RecipeError(f"the tokenizer in {files.path} cannot encode '1' and '0', which mxbai-rerank-v2 reads")
        self.one, self.zero = int(one[0]), int(zero[0])
        sep = tuple(self.encode_text(SEP))
        self._template = PairTemplate(
            prefix=tuple(self.encode_text(PREFIX)),
            middle=sep,
            suffix=(*sep, *self.encode_text(TASK_PROMPT), *self.encode_text(SUFFIX)),
        )

    @classmethod
    def recognise(cls, files: ModelFiles) -> str | None:
        if files.model_type != "qwen2" or files.architecture not in cls.architectures():
            return None
        for name in MODEL_NAMES:
            evidence = files.evidence_for(name)
            if evidence is not None:
                return evidence
        return None

    @classmethod
    def architectures(cls) -> tuple[str, ...]:
        return ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification")

    def instruction(self, instruction: str | None) -> str | None:
        return instruction or self.default_instruction

    def query_text(self, query: str, instruction: str | None) -> str:
        given = self.instruction(instruction)
        return f"instruction: {given}{SEP}query: {query}" if given else f"query: {query}"

    def document_text(self, document: str) -> str:
        return f"document: {document}"

    def template(self, instruction: str | None) -> PairTemplate:
        return self._template

    def reference_ids(self, query: str, document: str, instruction: str | None) -> list[int]:
        def ids(text: str) -> list[int]:
            return list(self.tokenizer(text, return_tensors=None, add_special_tokens=False)["input_ids"])

        given = self.instruction(instruction)
        query_prompt = f"query: {query}"
        if given:
            query_prompt = "".join([f"instruction: {given}", SEP, query_prompt])
        return [
            *ids(PREFIX),
            *ids(query_prompt),
            *ids(SEP),
            *ids(f"document: {document}"),
            *ids(SEP),
            *ids(TASK_PROMPT),
            *ids(SUFFIX),
        ]

    def answer_tokens(self) -> tuple[int, int | None]:
        return self.one, self.zero

    def describe(self) -> dict[str, str]:
        given = self.instruction(None)  # none by default: the package adds no instruction line
        return {"recipe": self.name, **({"instruction": given} if given else {})}
