"""Op benchmark for one GPU: our fused ops against Liger's FLCE, Cut Cross-Entropy and the naive paths.

    PYTHONPATH=. python3 benchmarks/gpu_op_bench.py [--n 8192 16384] [--d 1280] [--vocab 152064] [--out FILE]

Per method and N: median wall time of forward + backward over --repeats runs (CUDA events, after --warmup
runs), and torch.cuda.max_memory_allocated during one forward + backward above what was allocated before it
(inputs and weights excluded; the gradients it produces included). Every method runs side by side in this one
process, on the same inputs. The JSON file is rewritten after every measurement, so a run cut short keeps what
it measured. A method that cannot run here (package missing, out of memory) is recorded with its error.

Methods
  nitp_fused       fused_nitp_loss (cosine, projector H = 4d, backend "auto": triton on CUDA)
  flce_ours        fused_linear_cross_entropy (backend "auto")
  liger_flce       liger_kernel's LigerFusedLinearCrossEntropyLoss
  cce              cut_cross_entropy.linear_cross_entropy (its default impl and gradient filter)
  naive_ce         logits = h @ W^T materialised, F.cross_entropy in fp32
  naive_nitp       fused_nitp_loss(backend="reference"): logits and projector activations materialised

The check printed at the end is the issue's target at the largest N:
  fused_nitp_loss time <= 1.1 * (1 + 12 d / V) * fused_linear_cross_entropy time
(12 d / V is the NITP head's FLOPs, 72 d^2 per token, over the LM head's 6 V d.)

`--device cpu --n 64 --d 32 --vocab 1000` runs the same code on the CPU (backend "auto" is then "torch"),
which is how CI checks that this script works without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere inside the repository

from nitp_kernels import NITPProjector, fused_linear_cross_entropy, fused_nitp_loss  # noqa: E402

METHODS = ("nitp_fused", "flce_ours", "liger_flce", "cce", "naive_ce", "naive_nitp")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="fused NITP / FLCE op benchmark (one GPU)")
    parser.add_argument("--n", type=int, nargs="+", default=[8192, 16384], help="token counts N")
    parser.add_argument("--d", type=int, default=1280, help="model width d")
    parser.add_argument("--vocab", type=int, default=152064, help="vocabulary size V")
    parser.add_argument("--seq-len", type=int, default=4096, help="sequence length T (N must be a multiple)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per method (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (compilation, autotuning)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default: $OUT/gpu_op_bench.json, else benchmarks/results/)")
    args = parser.parse_args(argv)
    for name in ("d", "vocab", "seq_len", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    for n in args.n:
        if n < 1 or n % min(args.seq_len, n):
            parser.error(f"--n {n} must be >= 1 and a multiple of --seq-len {args.seq_len} (or smaller than it)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available here (use --device cpu for a smoke run)")
    if args.out is None:
        folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
        args.out = folder / "gpu_op_bench.json"
    return args


def make_inputs(n: int, args: argparse.Namespace, seed: int = 0) -> dict:
    """hidden, shallow (n, d), lm_weight (V, d), labels (n,), a projector: leaf tensors requiring grad."""
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype).requires_grad_()

    labels = torch.randint(0, args.vocab, (n,), generator=gen).to(device)
    labels[::97] = -100  # a few ignored positions, as real packed batches have
    projector = NITPProjector(args.d, device=device, dtype=dtype)
    return {"hidden": randn(n, args.d), "shallow": randn(n, args.d),
            "lm_weight": randn(args.vocab, args.d, scale=args.d ** -0.5), "labels": labels,
            "projector": projector, "seq_len": min(args.seq_len, n)}


def method_fn(name: str, x: dict) -> Callable[[], torch.Tensor]:
    """A closure computing the scalar loss of one method on inputs x (imports the competitor lazily)."""
    h, w, labels = x["hidden"], x["lm_weight"], x["labels"]
    if name == "nitp_fused":
        return lambda: fused_nitp_loss(h, w, labels, x["shallow"], x["projector"], seq_len=x["seq_len"]).loss
    if name == "naive_nitp":
        return lambda: fused_nitp_loss(h, w, labels, x["shallow"], x["projector"], seq_len=x["seq_len"],
                                       backend="reference").loss
    if name == "flce_ours":
        return lambda: fused_linear_cross_entropy(h, w, labels)
    if name == "naive_ce":
        return lambda: F.cross_entropy((h @ w.T).float(), labels)
    if name == "liger_flce":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss()
        return lambda: loss_fn(w, h, labels)
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda: linear_cross_entropy(h, w, labels)
    raise ValueError(f"unknown method {name!r}")


def _clear_grads(x: dict) -> None:
    for tensor in (x["hidden"], x["shallow"], x["lm_weight"], *x["projector"].parameters()):
        tensor.grad = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], torch.Tensor], x: dict, args: argparse.Namespace) -> dict:
    """Median fwd+bwd time (ms) over the repeats and the peak extra memory (bytes) of one fwd+bwd."""
    device = torch.device(args.device)
    for _ in range(args.warmup):
        _clear_grads(x)
        fn().backward()
    _clear_grads(x)
    _sync(device)
    times = []
    for _ in range(args.repeats):
        _clear_grads(x)
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = fn()
            loss.backward()
            stop.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(stop))
        else:
            began = time.perf_counter()
            loss = fn()
            loss.backward()
            times.append(1e3 * (time.perf_counter() - began))
    record = {"time_ms_median": statistics.median(times), "time_ms_all": times, "loss": float(loss.detach())}
    _clear_grads(x)
    del loss
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn().backward()
        torch.cuda.synchronize(device)
        record["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        record["peak_extra_bytes"] = record["max_memory_allocated_bytes"] - base
        _clear_grads(x)
    return record


def environment(args: argparse.Namespace) -> dict:
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "device": args.device, "dtype": args.dtype, "d": args.d, "vocab": args.vocab, "seq_len": args.seq_len,
           "repeats": args.repeats, "warmup": args.warmup}
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(args.device))
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    for package in ("liger_kernel", "cut_cross_entropy"):
        try:
            from importlib.metadata import version

            env[package] = version(package.replace("_", "-"))
        except Exception as err:  # not installed: the method records its own error too
            env[package] = f"unavailable ({type(err).__name__})"
    return env


def nitp_check(results: list[dict], d: int, vocab: int) -> dict | None:
    """The issue's target at the largest N measured for both fused ops, or None if one is missing."""
    by_key = {(r["n"], r["method"]): r for r in results if "time_ms_median" in r}
    ns = [n for n in sorted({r["n"] for r in results}) if (n, "nitp_fused") in by_key and (n, "flce_ours") in by_key]
    if not ns:
        return None
    n = ns[-1]
    factor = 1.1 * (1.0 + 12.0 * d / vocab)
    nitp, flce = by_key[(n, "nitp_fused")]["time_ms_median"], by_key[(n, "flce_ours")]["time_ms_median"]
    return {"n": n, "nitp_ms": nitp, "flce_ms": flce, "ratio": nitp / flce, "bound": factor,
            "passed": nitp <= factor * flce}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(args), "results": [], "check": None}

    def save() -> None:
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(args.out)

    save()
    for n in args.n:
        x = make_inputs(n, args)
        for name in args.methods:
            record = {"n": n, "method": name}
            try:
                record.update(measure(method_fn(name, x), x, args))
            except Exception as err:  # record and go on: one missing competitor must not lose the others
                record["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                _clear_grads(x)
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
            report["results"].append(record)
            save()
            shown = (f"{record['time_ms_median']:9.2f} ms  peak extra "
                     f"{record.get('peak_extra_bytes', float('nan')) / 2**20:9.1f} MiB"
                     if "time_ms_median" in record else record["error"])
            print(f"N={n:6d} {name:11s} {shown}", flush=True)
        del x
    report["check"] = nitp_check(report["results"], args.d, args.vocab)
    save()
    check = report["check"]
    if check is None:
        print("check: not evaluated (fused_nitp_loss or fused_linear_cross_entropy did not run)")
    else:
        print(f"check N={check['n']}: fused_nitp_loss {check['nitp_ms']:.2f} ms <= {check['bound']:.3f} x "
              f"fused_linear_cross_entropy {check['flce_ms']:.2f} ms ? ratio {check['ratio']:.3f}: "
              f"{'PASS' if check['passed'] else 'FAIL'}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
