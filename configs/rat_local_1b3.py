"""1.3B preset: blocks alternate RAT and sliding-window (512) attention."""

from configs import sized_preset

CONFIG = sized_preset("1b3", ("rat", "local"))
