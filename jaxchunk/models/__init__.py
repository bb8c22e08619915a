"""Language models assembled from `jaxchunk.layers`."""

from jaxchunk.config import ModelConfig
from jaxchunk.models.language_model import LanguageModel, init_cache

__all__ = ["LanguageModel", "ModelConfig", "init_cache"]
