"""sorlora: the application on top of peft_sorlora, sorlora_gossip and moe_router (tasks, training, the peer
program, the simulation runner, evaluation and the ``sorlora`` command).

Importing it sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already sets it (read by OpenMP when torch
loads, so before torch is imported): torch's OpenMP threads otherwise spin at every barrier, and on a machine where
any other job runs a thread that waits for a descheduled sibling stalls the whole step. Measured on this project's
2-core machine while other sessions' torch benchmarks and tests ran: a SmolLM2 train step took 26-32 s with torch's
default and 4-5 s passive (4.7 s with one thread); alone it costs about 25% (2.06 vs 2.58 s), so set
``OMP_WAIT_POLICY=ACTIVE`` on a machine you have to yourself. Only this application does it; the libraries do not.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
