"""1.3B preset: every block global causal softmax attention."""

from configs import sized_preset

CONFIG = sized_preset("1b3", ("attention",))
