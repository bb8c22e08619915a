"""1.3B preset: every block GLA."""

from configs import sized_preset

CONFIG = sized_preset("1b3", ("gla",))
