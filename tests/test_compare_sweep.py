"""make compare LONG=1, end to end on the toy model: two arms x two seeds, each run its own process;
stopped runs continue when the command is run again, finished ones are read, not retrained; the
summary's means, standard deviations and paired differences recomputed from the runs' own
metrics.jsonl; bad sweep flags refused."""

import json
import statistics

import pytest

from engine.compare import main
from engine.compare_sweep import Arm, make_arms, mean_std

ARGV = ["--quick", "--long", "--seeds", "0,1", "--lambdas", "0.3", "--objectives", "ntp,nitp", "--steps", "4"]


def _run(out, folder, seed):
    config = json.loads((out / folder / f"seed{seed}" / "config.json").read_text())
    lines = (out / folder / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()
    return config, [json.loads(line) for line in lines if line.strip()]


def test_long_sweep_end_to_end_continues_after_a_stop_and_rereads_finished_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stray docs/ copy would land here
    out = tmp_path / "sweep"
    monkeypatch.setenv("NITP_DEBUG_SIGNAL_AT_STEP", "2:TERM")  # seed 0's runs are stopped after step 2 ...
    with pytest.raises(RuntimeError, match=r"2 of 2 runs failed:\n.*stopped before step 4"):
        main([*ARGV, "--seeds", "0", "--out", str(out)])
    monkeypatch.delenv("NITP_DEBUG_SIGNAL_AT_STEP")
    summary = main([*ARGV, "--out", str(out)])  # ... continued by the sweep that adds seed 1

    runs = {(folder, seed): _run(out, folder, seed) for folder in ("ntp", "nitp-0.3") for seed in (0, 1)}
    for (folder, seed), (config, records) in runs.items():
        assert config["seed"] == seed and config["objective"] == folder.split("-")[0]
        assert [r["step"] for r in records] == [1, 2, 4] and records[-1]["val_ce_full"] > 0  # log_every 2
    assert runs["nitp-0.3", 0][0]["nitp_weight"] == 0.3
    # paired: the same seed starts from the same weights on the same data, another seed does not
    first_ce = {key: records[0]["ce_loss"] for key, (_, records) in runs.items()}
    assert first_ce["ntp", 0] == first_ce["nitp-0.3", 0] != first_ce["ntp", 1]

    full = {key: records[-1]["val_ce_full"] for key, (_, records) in runs.items()}
    rank = {key: records[-1]["eff_rank_last"] for key, (_, records) in runs.items()}
    nitp = summary["arms"]["nitp λ=0.3"]
    assert nitp["mean_std"]["val_ce_full"][0] == pytest.approx(statistics.fmean([full["nitp-0.3", 0],
                                                                                 full["nitp-0.3", 1]]))
    assert nitp["mean_std"]["eff_rank_last"][1] == pytest.approx(statistics.stdev([rank["nitp-0.3", 0],
                                                                                  rank["nitp-0.3", 1]]))
    diffs = [full["nitp-0.3", s] - full["ntp", s] for s in (0, 1)]
    assert nitp["diff_to_ntp"]["val_ce_full"]["per_seed"] == pytest.approx(diffs)
    assert nitp["diff_to_ntp"]["val_ce_full_percent"]["per_seed"] == pytest.approx(
        [100 * d / full["ntp", s] for s, d in zip((0, 1), diffs)])
    assert set(nitp["phases"]) == {0, 1} and "diff_to_ntp" not in summary["arms"]["ntp"]

    md = (out / "summary.md").read_text()
    assert "| nitp λ=0.3 | 0 |" in md and "| ntp | 1 |" in md and "Paired difference to NTP" in md
    assert runs["ntp", 0][0]["data_corpus_hash"] in md
    assert (out / "compare_lambda_0.3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["files"] == ["summary.md", "summary.json", "compare_lambda_0.3.png"]
    assert not (tmp_path / "docs").exists()

    again = main([*ARGV, "--out", str(out)])  # nothing left to train: read back, the same numbers
    assert all(t is None for t in again["arms"]["ntp"]["seconds"].values())
    assert again["arms"]["nitp λ=0.3"]["mean_std"] == nitp["mean_std"]


def test_arms_and_statistics():
    assert make_arms(("ntp", "nitp", "cosreg"), [0.1, 1.0], 0.5) == [
        Arm("ntp"), Arm("nitp", 0.1), Arm("nitp", 1.0), Arm("cosreg", 0.5)]
    assert [a.folder for a in make_arms(("nitp",), [0.3], None)] == ["nitp-0.3"]
    assert mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, statistics.stdev([1.0, 2.0, 4.0])))
    assert mean_std([2.0]) == (2.0, None) and mean_std([]) == (None, None)


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,1"], "--seeds only apply with --long"),
    (["--long", "--seeds", "0,x"], "--seeds takes a comma-separated list of distinct int values, got '0,x'"),
    (["--long", "--seeds", "1,1"], "--seeds takes a comma-separated list of distinct int values"),
    (["--long", "--seeds", "-1"], "--seeds must be integers >= 0"),
    (["--long", "--lambdas", "0.3,0"], "--lambdas must be finite numbers > 0, got '0.3,0'"),
    (["--long", "--jobs", "0"], "--jobs must be >= 1, got 0"),
    (["--long", "--cosreg-weight", "nan"], "--cosreg-weight must be a finite number >= 0"),
])
def test_bad_sweep_flags_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(["--quick", *argv])
    assert message in capsys.readouterr().err
