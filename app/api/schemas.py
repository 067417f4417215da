"""Request and response models for every rerank dialect (see shared/RERANK_WIRE.md), and the conversions.

One request model accepts the union of what RAGFlow's providers, Cohere v1/v2, Jina, vLLM, Xinference, TEI and
NVIDIA send; unknown fields are ignored. Limits live here so FastAPI refuses bad input before any work is done,
and the request normalises itself (``query_text``, ``document_texts``, ``chunking``). Each dialect's answer is
built here from the service's outcome (``RerankResponse.from_outcome``, ``TeiRank.ranked``,
``NvidiaResponse.from_outcome``), so the routes only wire a request to the service and back.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.errors import InvalidRequestError, PayloadTooLargeError
from app.service import DocumentScore, RerankOutcome


def require_unicode(text: str, param: str) -> None:
    """Refuse text that is not valid Unicode: a lone UTF-16 surrogate (JSON ``"\\ud800"``) parses into a Python
    string that no tokenizer or UTF-8 encoder accepts, so it would otherwise fail as a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(text[error.start])
        raise InvalidRequestError(
            f"{param} is not valid Unicode: unpaired surrogate \\u{code:04x} at character {error.start}",
            param=param,
        ) from None


def ranked(outcome: RerankOutcome, top_n: int | None = None) -> list[DocumentScore]:
    """Documents best first (ties: the request's order), the first ``top_n`` (None or 0: all)."""
    order = sorted(outcome.documents, key=lambda document: (-document.logit, document.index))
    return order[:top_n] if top_n else order


class TextObject(BaseModel):
    """``{"text": ...}``, as NVIDIA sends queries and passages and Jina/Cohere may send documents."""

    model_config = ConfigDict(extra="ignore")
    text: str


class RerankRequest(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "model": "bge-reranker-base-local",
                    "query": "What is the capital of France?",
                    "documents": ["Paris is the capital of France.", "Berlin is in Germany."],
                    "top_n": 2,
                }
            ]
        },
    )

    model: str | None = Field(None, description="Any string: one model is served, whatever the client names.")
    query: str | TextObject = Field(description='The search query (NVIDIA sends {"text": ...}).')
    documents: list[str | dict[str, Any]] | None = Field(
        None, description="Strings, or objects with a text field (or the fields named by rank_fields)."
    )
    texts: list[str] | None = Field(None, description="TEI's name for documents; the answer is TEI's bare list.")
    passages: list[TextObject] | None = Field(None, description="NVIDIA's name for documents.")
    top_n: int | None = Field(None, ge=0, description="Keep the n best; absent, null or 0 = all.")
    return_documents: bool | None = Field(
        None, description="Echo each document's text in results (true/false or the strings Xinference sends)."
    )
    raw_scores: bool = Field(False, description="Scores as raw logits instead of sigmoid probabilities.")
    return_text: bool = Field(False, description="TEI: echo the text in each answer.")
    truncate: bool | str | None = Field(
        None, description="TEI (bool) or NVIDIA (END/NONE). Long pairs are always truncated or chunked."
    )
    rank_fields: list[str] | None = Field(None, description="Cohere: which fields of object documents to rank on.")
    max_chunks_per_doc: int | None = Field(
        None, ge=1, description="Split long documents into at most this many windows; a document scores its best."
    )
    overlap_tokens: int | None = Field(None, ge=0, description="Tokens neighbouring windows share.")
    max_tokens_per_doc: int | None = Field(
        None, ge=1, description="Cohere v2 / vLLM: score at most this many tokens of each document (chunked)."
    )
    instruction: str | None = Field(
        None,
        max_length=4096,
        description=(
            "LLM rerankers (Qwen3-Reranker's <Instruct>, mxbai-rerank-v2's instruction line, bge-reranker-v2-gemma's "
            "prompt): replaces the default instruction for this request. A model that takes none answers 422."
        ),
    )

    @property
    def wants_tei_list(self) -> bool:
        """TEI's body (``texts``, no ``documents``) gets TEI's bare list back."""
        return self.texts is not None and self.documents is None

    def query_text(self) -> str:
        query = self.query.text if isinstance(self.query, TextObject) else self.query
        if not query.strip():
            raise InvalidRequestError("query must be a non-empty string", param="query")
        require_unicode(query, "query")
        return query

    def instruction_text(self) -> str | None:
        """The request's instruction, checked; None when it sent none."""
        if self.instruction is None:
            return None
        if not self.instruction.strip():
            raise InvalidRequestError("instruction must be a non-empty string (or left out)", param="instruction")
        require_unicode(self.instruction, "instruction")
        return self.instruction

    def document_texts(self, *, max_documents: int) -> list[str]:
        """The documents' texts, whatever field and shape the dialect used, checked and within the limit."""
        texts = self._texts()
        if len(texts) > max_documents:
            raise PayloadTooLargeError(
                f"{len(texts)} documents sent; the limit is {max_documents} (RERANKER_MAX_DOCUMENTS)",
                param="documents",
            )
        for position, text in enumerate(texts):
            require_unicode(text, f"documents[{position}]")
        return texts

    def _texts(self) -> list[str]:
        if self.documents is not None:
            return [self._document_text(position, document) for position, document in enumerate(self.documents)]
        if self.texts is not None:
            return list(self.texts)
        if self.passages is not None:
            return [passage.text for passage in self.passages]
        raise InvalidRequestError("documents is required (a list of strings)", param="documents")

    def _document_text(self, position: int, document: str | dict[str, Any]) -> str:
        if isinstance(document, str):
            return document
        if self.rank_fields:
            values = [(field, document.get(field)) for field in self.rank_fields if field in document]
            if values and all(isinstance(value, str) for _, value in values):
                return "\n".join(f"{field}: {value}" for field, value in values)
            raise InvalidRequestError(
                f"documents[{position}] has no string field among rank_fields {self.rank_fields}",
                param=f"documents[{position}]",
            )
        text = document.get("text")
        if not isinstance(text, str):
            raise InvalidRequestError(
                f"documents[{position}] must be a string or an object with a text field",
                param=f"documents[{position}]",
            )
        return text

    def chunking(self) -> dict[str, int | None]:
        """What the request asked for long documents (Cohere v1 / SILICONFLOW, Cohere v2 / vLLM)."""
        return {
            "max_chunks_per_doc": self.max_chunks_per_doc,
            "overlap_tokens": self.overlap_tokens,
            "max_tokens_per_doc": self.max_tokens_per_doc,
        }


class DocumentText(BaseModel):
    text: str


class ChunkInfo(BaseModel):
    index: int = Field(description="The window of the document that scored best (0-based).")
    count: int = Field(description="How many windows the document was split into.")


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: DocumentText | None = None
    chunk: ChunkInfo | None = Field(None, description="Present when the document was scored in several windows.")


class SeedResult(BaseModel):
    """The seed deployment's answer shape, kept on /v1/rerank so its clients keep working."""

    index: int
    score: float
    document: str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, outcome: RerankOutcome) -> Usage:
        """Every token of every scored pair (special tokens and every window included)."""
        return cls(prompt_tokens=outcome.total_tokens, total_tokens=outcome.total_tokens)


class MetaTokens(BaseModel):
    input_tokens: int
    output_tokens: int = 0


class ApiVersion(BaseModel):
    version: str = "2"


class BilledUnits(BaseModel):
    search_units: int = 1


class Meta(BaseModel):
    api_version: ApiVersion = Field(default_factory=ApiVersion)
    billed_units: BilledUnits = Field(default_factory=BilledUnits)
    tokens: MetaTokens
    warnings: list[str] = Field(default_factory=list)


class RerankResponse(BaseModel):
    id: str
    object: str = "list"
    model: str
    results: list[RerankResult]
    usage: Usage
    meta: Meta
    data: list[SeedResult] | None = Field(None, description="The seed's format; only on /v1/rerank and its aliases.")

    @classmethod
    def from_outcome(
        cls,
        outcome: RerankOutcome,
        body: RerankRequest,
        texts: list[str],
        *,
        request_id: str,
        model: str,
        seed_data: bool,
    ) -> RerankResponse:
        """Cohere/Jina/vLLM/RAGFlow's ``results`` (sigmoid scores unless ``raw_scores``), ``usage``, ``meta``,
        and on the seed's paths its ``data`` list."""
        best = ranked(outcome, body.top_n)

        def score(document: DocumentScore) -> float:
            return document.logit if body.raw_scores else document.relevance_score

        results = [
            RerankResult(
                index=document.index,
                relevance_score=score(document),
                document=DocumentText(text=texts[document.index]) if body.return_documents else None,
                chunk=(
                    ChunkInfo(index=document.best_window, count=document.window_count)
                    if document.window_count > 1
                    else None
                ),
            )
            for document in best
        ]
        data = [SeedResult(index=d.index, score=score(d), document=texts[d.index]) for d in best] if seed_data else None
        return cls(
            id=request_id,
            model=model,
            results=results,
            usage=Usage.of(outcome),
            meta=Meta(tokens=MetaTokens(input_tokens=outcome.total_tokens)),
            data=data,
        )


class TeiRank(BaseModel):
    index: int
    score: float
    text: str | None = None

    @classmethod
    def ranked(cls, outcome: RerankOutcome, body: RerankRequest, texts: list[str]) -> list[TeiRank]:
        """TEI's bare list, every document best first (TEI has no top_n)."""
        return [
            cls(
                index=document.index,
                score=document.logit if body.raw_scores else document.relevance_score,
                text=texts[document.index] if body.return_text else None,
            )
            for document in ranked(outcome)
        ]


class NvidiaRanking(BaseModel):
    index: int
    logit: float


class NvidiaResponse(BaseModel):
    rankings: list[NvidiaRanking]
    usage: Usage

    @classmethod
    def from_outcome(cls, outcome: RerankOutcome, body: RerankRequest) -> NvidiaResponse:
        rankings = [NvidiaRanking(index=d.index, logit=d.logit) for d in ranked(outcome, body.top_n)]
        return cls(rankings=rankings, usage=Usage.of(outcome))


class ModelCard(BaseModel):
    """One served model, in the OpenAI list shape plus what discovery clients and operators read."""

    id: str
    object: str = "model"
    created: int
    owned_by: str = "local"
    model_type: str = Field("rerank", description="Xinference's discovery field: this is a rerank model.")
    max_model_len: int = Field(description="Tokens per (query, document) pair, special tokens included.")
    architecture: str | None = Field(None, description="e.g. XLMRobertaForSequenceClassification")
    num_labels: int | None = Field(None, description="1 (a relevance logit) or 2 (not relevant, relevant).")
    dtype: str | None = Field(None, description="The dtype of the matrix products: float16, bfloat16, float32.")
    device: str | None = Field(None, description="cuda, cuda:N or cpu.")
    recipe: str | None = Field(
        None, description="How pairs are scored: cross-encoder, qwen3-reranker, bge-reranker-gemma or mxbai-rerank-v2."
    )
    instruction: str | None = Field(None, description="An LLM reranker's default instruction (its recipe's).")


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class TeiInfo(BaseModel):
    """TEI's ``GET /info``, which RAGFlow's HuggingFace provider reads to discover what the server serves."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_type: dict[str, dict[str, Any]] = Field(
        description='TEI says {"reranker": {...}}; RAGFlow looks for a "rerank" key: both are given.'
    )
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None = None
    max_client_batch_size: int
    tokenization_workers: int
    version: str
    sha: str | None = None
    docker_label: str | None = None
    recipe: str | None = Field(None, description="Not TEI's: how pairs are scored (see /v1/models).")


class Health(BaseModel):
    status: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorEnvelope(BaseModel):
    error: ErrorDetail
