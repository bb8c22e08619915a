"""350M preset: every block GLA."""

from configs import sized_preset

CONFIG = sized_preset("350m", ("gla",))
