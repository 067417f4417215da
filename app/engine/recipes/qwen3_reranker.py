"""Qwen3-Reranker (0.6B, 4B, 8B), as Qwen's model card scores it.

From the model card of Qwen/Qwen3-Reranker-0.6B / -4B / -8B ("Using Transformers"):

    prefix = "<|im_start|>system\\nJudge whether the Document meets ... \\"yes\\" or \\"no\\".<|im_end|>\\n"
             "<|im_start|>user\\n"
    suffix = "<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n"
    text   = "<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {doc}"
    ids    = prefix_tokens + tokenizer(text)["input_ids"] + suffix_tokens   (text truncated from its end)
    score  = softmax(z_no, z_yes)[yes] at the last position = sigmoid(z_yes - z_no)

The service builds the same ids from two texts: ``<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>:``,
once per request, and `` {doc}`` per document. Qwen's pre-tokenizer always splits before the space that follows
that colon (the colon's punctuation run stops at whitespace), so the two parts' ids are exactly the whole text's,
and a document can be cut or windowed by its own tokens; the start-up self-check proves it on probes with
leading digits, punctuation, newlines and spaces. z_yes - z_no is the hidden state times one row,
``lm_head[yes] - lm_head[no]``: the vocabulary-wide head is never computed.

Both published forms are this recipe: the original ``Qwen3ForCausalLM``, and the ``*-seq-cls`` conversions
(``Qwen3ForSequenceClassification`` whose one label row is that difference already, made by vLLM's
``convert_model_to_seq_cls.py``), which are trained on the same prompt and are wrong without it.
"""

from __future__ import annotations

from typing import ClassVar

from app.engine.base import PairTemplate
from app.engine.recipes.base import ModelFiles, PromptRecipe, RecipeError, Tokenize

PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
TEXT = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"
MODEL_NAME = "Qwen3-Reranker"


class Qwen3Reranker(PromptRecipe):
    name: ClassVar[str] = "qwen3-reranker"
    takes_instruction: ClassVar[bool] = True
    source: ClassVar[str] = "the Qwen3-Reranker model card (Transformers usage)"

    def __init__(self, files: ModelFiles, tokenize: Tokenize, *, instruction: str | None = None) -> None:
        super().__init__(files, tokenize, instruction=instruction)
        vocab = self.tokenizer.get_vocab()
        missing = [token for token in ("yes", "no", "<|im_start|>", "<|im_end|>") if token not in vocab]
        if missing:
            raise RecipeError(
                f"the tokenizer in {files.path} has no {', '.join(map(repr, missing))} token, which Qwen3-Reranker's "
                "recipe reads: this is not a Qwen3-Reranker tokenizer"
            )
        self.yes, self.no = int(vocab["yes"]), int(vocab["no"])
        self._template = PairTemplate(
            prefix=tuple(self.encode_text(PREFIX)), middle=(), suffix=tuple(self.encode_text(SUFFIX))
        )

    @classmethod
    def recognise(cls, files: ModelFiles) -> str | None:
        if files.model_type != "qwen3" or files.architecture not in cls.architectures():
            return None
        return files.evidence_for(MODEL_NAME)

    @classmethod
    def architectures(cls) -> tuple[str, ...]:
        return ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification")

    def instruction(self, instruction: str | None) -> str:
        return instruction or self.default_instruction or DEFAULT_INSTRUCTION

    def query_text(self, query: str, instruction: str | None) -> str:
        # The card's text up to the document: its colon ends a pre-token, so " {doc}" tokenises on its own.
        return f"<Instruct>: {self.instruction(instruction)}\n<Query>: {query}\n<Document>:"

    def document_text(self, document: str) -> str:
        return f" {document}"

    def template(self, instruction: str | None) -> PairTemplate:
        return self._template

    def reference_ids(self, query: str, document: str, instruction: str | None) -> list[int]:
        tokenizer = self.tokenizer
        text = TEXT.format(instruction=self.instruction(instruction), query=query, doc=document)
        prefix = tokenizer.encode(PREFIX, add_special_tokens=False)
        suffix = tokenizer.encode(SUFFIX, add_special_tokens=False)
        return [*prefix, *tokenizer(text)["input_ids"], *suffix]

    def answer_tokens(self) -> tuple[int, int | None]:
        return self.yes, self.no

    def describe(self) -> dict[str, str]:
        return {"recipe": self.name, "instruction": self.instruction(None)}
