"""A stage's loop under torchrun, without Ray: one process per rank, checkpoints in a shared run folder.

    torchrun --nproc-per-node N -m raytrain.torchrun STAGE [--config PRESET|FILE] [key=value ...]
"""

from __future__ import annotations

import sys

from raytrain.config import load_config
from raytrain.stages import get_stage
from raytrain.train.local import run_local


def main(argv: list[str]) -> None:
    stage, *rest = argv
    source = rest[rest.index("--config") + 1] if "--config" in rest else "demo"
    run_local(load_config(source, [item for item in rest if "=" in item]), get_stage(stage))


if __name__ == "__main__":
    main(sys.argv[1:])
