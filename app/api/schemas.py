"""Request and response models for every rerank dialect (see shared/RERANK_WIRE.md).

One request model accepts the union of what RAGFlow's providers, Cohere v1/v2, Jina, vLLM, Xinference, TEI and
NVIDIA send; unknown fields are ignored. Limits live here so FastAPI refuses bad input before any work is done.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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
    query: str | TextObject = Field(description="The search query (NVIDIA sends {\"text\": ...}).")
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


class TeiRank(BaseModel):
    index: int
    score: float
    text: str | None = None


class NvidiaRanking(BaseModel):
    index: int
    logit: float


class NvidiaResponse(BaseModel):
    rankings: list[NvidiaRanking]
    usage: Usage


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


class Health(BaseModel):
    status: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorEnvelope(BaseModel):
    error: ErrorDetail
