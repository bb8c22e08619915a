"""MoR comparison, expert-choice MoR: `mor_recursive` with capacities 1, 2/3, 1/3 per recursion.

6 block passes per token on average (2 unshared + 2 x (1 + 2/3 + 1/3)).
"""

from configs.mor_vanilla import RUN, STACK
from jaxchunk.models.mor import MoRConfig

MOR = MoRConfig(model=STACK, num_recursions=3, sharing="middle_cycle", router="expert",
                capacities=(1.0, 2 / 3, 1 / 3))
CONFIG = RUN
