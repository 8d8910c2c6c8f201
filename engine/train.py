"""NITP pre-training entry point.

    python engine/train.py --preset tiny --out runs/demo            # one process (CPU or GPU)
    python -m engine.train --preset tiny --objective ntp
    torchrun --nproc_per_node=8 engine/train.py --preset dense-0.5b  # FSDP2 over 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        engine/train.py --preset moe-9b-a1b                          # many nodes

Every config field is a flag (``--field-name value``); see engine/config.py. Every flag is checked
before any data or model work; an error is one line on stderr (NITP_TRACEBACK=1 shows the
traceback). Checkpoints:

    python engine/train.py --preset tiny --out runs/demo --ckpt-every 100   # + at the end of the run
    python engine/train.py --preset tiny --out runs/demo --resume auto     # continue the newest one
    python engine/train.py --preset tiny --init-from-hf HF_DIR             # start from a HF checkpoint
    python -m engine.export runs/demo runs/demo-hf                        # -> AutoModelForCausalLM
"""

import os
import sys

# OpenMP threads that busy-wait at every op's barrier collapse throughput when the cores are
# shared (measured on a loaded 2-core box: 125 tokens/s spinning, ~900 passive, 1090 one thread).
# Must be set before torch loads libgomp; an explicit setting by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import logging  # noqa: E402

from engine.cli import cli_errors  # noqa: E402
from engine.config import parse_cli  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    # torchrun announces the world size in the environment: validate against it before any work.
    cfg = parse_cli(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    # the data pipeline reports preparation, cache hits and skipped files through logging: rank 0 shows them
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(message)s")
    # every library error (bad data, an unusable checkpoint or HF folder, a full disk) is one line
    with cli_errors():
        # heavy imports only after the flags are known to be valid; build_state checks the machine and paths
        from engine.trainer import run

        run(cfg)


if __name__ == "__main__":
    main()
