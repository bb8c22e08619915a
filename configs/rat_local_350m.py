"""350M preset: blocks alternate RAT and sliding-window (512) attention."""

from configs import sized_preset

CONFIG = sized_preset("350m", ("rat", "local"))
