"""MoR comparison, token-choice MoR: `mor_recursive` with depths assigned up front.

Capacities 1, 2/3, 1/3 bound each recursion's gathered tokens (the balancing loss spreads depths).
"""

from configs.mor_vanilla import RUN, STACK
from jaxchunk.models.mor import MoRConfig

MOR = MoRConfig(model=STACK, num_recursions=3, sharing="middle_cycle", router="token",
                capacities=(1.0, 2 / 3, 1 / 3))
CONFIG = RUN
