"""A production rerank service: a local cross-encoder behind every rerank dialect RAG stacks speak."""

__version__ = "0.1.0"
