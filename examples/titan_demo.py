"""`make titan-demo`: torchtitan's llama3 debug model with NITP for 10 steps on CPU, no download.

Runs torchtitan's own Trainer (one process, gloo) on the Python standard library's source with the engine's BPE
tokenizer (prepared once into .cache/nitp-data), and prints as its last line the first and last step's CE and
NITP losses. Under torchrun it runs data parallel: `torchrun --nproc-per-node 2 examples/titan_demo.py`.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29533")):
        os.environ.setdefault(name, value)
    import torch
    from torchtitan.tools.logging import init_logger

    from examples.titan_nitp import llama3_debug_nitp_cpu

    init_logger()

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
    start = time.perf_counter()
    trainer = llama3_debug_nitp_cpu().build()
    try:
        trainer.train()
    finally:
        trainer.close()
    history = trainer.nitp_history
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if int(os.environ["RANK"]) != 0:
        return
    first, last = history[0], history[-1]
    print(f"titan-demo: {len(history)} steps, {time.perf_counter() - start:.1f} s including the Trainer's set-up "
          "(and the corpus preparation, on a first run)")
    print(f"titan-demo: ce {first['ce']:.4f} -> {last['ce']:.4f}, nitp {first['nitp']:.4f} -> {last['nitp']:.4f}")
    if not (last["ce"] < first["ce"] and last["nitp"] < first["nitp"]):
        sys.exit("titan-demo: a loss did not fall")


if __name__ == "__main__":
    main()
