"""benchmarks/gpu_op_bench.py works without a GPU: argument handling, and a tiny CPU run of the same code.

The GPU numbers come from benchmarks/gpu_check.sh on a GPU machine; here the script is run with --device cpu on
tiny sizes (backend "auto" is then "torch"), and its reported losses are checked against each other: the fused
ops and the naive materialised paths are independent implementations of the same losses.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_op_bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_op_bench", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv,message", [
    (["--n", "100", "--seq-len", "64", "--device", "cpu"], "multiple of --seq-len"),
    (["--d", "0", "--device", "cpu"], "--d must be >= 1"),
    (["--methods", "tf32_magic", "--device", "cpu"], "invalid choice"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of --device cuda without CUDA")
def test_cuda_device_refused_without_cuda(capsys):
    with pytest.raises(SystemExit):
        load_bench().parse_args([])
    assert "CUDA is not available" in capsys.readouterr().err


def test_tiny_cpu_run_writes_json_and_losses_agree(tmp_path):
    bench = load_bench()
    out = tmp_path / "bench.json"
    methods = ["nitp_fused", "flce_ours", "naive_ce", "naive_nitp"]
    assert bench.main(["--device", "cpu", "--dtype", "fp32", "--n", "16", "--d", "8", "--vocab", "50",
                       "--seq-len", "8", "--repeats", "1", "--warmup", "0", "--out", str(out),
                       "--methods", *methods]) == 0
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert sorted(rows) == sorted(methods) and all(r["time_ms_median"] > 0 for r in rows.values())
    assert rows["flce_ours"]["loss"] == pytest.approx(rows["naive_ce"]["loss"], rel=1e-5)
    assert rows["nitp_fused"]["loss"] == pytest.approx(rows["naive_nitp"]["loss"], rel=1e-5)
    check = report["check"]
    assert check["n"] == 16 and check["bound"] == pytest.approx(1.1 * (1 + 12 * 8 / 50))
    assert check["passed"] == (check["nitp_ms"] <= check["bound"] * check["flce_ms"])
    assert report["environment"]["device"] == "cpu"


def test_failing_method_is_recorded_not_fatal(tmp_path, monkeypatch):
    bench = load_bench()

    def broken(name, x):
        raise ImportError(f"{name} is not installed here")

    monkeypatch.setattr(bench, "method_fn", broken)
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--dtype", "fp32", "--n", "8", "--d", "4", "--vocab", "9",
                       "--methods", "cce", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["results"] == [{"n": 8, "method": "cce", "error": "ImportError: cce is not installed here"}]
    assert report["check"] is None
