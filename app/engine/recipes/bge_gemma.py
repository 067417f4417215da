"""bge-reranker-v2-gemma (``GemmaForCausalLM``), as FlagEmbedding scores it.

From the model card of BAAI/bge-reranker-v2-gemma (``get_inputs``) and FlagEmbedding's ``FlagLLMReranker``:

    ids   = [bos] + tok("A: {query}") + tok("\\n") + tok("B: {passage}") + tok("\\n") + tok(prompt)
    score = logits[last, yes_loc], yes_loc = tokenizer("Yes", add_special_tokens=False)["input_ids"][0]
            (``normalize=True``: sigmoid of it)

with ``prompt`` = "Given a query A and a passage B, determine whether the passage contains an answer to the query
by providing a prediction of either 'Yes' or 'No'." unless the caller passes another (FlagEmbedding's ``prompt``
argument; here, a request's ``instruction`` or RERANKER_INSTRUCTION). Every part is tokenised on its own, without
special tokens, exactly as ``get_inputs`` does; the passage is what truncation cuts first.
"""

from __future__ import annotations

from typing import ClassVar

from app.engine.base import PairTemplate
from app.engine.recipes.base import ModelFiles, PromptRecipe, RecipeError, Tokenize

DEFAULT_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the query by providing a "
    "prediction of either 'Yes' or 'No'."
)
SEP = "\n"
MODEL_NAME = "bge-reranker-v2-gemma"


class BgeRerankerGemma(PromptRecipe):
    name: ClassVar[str] = "bge-reranker-gemma"
    takes_instruction: ClassVar[bool] = True
    source: ClassVar[str] = "FlagEmbedding's FlagLLMReranker (the bge-reranker-v2-gemma model card)"

    def __init__(self, files: ModelFiles, tokenize: Tokenize, *, instruction: str | None = None) -> None:
        super().__init__(files, tokenize, instruction=instruction)
        bos = self.tokenizer.bos_token_id
        yes = self.tokenizer("Yes", add_special_tokens=False)["input_ids"]
        if bos is None or not yes:
            raise RecipeError(
                f"the tokenizer in {files.path} has no bos token or no 'Yes' token, which bge-reranker-v2-gemma's "
                "recipe reads: this is not that model's tokenizer"
            )
        self.bos, self.yes = int(bos), int(yes[0])
        self._sep = tuple(self.encode_text(SEP))
        self._templates: dict[str, PairTemplate] = {}  # by prompt: a request's own instruction is tokenised once

    @classmethod
    def recognise(cls, files: ModelFiles) -> str | None:
        if files.model_type != "gemma" or files.architecture not in cls.architectures():
            return None
        # BAAI's card is titled "Reranker"; its text names the model. No Gemma chat model's card does, and the
        # sibling cards that list it in their tables (bge-reranker-v2-m3's) are not GemmaForCausalLM.
        if f"BAAI/{MODEL_NAME}" in files.card:
            return f"its model card names BAAI/{MODEL_NAME}"
        return files.evidence_for(MODEL_NAME)

    @classmethod
    def architectures(cls) -> tuple[str, ...]:
        return ("GemmaForCausalLM",)

    def prompt(self, instruction: str | None) -> str:
        return instruction or self.default_instruction or DEFAULT_PROMPT

    def query_text(self, query: str, instruction: str | None) -> str:
        return f"A: {query}"

    def document_text(self, document: str) -> str:
        return f"B: {document}"

    def template(self, instruction: str | None) -> PairTemplate:
        prompt = self.prompt(instruction)
        template = self._templates.get(prompt)
        if template is None:
            if len(self._templates) >= 64:
                self._templates.clear()
            prompt_ids = tuple(self.encode_text(prompt))
            template = PairTemplate(prefix=(self.bos,), middle=self._sep, suffix=(*self._sep, *prompt_ids))
            self._templates[prompt] = template
        return template

    def reference_ids(self, query: str, document: str, instruction: str | None) -> list[int]:
        tokenizer = self.tokenizer

        def ids(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        prompt = self.prompt(instruction)
        return [self.bos, *ids(f"A: {query}"), *ids(SEP), *ids(f"B: {document}"), *ids(SEP), *ids(prompt)]

    def answer_tokens(self) -> tuple[int, int | None]:
        return self.yes, None

    def describe(self) -> dict[str, str]:
        return {"recipe": self.name, "instruction": self.prompt(None)}
