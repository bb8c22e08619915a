"""MoR comparison, fixed-depth recursive baseline: middle-cycle, 2 shared blocks x 3 recursions.

First and last blocks unshared, so 4 unique blocks (as `mor_vanilla`) and 8 block passes per token.
"""

from configs.mor_vanilla import RUN, STACK
from jaxchunk.models.mor import MoRConfig

MOR = MoRConfig(model=STACK, num_recursions=3, sharing="middle_cycle", router=None)
CONFIG = RUN
