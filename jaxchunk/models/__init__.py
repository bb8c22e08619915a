"""Language models assembled from `jaxchunk.layers`.

`LanguageModel` and `init_cache` are loaded on first access: the layers import
`jaxchunk.models.config`, so importing the model (which imports the layers) here eagerly would be
circular whenever a layer module is imported first.
"""

from jaxchunk.models.config import ModelConfig

_LAZY = ("LanguageModel", "init_cache")
__all__ = ["LanguageModel", "ModelConfig", "init_cache"]


def __getattr__(name: str):
  if name in _LAZY:
    from jaxchunk.models import language_model
    return getattr(language_model, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
