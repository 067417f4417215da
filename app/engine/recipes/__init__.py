"""Scoring recipes, one module per model family, and the choice of one for a model directory.

``choose_recipe`` recognises the family from the published files (config.json's architecture, the model card, the
tokenizer; the directory's name as a hub download names it) or takes the one RERANKER_RECIPE forces. An LLM whose
recipe is unknown is refused: a decoder scored without the prompt and answer tokens it was trained on gives
confident, wrong scores.
"""

from __future__ import annotations

from app.engine.recipes.base import ModelFiles, PromptRecipe, Recipe, RecipeError, Tokenize, read_card
from app.engine.recipes.bge_gemma import BgeRerankerGemma
from app.engine.recipes.cross_encoder import CrossEncoder, pair_template
from app.engine.recipes.mxbai_v2 import MxbaiRerankV2
from app.engine.recipes.qwen3_reranker import Qwen3Reranker

__all__ = [
    "RECIPES",
    "BgeRerankerGemma",
    "CrossEncoder",
    "ModelFiles",
    "MxbaiRerankV2",
    "PromptRecipe",
    "Qwen3Reranker",
    "Recipe",
    "RecipeError",
    "choose_recipe",
    "is_decoder",
    "pair_template",
    "read_card",
]

# LLM rerankers first: their directories are recognised by evidence, and a *-seq-cls conversion is also a
# sequence classifier, which the cross-encoder recipe would otherwise take (and score without its prompt).
DECODER_RECIPES: tuple[type[Recipe], ...] = (Qwen3Reranker, BgeRerankerGemma, MxbaiRerankV2)
_ALL: tuple[type[Recipe], ...] = (CrossEncoder, *DECODER_RECIPES)
RECIPES: dict[str, type[Recipe]] = {recipe.name: recipe for recipe in _ALL}
FORCE_HINT = "RERANKER_RECIPE=" + " or ".join(recipe.name for recipe in DECODER_RECIPES)


def is_decoder(model_type: str) -> bool:
    """Whether transformers implements ``model_type`` as a decoder-only language model: it has a causal-LM form
    and no masked-LM one (BERT, RoBERTa, XLM-R, ELECTRA, DeBERTa and ModernBERT all have a masked-LM form)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def choose_recipe(
    files: ModelFiles, tokenize: Tokenize, *, forced: str = "auto", instruction: str | None = None
) -> tuple[Recipe, str]:
    """The recipe that scores ``files``' model and why it was chosen; raises :class:`RecipeError` (one line naming
    the path, the reason and the setting that forces a recipe) when none can."""
    path, architecture = files.path, files.architecture or "a model with no architectures entry"
    if forced != "auto":
        recipe = RECIPES[forced]
        accepted = recipe.architectures()
        if recipe is CrossEncoder and not architecture.endswith("ForSequenceClassification"):
            raise RecipeError(
                f"model at {path} is {architecture}, not a sequence classifier: it cannot be scored as a "
                f"cross-encoder (RERANKER_RECIPE=cross-encoder); unset RERANKER_RECIPE or set {FORCE_HINT}"
            )
        if accepted and architecture not in accepted:
            raise RecipeError(
                f"model at {path} is {architecture}; the {recipe.name} recipe (RERANKER_RECIPE) scores "
                f"{' or '.join(accepted)} only; unset RERANKER_RECIPE to let the service recognise the model"
            )
        return recipe(files, tokenize, instruction=instruction), f"RERANKER_RECIPE={forced}"
    for recipe in DECODER_RECIPES:
        evidence = recipe.recognise(files)
        if evidence is not None:
            return recipe(files, tokenize, instruction=instruction), evidence
    if is_decoder(files.model_type):
        kind = (
            "a sequence classifier built on an LLM" if architecture.endswith("ForSequenceClassification") else "an LLM"
        )
        raise RecipeError(
            f"model at {path} is {architecture} ({kind}, model_type {files.model_type!r}) whose scoring recipe is "
            "unknown: an LLM reranker is scored only with the prompt and answer tokens it was trained on, and "
            "nothing in its model card, config or directory name says which (Qwen3-Reranker, "
            "bge-reranker-v2-gemma and mxbai-rerank-v2 are recognised); a chat or base LLM is not a reranker. If "
            f"it is one of those rerankers (a copy without its model card), set {FORCE_HINT}"
        )
    evidence = CrossEncoder.recognise(files)
    if evidence is None:
        raise RecipeError(
            f"model at {path} is {architecture}, not a sequence classifier (a cross-encoder reranker); an "
            "embedding or language model cannot rerank here"
        )
    return CrossEncoder(files, tokenize, instruction=instruction), evidence
