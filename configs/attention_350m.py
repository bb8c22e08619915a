"""350M preset: every block global causal softmax attention."""

from configs import sized_preset

CONFIG = sized_preset("350m", ("attention",))
