"""One op-level method, once, in a fresh process: its peak resident memory above the process's own baseline.

    python -m benchmarks.rss_probe --method ours_nitp --n 2048 --d 512 --vocab 32000 [--seq-len 1024]

Prints one JSON object. The inputs are made first (they are not counted); a method that compiles (see
methods.COMPILED_METHODS) is run once before at the same shape, so the compiler's own memory is not counted
either, and any other method once on small inputs (one-time library set-up); then one forward + backward runs
and its peak above the resident set just before it is reported.
`measure_in_subprocess` is what the op benchmark calls.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def probe(method: str, n: int, d: int, vocab: int, seq_len: int) -> dict:
    import torch

    from benchmarks.harness import peak_rss_delta
    from benchmarks.methods import COMPILED_METHODS, build_method, make_inputs

    x = make_inputs(n, d, vocab, seq_len=seq_len)
    fn = build_method(method, x)

    def step() -> None:
        fn().backward()

    if method in COMPILED_METHODS:
        step()
        x.clear_grads()
    else:  # one-time set-up (thread pools, allocator arenas) on small inputs, so that it is not counted
        small = make_inputs(64, 16, 256, seq_len=32)
        build_method(method, small)().backward()
        del small
    gc.collect()
    record = peak_rss_delta(step)
    record.update(method=method, threads=torch.get_num_threads(), warmed_up=method in COMPILED_METHODS)
    return record


def measure_in_subprocess(method: str, n: int, d: int, vocab: int, seq_len: int, timeout_s: float = 900) -> dict:
    """Run `probe` in a fresh interpreter; {"error": ...} when it fails or runs past timeout_s."""
    command = [sys.executable, "-m", "benchmarks.rss_probe", "--method", method, "--n", str(n), "--d", str(d),
               "--vocab", str(vocab), "--seq-len", str(seq_len)]
    import torch

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the parent's thread count
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=REPO, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--d", type=int, required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--seq-len", type=int, default=1024)
    args = parser.parse_args(argv)
    from benchmarks.methods import MethodSkipped

    try:
        record = probe(args.method, args.n, args.d, args.vocab, args.seq_len)
    except MethodSkipped as err:
        record = {"method": args.method, "skipped": str(err)}
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
