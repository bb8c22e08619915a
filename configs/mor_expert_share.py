"""MoR comparison, expert-choice MoR with recursive KV sharing: `mor_expert` with kv_strategy
"share_first".

Recursions 2 and 3 reuse the first recursion's keys/values (queries only for their active tokens),
so the decode cache holds one recursion's KV instead of three; same parameters as `mor_expert`.
"""

import dataclasses

from configs.mor_expert import MOR as EXPERT
from configs.mor_vanilla import RUN

MOR = dataclasses.replace(EXPERT, kv_strategy="share_first")
CONFIG = RUN
