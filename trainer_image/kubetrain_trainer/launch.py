"""Whether this process should hand over to torchrun (see ``__main__``)."""

from __future__ import annotations

import sys
from collections.abc import Mapping

from kubetrain.core import contract


def torchrun_command(environ: Mapping[str, str]) -> list[str] | None:
    """The torchrun command line to exec, or None to train in this process.

    torchrun sets ``LOCAL_RANK`` in its workers, which is how a worker knows not to
    launch again.
    """
    if "LOCAL_RANK" in environ:
        return None
    nproc = int(environ.get(contract.PET_NPROC_PER_NODE, "1") or 1)
    nnodes = int(environ.get(contract.PET_NNODES, "1") or 1)
    if nproc <= 1 and nnodes <= 1:
        return None
    # torchrun takes --nnodes, --nproc-per-node, --node-rank, --master-addr and
    # --master-port from the PET_* variables; only the module is named here.
    return [sys.executable, "-m", "torch.distributed.run", "--module", "kubetrain_trainer"]
