"""`make bench` cannot rot: a smoke run of benchmarks.run on tiny sizes writes the JSON and PNG, with every ratio
finite and positive. Timing values are not asserted (they mean nothing at these sizes); what is checked against
independent arithmetic is what does not depend on the machine: the bytes saved for backward, the FLOPs ratio,
the paper's 9B-A1B overhead, and the agreement of the contenders' losses."""
from __future__ import annotations

import json
import math

import pytest

from benchmarks import run
from benchmarks.rss_probe import measure_in_subprocess


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_smoke_run(tmp_path):
    """One smoke run (one test, so that pytest-xdist's workers do not each run it), three checks."""
    assert run.main(["--smoke", "--out", str(tmp_path)]) == 0
    smoke = tmp_path, json.loads((tmp_path / "latest.json").read_text())
    check_json_and_png(smoke)
    check_op_ratios_finite_and_positive(smoke)
    check_step_and_paper_table(smoke)


def check_json_and_png(smoke):
    out, result = smoke
    assert result["mode"] == "smoke"
    stamped = sorted(out.glob("bench-*.json"))
    assert len(stamped) == 1 and json.loads(stamped[0].read_text()) == result
    png = (out / "latest.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) < 200_000
    env = result["environment"]
    for key in ("cpu_model", "cpu_cores", "torch", "python", "date_utc", "git_commit"):
        assert env[key], key


def check_op_ratios_finite_and_positive(smoke):
    (shape,) = smoke[1]["op"]["shapes"]
    n, d, vocab = shape["n"], shape["d"], shape["vocab"]
    ratios = shape["ratios"]
    for key in ("flops_ratio", "nitp_over_ntp_time", "nitp_over_ntp_time_paired", "nitp_over_ntp_saved_bytes",
                "nitp_over_best_ntp_time", "naive_nitp_over_nitp_time", "naive_ntp_over_flce_time"):
        assert _positive(ratios[key]), (key, ratios[key])
    assert ratios["flops_ratio"] == pytest.approx(1 + 12 * d / vocab)
    methods = shape["methods"]
    assert "Triton" in methods["liger_flce"]["skipped"]
    for name in ("naive_ntp", "ours_ntp", "naive_nitp", "ours_nitp"):
        times = methods[name]["time_ms_all"]
        assert len(times) >= 5 and all(_positive(t) for t in times)
    # the fused op keeps exactly its gradient buffers (fp32): d hidden, d lm_weight (+ the projector's 12 d^2)
    flce, nitp = methods["ours_ntp"]["saved_new_bytes"], methods["ours_nitp"]["saved_new_bytes"]
    assert 4 * (n * d + vocab * d) <= flce <= 4 * (n * d + vocab * d) + 2**20
    assert 4 * (n * d + vocab * d + 12 * d * d) <= nitp <= 4 * (n * d + vocab * d + 12 * d * d) + 2**20
    assert methods["naive_ntp"]["saved_new_bytes"] >= 4 * n * vocab  # the materialised logits
    assert all(check["agree"] for check in shape["loss_check"].values()) and set(shape["loss_check"]) == {"ntp", "nitp"}


def check_step_and_paper_table(smoke):
    (config,) = smoke[1]["step"]["configs"]
    for key in ("nitp_over_ntp_time", "overhead_full_count", "overhead_paper_formula", "mfu_ntp"):
        assert _positive(config["ratios"][key]), key
    for objective in ("ntp", "nitp"):
        assert _positive(config["objectives"][objective]["tokens_per_s"])
    rows = {row["preset"]: row for row in smoke[1]["paper_table"]}
    assert len(rows) == 6 and all(_positive(r["full_count"]["overhead"]) for r in rows.values())
    # DESIGN.md Appendix B: 9B-A1B, 72 d^2 + 18 d over 24 (18 d^2 + 18·9·d·640) + 6·152064·d at d = 1280
    d = 1280
    expected = (72 * d * d + 18 * d) / (24 * (18 * d * d + 18 * 9 * d * 640) + 6 * 152064 * d)
    assert rows["moe-9b-a1b"]["paper_formula"]["overhead"] == pytest.approx(expected, rel=1e-9)
    assert rows["moe-9b-a1b"]["full_count"]["overhead"] < expected


def test_fresh_process_peak_rss():
    record = measure_in_subprocess("naive_ntp", 512, 32, 2000, 128, timeout_s=120)
    # logits, their log-softmax and gradient: at least two N x V fp32 buffers live at the peak
    assert record.get("peak_rss_extra_bytes", 0) >= 2 * 4 * 512 * 2000, record


@pytest.mark.parametrize("argv,message", [
    (["--reps", "3"], "--reps must be >= 5"),
    (["--quick", "--smoke"], "exclude each other"),
    (["--only", "everything"], "invalid choice"),
    (["--n", "0"], "must be positive"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(argv)
    assert message in capsys.readouterr().err
