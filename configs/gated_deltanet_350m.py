"""350M preset: every block Gated DeltaNet."""

from configs import sized_preset

CONFIG = sized_preset("350m", ("gated_delta_rule",))
