"""``python -m kubetrain_trainer``: run the stage described by the environment.

The image's entrypoint and the local runner both start this. When the contract asks
for several processes (``PET_NPROC_PER_NODE`` > 1 or ``PET_NNODES`` > 1) and we are not
already a torchrun worker, it runs torchrun as its child, which reads the same ``PET_*``
variables, so neither the pod spec nor the local runner needs to know; this process
stays the pod's main process so that the pod's exit code is the workers'
(``kubetrain_trainer.launch``).
"""

from __future__ import annotations

import os
import sys

# Idle OpenMP threads sleep instead of spinning: on shared or oversubscribed CPUs
# spinning threads slow training many-fold; on dedicated cores it costs little.
# Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from kubetrain_trainer.signals import install_early

install_early()  # before the slow imports: a preemption then still ends in a checkpoint

from kubetrain_trainer.launch import run_torchrun, torchrun_command  # noqa: E402


def run() -> int:
    command = torchrun_command(os.environ)
    if command is not None:
        return run_torchrun(command, os.environ)
    from kubetrain_trainer.train import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
