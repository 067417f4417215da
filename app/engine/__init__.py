"""Model side: tokenise → forward → scores. Never imports FastAPI.

The weights are loaded, and CUDA touched, only by what runs the model (``torch_backend``, with ``first_token``
and ``cuda_graphs``). What an HTTP worker needs when an engine process holds the model, ``model_dir`` (the
checks and the pair encoder) and ``base``, loads the tokenizer alone; transformers imports torch with it, but
no weight is read and no device is initialised.
"""
