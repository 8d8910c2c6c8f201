"""The one-shot GPU check cannot break unseen: `bash benchmarks/gpu_check.sh --dry-run` runs the same script at
tiny shapes here (our ops and Liger's kernels through Triton's interpreter), and its JSON is checked: the schema,
every method at every shape, the gradient errors against the fp32 reference, the goal rows, the chunk sweep and
the phase breakdown. Timings are not asserted (they mean nothing here); the gradient errors are, against bounds
that a wrong gradient (a missing term, a wrong scale) breaks by orders of magnitude.
The bookkeeping that a CPU run does not reach (priority order, resume, the goal's arithmetic, the verdict) is
checked directly on synthetic records.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check, gpu_summary
from benchmarks.gpu_report import (DRY_RUN, GOAL_METHODS, GPU, GPU_CHECK_METHODS, LOSS_TYPE_METHODS, RECORD_KEYS,
                                   Report, job_list, poisons_cuda, record)

REPO = Path(__file__).resolve().parents[1]
STATUS = re.compile(r"^(ok|oom|unavailable: .+|error: .+)$")


def test_dry_run(tmp_path):
    """One run of the script (one test, so that pytest-xdist's workers do not each run it), four checks."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    dry_run = tmp_path, json.loads((tmp_path / "gpu_check.json").read_text()), done.stdout
    check_schema(dry_run)
    check_every_method_with_a_cpu_path_measured(dry_run)
    check_gradient_errors_against_the_fp32_reference(dry_run)
    check_goal_sweep_phases_and_parts(dry_run)


def check_schema(dry_run):
    out, report, stdout = dry_run
    assert {p.name for p in out.iterdir()} == {"gpu_check.json", "gpu_check.log", "gpu_tests.log", "gpu_tests.xml"}
    env = report["environment"]
    for key in ("gpu", "driver", "torch", "triton", "python", "commit", "settings", "dry_run"):
        assert key in env, key
    assert env["dry_run"] is True and env["torch"] and env["triton"] and env["python"]
    records = report["records"]
    assert all(tuple(r) == RECORD_KEYS and STATUS.match(r["status"]) for r in records), records
    want = {(m, d, n) for m in GPU_CHECK_METHODS if m not in LOSS_TYPE_METHODS for d, n in DRY_RUN.shapes}
    want |= {(m, *DRY_RUN.error_shape) for m in LOSS_TYPE_METHODS}
    assert {(r["method"], r["d"], r["N"]) for r in records} == want and len(records) == len(want)
    assert all(r["V"] == DRY_RUN.vocab and r["dtype"] == "bf16" for r in records)
    assert "GOAL" in stdout and "gpu_check: clean" in stdout


def check_every_method_with_a_cpu_path_measured(dry_run):
    records = dry_run[1]["records"]
    for r in records:
        if r["method"] == "cce":  # a Triton kernel with bf16 tl.dot: no CPU path
            assert r["status"].startswith("unavailable: no CPU path"), r
            continue
        if r["method"] == "cce_kahan_full_c":  # the version check comes first: it holds on a GPU too
            assert re.match(r"unavailable: (cut-cross-entropy [^ ]+ has no impl 'cce_kahan_full_c'|no CPU path)",
                            r["status"]), r
            continue
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["peak_mib"] is None  # peak memory is a CUDA figure


def check_gradient_errors_against_the_fp32_reference(dry_run):
    """Where measured (one shape), bf16 gradients sit at bf16's rounding of the fp32 reference: ours and the
    naive path round once (<= 5e-3), the others keep bf16 logits or gradients in between (<= 2e-2). A gradient
    without its NITP term, or scaled by a wrong 1/N, is off by more than 1e-1."""
    d, n = DRY_RUN.error_shape
    for r in dry_run[1]["records"]:
        if r["status"] != "ok":
            continue
        if (r["d"], r["N"]) != (d, n):
            assert r["grad_rel_err"] is None, r
            continue
        errors = r["grad_rel_err"]
        assert set(errors) == {"hidden", "lm_weight"}, r
        bound = 5e-3 if r["method"].startswith("ours_") or r["method"] == "naive_ntp" else 2e-2
        assert all(math.isfinite(e) and 0 <= e <= bound for e in errors.values()), r


def check_goal_sweep_phases_and_parts(dry_run):
    report = dry_run[1]
    assert [(g["d"], g["N"]) for g in report["goal"]] == DRY_RUN.shapes
    for row in report["goal"]:
        assert row["time_ours_nitp_over_liger_flce"] > 0 and row["peak_ours_nitp_over_liger_flce_fp32"] is None
    sweep = report["chunk_sweep"]
    assert (sweep["d"], sweep["N"]) == DRY_RUN.sweep_shape
    assert [(e["method"], e["chunk_size"]) for e in sweep["entries"]] == [
        (m, c) for m in ("ours_nitp", "ours_ntp") for c in (*DRY_RUN.sweep_chunks, "default")]
    assert all(e["status"] == "ok" and e["ms"] > 0 for e in sweep["entries"]), sweep
    phases = {p["name"]: p for p in report["phases"]["phases"]}
    assert set(phases) == {"logits_gemm", "ce_kernel", "dh_gemm", "dw_gemm_fresh_then_add", "dw_gemm_inplace",
                           "nitp_part"}
    assert phases.pop("dw_gemm_inplace")["status"].startswith("unavailable: torch.addmm(out_dtype")
    assert all(p["status"] == "ok" and p["ms_per_chunk"] > 0 for p in phases.values()), phases
    assert report["phases"]["sum_of_phases_times_chunks_ms"] > 0
    assert report["parts"] == {"methods": "0", "chunks": "0", "tests": "0"}
    counts = report["tests"]["counts"]
    assert counts["failed"] == counts["errors"] == 0 and counts["skipped"] >= 1  # no CUDA here: all skipped


def test_unknown_argument_is_refused():
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--fast"], cwd=REPO, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2 and "unknown argument '--fast'" in done.stderr


def test_jobs_put_the_goal_first_and_cover_every_method():
    jobs = job_list(GPU)
    goal_jobs = len(GOAL_METHODS) * len(GPU.shapes)
    assert {m for m, _, _ in jobs[:goal_jobs]} == set(GOAL_METHODS)
    assert {(d, n) for _, d, n in jobs[:goal_jobs]} == {(1280, 8192), (1280, 16384), (2560, 8192), (2560, 16384)}
    assert len(jobs) == len(set(jobs)) and {m for m, _, _ in jobs} == set(GPU_CHECK_METHODS)
    assert GPU.vocab == 152064 and GPU.dtype == "bf16" and GPU.sweep_chunks == (256, 512, 1024, 2048, 4096)


def test_resume_skips_recorded_jobs_and_a_poisoned_context_stops_the_run(tmp_path, monkeypatch):
    """A fresh process after a CUDA error measures only what is not recorded; an error that poisons CUDA ends
    the process with EXIT_CUDA_POISONED (on CUDA) so that the shell can start a fresh one."""
    report = Report.fresh(tmp_path / "gpu_check.json", {})
    first_job = job_list(DRY_RUN)[0]
    report.put(record(*first_job, DRY_RUN, "error: AcceleratorError: CUDA error: an illegal memory access"))
    measured = []

    def fake_measure(method, x, d, n, settings, device, reference):
        measured.append((method, d, n))
        return record(method, d, n, settings, "ok", 1.0)

    monkeypatch.setattr(gpu_check, "measure", fake_measure)
    monkeypatch.setattr(gpu_check, "make_inputs", lambda *a, **k: None)
    monkeypatch.setattr(gpu_check, "ReferenceGradients", lambda x: None)
    import torch

    assert gpu_check.run_methods(DRY_RUN, report, torch.device("cpu"), 1e9, resume=True, log=lambda s: None) == 0
    assert measured == job_list(DRY_RUN)[1:]
    saved = json.loads(report.path.read_text())["records"]
    assert len(saved) == len(job_list(DRY_RUN)) and saved[0]["status"].startswith("error: AcceleratorError")
    assert poisons_cuda(saved[0]["status"]) and not poisons_cuda("error: ImportError: no liger")
    assert not poisons_cuda("unavailable: CUDA error mentioned in a reason")


def test_goal_rows_and_verdict(tmp_path):
    report = Report.fresh(tmp_path / "r.json", {})
    d, n = GPU.shapes[0]
    for method, ms, peak in (("ours_nitp", 80.0, 900.0), ("liger_flce", 100.0, 1500.0),
                             ("liger_flce_fp32", 60.0, 1000.0)):
        report.put(record(method, d, n, GPU, "ok", ms, peak))
    rows = gpu_summary.goal_rows(report, GPU)
    assert rows[0]["time_ours_nitp_over_liger_flce"] == pytest.approx(0.8) and rows[0]["time_goal_met"] is True
    assert rows[0]["peak_ours_nitp_over_liger_flce_fp32"] == pytest.approx(0.9) and rows[0]["memory_goal_met"]
    assert rows[1]["time_goal_met"] is None and set(rows[1]["missing"]) == {"ours_nitp", "liger_flce",
                                                                          "liger_flce_fp32"}
    report.put(record("cce", d, n, GPU, "error: RuntimeError: Triton compilation failed"))
    report.put(record("naive_ntp", d, n, GPU, "unavailable: not measured: this part's time budget of 120 s was spent"))
    report.put(record("cce_kahan_full_c", d, n, GPU, "unavailable: cut-cross-entropy 25.1.1 has no impl"))
    report.data.update(parts={"methods": "0", "chunks": "124"}, tests={"counts": {"passed": 0, "failed": 1,
                                                                                   "errors": 0}})
    problems = gpu_summary.verdict(report, dry_run=False)
    assert problems == ["part chunks exit status 124", "1 records ended in an error",
                        "1 records were not measured (time budget)", "CUDA tests: 1 failed, 0 errors",
                        "no CUDA test passed"]


def test_a_failing_method_is_recorded_not_fatal(monkeypatch):
    """A competitor that raises while being built or run becomes an "error: ..." record; the run goes on."""
    import torch

    from benchmarks.methods import make_inputs

    x = make_inputs(8, 4, 16, seq_len=4, dtype=torch.bfloat16)

    def broken_build(name, inputs, **options):
        raise AttributeError("module 'cut_cross_entropy' has no attribute 'X'")

    monkeypatch.setattr(gpu_check, "build_method", broken_build)
    rec = gpu_check.measure("cce", x, 4, 8, DRY_RUN, torch.device("cpu"), None)
    assert rec["status"] == "error: AttributeError: module 'cut_cross_entropy' has no attribute 'X'"
    monkeypatch.setattr(gpu_check, "build_method", lambda name, inputs, **o: (lambda: 1 / 0))
    rec = gpu_check.measure("cce", x, 4, 8, DRY_RUN, torch.device("cpu"), None)
    assert rec["status"] == "error: ZeroDivisionError: division by zero" and rec["ms"] is None


def test_sweep_uses_the_public_default_chunk_rule_when_it_exists(monkeypatch):
    import torch

    import nitp_kernels
    from benchmarks.gpu_phases import public_default_chunk

    monkeypatch.delattr(nitp_kernels, "default_chunk_size", raising=False)
    assert public_default_chunk(16384, 1280, 152064, torch.bfloat16) == (
        None, "nitp_kernels.default_chunk_size does not exist in this version")
    monkeypatch.setattr(nitp_kernels, "default_chunk_size", lambda n, d, v, dtype: 2048 if dtype == torch.bfloat16
                        else 0, raising=False)
    assert public_default_chunk(16384, 1280, 152064, torch.bfloat16)[0] == 2048
    monkeypatch.setattr(nitp_kernels, "default_chunk_size", lambda n, d, v: 256, raising=False)  # old signature
    rows, why = public_default_chunk(16384, 1280, 152064, torch.bfloat16)
    assert rows is None and why.startswith("nitp_kernels.default_chunk_size failed: TypeError")
