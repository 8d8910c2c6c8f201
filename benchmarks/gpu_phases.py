"""The GPU check's look inside our chunk loop: a chunk-size sweep and a per-phase time breakdown.

    python -m benchmarks.gpu_phases --out FILE [--dry-run] [--budget-s S]

Adds two entries to gpu_check.json (written by `python -m benchmarks.gpu_check methods` before):

chunk_sweep: ours_nitp and ours_ntp at the sweep shape (d=1280, N=16384, V=152064, bf16) with chunk_size 256 ...
    4096 rows and with the op's default, measured as the methods are (median fwd+bwd ms, peak MiB). Where
    nitp_kernels.default_chunk_size exists, the default it picks for this shape is reported with it.

phases: the operations one chunk of the loop performs, each timed ALONE with CUDA events (median of phase_reps
    runs after phase_warmup runs) at one chunk's shape: the logits GEMM, the CE kernel, the d hidden GEMM, the
    d lm_weight GEMM (as the loop does it today, a fresh fp32 product added into the buffer, and in place with
    torch.addmm(out_dtype=fp32, out=buffer) where torch has it), and the NITP part (projector forward, the NITP
    loss kernel, projector backward, its weight gradients). Isolated timings, not a profile of the loop: their
    sum times the number of chunks is set beside the measured fwd+bwd of ours_nitp, the rest being what the
    loop adds (casts, reductions, launches, Python).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks.gpu_check import DTYPES, MiB, check_device, method_options
from benchmarks.gpu_report import Report, Settings, first_line, settings_for
from benchmarks.harness import cuda_peak_delta, median, time_interleaved, time_once
from benchmarks.methods import IGNORE_INDEX, OpInputs, make_inputs
from nitp_kernels import fused_linear_cross_entropy, fused_nitp_loss


def public_default_chunk(n: int, d: int, vocab: int, dtype: torch.dtype) -> tuple[int | None, str]:
    """(rows, how it was found): nitp_kernels.default_chunk_size where this version has it."""
    import nitp_kernels

    rule = getattr(nitp_kernels, "default_chunk_size", None)
    if rule is None:
        return None, "nitp_kernels.default_chunk_size does not exist in this version"
    try:
        return int(rule(n, d, vocab, dtype)), "nitp_kernels.default_chunk_size(n_rows, d_model, vocab, dtype)"
    except Exception as err:  # a changed signature must not cost the sweep
        return None, f"nitp_kernels.default_chunk_size failed: {first_line(err)}"


def run_sweep(settings: Settings, device: torch.device, deadline: float, log: Callable[[str], None]) -> dict:
    d, n = settings.sweep_shape
    dtype = DTYPES[settings.dtype]
    x = make_inputs(n, d, settings.vocab, seq_len=settings.seq_len, device=str(device), dtype=dtype)
    default, source = public_default_chunk(n, d, settings.vocab, dtype)
    backend = method_options(device)["backend"]
    entries = []
    for method in ("ours_nitp", "ours_ntp"):
        for chunk in (*settings.sweep_chunks, None):
            entry = {"method": method, "chunk_size": "default" if chunk is None else chunk, "ms": None,
                     "peak_mib": None, "status": "ok"}
            entries.append(entry)
            if time.monotonic() > deadline:
                entry["status"] = "unavailable: not measured: this part's time budget was spent"
                continue
            if method == "ours_nitp":
                def step(chunk=chunk) -> None:
                    fused_nitp_loss(x.hidden, x.lm_weight, x.labels, x.shallow, x.projector, seq_len=x.seq_len,
                                    chunk_size=chunk, backend=backend).loss.backward()
            else:
                def step(chunk=chunk) -> None:
                    fused_linear_cross_entropy(x.hidden, x.lm_weight, x.labels, chunk_size=chunk,
                                               backend=backend).backward()
            try:
                times = time_interleaved({method: step}, warmup=settings.warmup, reps=settings.reps, device=device,
                                         before_each=x.clear_grads)[method]
                entry["ms"] = round(median(times), 4)
                x.clear_grads()
                if device.type == "cuda":
                    entry["peak_mib"] = round(cuda_peak_delta(step, device)["peak_extra_bytes"] / MiB, 1)
            except torch.cuda.OutOfMemoryError:
                entry["status"] = "oom"
            except Exception as err:
                entry["status"] = f"error: {first_line(err)}"
            finally:
                x.clear_grads()
            log(f"sweep {method:10s} chunk {entry['chunk_size']!s:>7s}: "
                + (f"{entry['ms']:10.3f} ms  peak {entry['peak_mib'] or '-'} MiB" if entry["status"] == "ok"
                   else entry["status"][:150]))
    return {"d": d, "V": settings.vocab, "N": n, "dtype": settings.dtype, "default_chunk_size": default,
            "default_chunk_source": source, "entries": entries}


def _product_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result from low-precision operands, as the chunk loop forms it (CPU: upcast first)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def phase_ops(x: OpInputs, chunk: int, device: torch.device) -> dict[str, tuple[str, Callable[[], object] | str]]:
    """name -> (what it is, a closure running it once, or the reason it cannot run here)."""
    from nitp_kernels.kernels.cross_entropy import cross_entropy_rows
    from nitp_kernels.kernels.nitp_rows import nitp_rows
    from nitp_kernels.kernels.swiglu import swiglu_backward, swiglu_forward

    low = x.hidden.dtype
    with torch.no_grad():
        h = x.hidden[:chunk].detach()
        w = x.lm_weight.detach()
        labels = x.labels[:chunk]
        target = x.shallow[1:chunk + 1].detach()
        valid = labels != IGNORE_INDEX
        w_gate, w_up, w_down = (p.detach() for p in x.projector.parameters())
        w_gate_up = torch.cat((w_gate, w_up), dim=0)
        scale = torch.full((), 1.0 / max(1, x.labels.numel()), dtype=torch.float32, device=device)
        logits = h @ w.T
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=device)
        grad_gate_up = torch.zeros(w_gate_up.shape, dtype=torch.float32, device=device)
        grad_down = torch.zeros(w_down.shape, dtype=torch.float32, device=device)
    vocab, d = w.shape
    width = w_gate.shape[0]

    def ce_kernel() -> None:  # writes d logits over the logits; running it again on them costs the same
        cross_entropy_rows(logits, labels, ignore_index=IGNORE_INDEX, label_smoothing=0.0, softcap=None,
                           z_loss_weight=0.0, ce_scale=scale, z_scale=scale, need_grad=True)

    def dw_inplace() -> None:
        torch.addmm(grad_w, logits.T, h, out_dtype=torch.float32, out=grad_w)

    def nitp_part() -> None:
        gate_up = _product_fp32(h, w_gate_up.T)
        g = swiglu_forward(gate_up).to(low)
        pred = _product_fp32(g, w_down.T)
        _, d_pred, _ = nitp_rows(pred, target, valid, loss_type="cosine", scale=scale, need_grad=True,
                                 need_target_grad=False)
        d_pred = d_pred.to(low)
        d_gate_up = swiglu_backward(_product_fp32(d_pred, w_down), gate_up).to(low)
        _product_fp32(d_gate_up, w_gate_up)  # d hidden from NITP
        grad_down.add_(_product_fp32(d_pred.T, g))
        grad_gate_up.add_(_product_fp32(d_gate_up.T, h))

    cuda_only = "torch.addmm(out_dtype=...) is CUDA-only"
    return {
        "logits_gemm": (f"h_chunk @ lm_weight.T: ({chunk}, {d}) x ({d}, {vocab}), {low} out",
                        lambda: torch.mm(h, w.T, out=logits)),
        "ce_kernel": (f"cross_entropy_rows over ({chunk}, {vocab}) logits, gradient written over them", ce_kernel),
        "dh_gemm": (f"d_logits @ lm_weight: ({chunk}, {vocab}) x ({vocab}, {d}), fp32 out",
                    lambda: _product_fp32(logits, w)),
        "dw_gemm_fresh_then_add": (f"grad_w += fp32 product d_logits.T @ h_chunk ({vocab} x {d}), as the loop "
                                   "does it today (a fresh V x d fp32 tensor, then an add)",
                                   lambda: grad_w.add_(_product_fp32(logits.T, h))),
        "dw_gemm_inplace": (f"torch.addmm(grad_w, d_logits.T, h_chunk, out_dtype=fp32, out=grad_w) ({vocab} x {d})",
                            dw_inplace if device.type == "cuda" else cuda_only),
        "nitp_part": (f"NITP of one chunk, cosine, H={width}: 6 GEMMs + swiglu fwd/bwd + nitp_rows, weight "
                      "gradients added into fp32 buffers", nitp_part),
    }


def run_phases(settings: Settings, device: torch.device, chunk: int, chunk_source: str,
               measured_ms: float | None, log: Callable[[str], None]) -> dict:
    d, n = settings.sweep_shape
    x = make_inputs(n, d, settings.vocab, seq_len=settings.seq_len, device=str(device), dtype=DTYPES[settings.dtype])
    chunk = min(chunk, n - 1)  # the NITP target rows t + 1 must exist
    n_chunks = math.ceil(n / chunk)
    phases = []
    for name, (what, op) in phase_ops(x, chunk, device).items():
        entry = {"name": name, "op": what, "ms_per_chunk": None, "status": "ok"}
        phases.append(entry)
        if isinstance(op, str):
            entry["status"] = f"unavailable: {op}"
        else:
            try:
                for _ in range(settings.phase_warmup):
                    op()
                entry["ms_per_chunk"] = round(median([time_once(op, device) for _ in range(settings.phase_reps)]), 5)
            except Exception as err:  # a launcher whose signature changed: say so, time the rest
                entry["status"] = f"error: {first_line(err)}"
        log(f"phase {name:24s} " + (f"{entry['ms_per_chunk']:9.4f} ms/chunk  x {n_chunks} chunks"
                                    if entry["status"] == "ok" else entry["status"][:150]))
    today = ("logits_gemm", "ce_kernel", "dh_gemm", "dw_gemm_fresh_then_add", "nitp_part")
    per_chunk = [p["ms_per_chunk"] for p in phases if p["name"] in today]
    estimate = n_chunks * sum(per_chunk) if all(v is not None for v in per_chunk) else None
    return {"d": d, "V": settings.vocab, "N": n, "dtype": settings.dtype, "chunk_size": chunk,
            "chunk_source": chunk_source, "n_chunks": n_chunks, "phase_warmup": settings.phase_warmup,
            "phase_reps": settings.phase_reps,
            "note": ("isolated timings: each operation of one chunk run alone (CUDA events; wall clock on a CPU) at "
                     "this chunk's shape, median of phase_reps runs after phase_warmup runs; not a profile of the loop"),
            "phases": phases, "sum_of_phases_times_chunks_ms": estimate, "measured_ours_nitp_ms": measured_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU check: chunk-size sweep and per-phase breakdown")
    parser.add_argument("--out", type=Path, required=True, help="gpu_check.json, written by the methods part")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes; on a CPU through Triton's interpreter")
    parser.add_argument("--budget-s", type=float, default=35.0, help="start no sweep point after this many s")
    args = parser.parse_args(argv)
    settings = settings_for(args.dry_run)
    device = check_device(args.dry_run)
    report = Report.load(args.out) if args.out.exists() else Report.fresh(args.out, {})
    log = lambda line: print(line, flush=True)  # noqa: E731
    sweep = run_sweep(settings, device, time.monotonic() + args.budget_s, log)
    report.data["chunk_sweep"] = sweep
    report.save()
    # the phases at the chunk the op uses by default: the public rule's, else the measured best of the sweep
    measured = {e["chunk_size"]: e["ms"] for e in sweep["entries"] if e["method"] == "ours_nitp" and e["ms"]}
    if sweep["default_chunk_size"]:
        chunk, source, key = sweep["default_chunk_size"], sweep["default_chunk_source"], "default"
    elif any(isinstance(k, int) for k in measured):
        chunk = key = min((k for k in measured if isinstance(k, int)), key=measured.get)
        source = "the fastest chunk of the sweep (" + sweep["default_chunk_source"] + ")"
    else:
        chunk, source, key = settings.sweep_chunks[0], "the sweep's first chunk (nothing was measured)", None
    report.data["phases"] = run_phases(settings, device, chunk, source, measured.get(key), log)
    report.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
