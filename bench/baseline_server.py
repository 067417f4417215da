"""The naive baseline: the original single-process server the benchmark compares against.

One uvicorn process (no gunicorn, no batcher), a sentence-transformers ``CrossEncoder`` in float32, and one
``CrossEncoder.predict`` call per request, answering the seed format
``{"object": "list", "data": [{"index", "score", "document"}]}`` sorted by score.

The route is a plain ``def``: FastAPI runs it in its thread pool, as its documentation advises for blocking
code, so concurrent requests run concurrent ``predict`` calls that share the CPU (each with torch's default
thread count). ``--handler async`` serves them one at a time on the event loop instead.

Usage: ``python -m bench.baseline_server --model-path DIR --port 9400 [--device cpu] [--handler sync]``
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from sentence_transformers import CrossEncoder


class RerankRequest(BaseModel):
    model: str | None = None
    query: str
    documents: list[str]
    top_n: int | None = None


def build_app(model_path: str, *, device: str, handler: str) -> FastAPI:
    model = CrossEncoder(model_path, device=device, local_files_only=True, model_kwargs={"dtype": torch.float32})
    app = FastAPI(title="baseline reranker")

    def score(body: RerankRequest) -> dict[str, object]:
        scores = model.predict([(body.query, document) for document in body.documents], show_progress_bar=False)
        order = sorted(range(len(body.documents)), key=lambda i: -float(scores[i]))
        if body.top_n:
            order = order[: body.top_n]
        data = [{"index": i, "score": float(scores[i]), "document": body.documents[i]} for i in order]
        return {"object": "list", "data": data}

    if handler == "async":

        @app.post("/v1/rerank")
        async def rerank_async(body: RerankRequest) -> dict[str, object]:
            return score(body)  # blocks the event loop: one request at a time
    else:

        @app.post("/v1/rerank")
        def rerank(body: RerankRequest) -> dict[str, object]:
            return score(body)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="Naive single-process CrossEncoder rerank server (the baseline).")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9400)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--handler", choices=["sync", "async"], default="sync")
    args = parser.parse_args()
    app = build_app(args.model_path, device=args.device, handler=args.handler)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
