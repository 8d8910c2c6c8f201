"""make compare (QUICK variant): three runs, the PNG renders headless, the summary holds the final
values and the corpus hash; the three-phase detector on constructed curves; bad flags refused."""

import json
import math

import pytest

from engine.compare import main, nitp_phases, smooth


def test_quick_compare_writes_plot_and_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stray docs/ copy would land here, not in the repository
    out = tmp_path / "cmp"
    summary = main(["--quick", "--out", str(out)])
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert 20_000 < len(png) < 200_000  # six panels with curves, still small enough for the README
    assert not (tmp_path / "docs").exists()  # --quick copies nothing unless --docs is given

    md = (out / "summary.md").read_text()
    corpus_hash = json.loads((out / "nitp" / "config.json").read_text())["data_corpus_hash"]
    assert corpus_hash and corpus_hash in md
    for objective in ("ntp", "nitp", "cosreg"):
        assert f"| {objective} |" in md
        run = summary["runs"][objective]
        assert run["steps"] == 30
        for key in ("train_ce", "val_ce", "eff_rank_last", "avg_cos_last", "eff_rank_target"):
            assert math.isfinite(run[key]), (objective, key)
        assert 1.0 <= run["eff_rank_last"] <= 32 and -1.0 <= run["avg_cos_last"] <= 1.0
        assert run["val_ce"] < math.log(64)  # all three learn from the uniform start
        assert math.isfinite(run["val_ce_full"]) and f"{run['val_ce_full']:.3f}" in md  # the whole split
    assert summary["runs"]["nitp"]["nitp_loss"] > 0 and summary["runs"]["ntp"]["nitp_loss"] is None
    assert summary["runs"]["nitp"]["grad_norm_ratio"] > 0
    assert json.loads((out / "summary.json").read_text())["config"]["data_corpus_hash"] == corpus_hash


def test_quick_docs_copy_on_request(tmp_path):
    docs = tmp_path / "docs"
    main(["--quick", "--out", str(tmp_path / "cmp"), "--objectives", "ntp", "--steps", "2",
          "--docs", str(docs)])
    assert sorted(p.name for p in docs.iterdir()) == ["compare.png", "summary.md"]


def test_three_phase_detector_on_constructed_curves():
    steps = list(range(0, 200, 10))
    drop = [1.0, 0.6, 0.4, 0.3, 0.3]
    hump = [0.32, 0.36, 0.40, 0.42, 0.42, 0.41]
    decline = [0.40, 0.38, 0.36, 0.34, 0.33, 0.32, 0.31, 0.30, 0.29]
    phases = nitp_phases(steps, drop + hump + decline)
    assert phases["hump"] is True and phases["drop_step"] < phases["hump_step"]
    assert nitp_phases(steps, [1.0 / (1 + i) for i in range(20)])["hump"] is False
    assert nitp_phases([0, 1], [1.0, 0.5])["hump"] is None
    assert smooth([0.0, 3.0, 0.0, 3.0, 0.0], window=3) == pytest.approx([1.5, 1.0, 2.0, 1.0, 1.5])


@pytest.mark.parametrize("argv", [["--objectives", "ntp,bogus"], ["--objectives", ","], ["--steps", "0"]])
def test_bad_flags_refused(argv, capsys):
    with pytest.raises(SystemExit):
        main(["--quick", *argv])
    assert "--objectives" in capsys.readouterr().err or "--steps" in argv
