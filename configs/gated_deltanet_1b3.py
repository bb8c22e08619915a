"""1.3B preset: every block Gated DeltaNet."""

from configs import sized_preset

CONFIG = sized_preset("1b3", ("gated_delta_rule",))
