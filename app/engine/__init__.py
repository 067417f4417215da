"""Model side: tokenise → forward → scores. Never imports FastAPI; only ``torch_backend`` imports torch."""
