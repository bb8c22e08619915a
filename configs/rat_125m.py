"""125M preset: every block RAT (chunk 16)."""

from configs import sized_preset

CONFIG = sized_preset("125m", ("rat",))
