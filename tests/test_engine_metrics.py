"""Run outputs: config.json, metrics.jsonl, progress bar only on a terminal, peak memory and peak FLOP/s."""

import io
import resource

import torch
from helpers import metrics_rows, run_config

from engine.metrics import RunLogger, peak_flops_per_device, peak_memory_bytes

RECORD = dict(step=3, loss=2.5, ce_loss=2.0, nitp_loss=0.5, nitp_weight=1.0, lr=1e-3, grad_norm=0.7,
              tokens_per_s=1234.0, mfu=None, peak_mem_bytes=10)


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_files_and_one_line_per_log_step_without_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stderr", _Stream(False))
    logger = RunLogger(str(tmp_path / "run"), total_steps=10)
    assert logger.bar is None
    logger.write_config({"preset": "tiny", "nitp_weight": 1.0})
    logger.log(RECORD)
    logger.log({**RECORD, "step": 4, "loss": float("nan"), "val_ce": 2.1})
    logger.close()
    assert run_config(tmp_path / "run") == {"preset": "tiny", "nitp_weight": 1.0}
    rows = metrics_rows(tmp_path / "run")
    assert rows[0] == RECORD and rows[1]["loss"] is None and rows[1]["val_ce"] == 2.1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("step      3 | loss 2.5000 ce 2.0000 nitp 0.5000")
    assert "val_ce 2.1000" in out[1]


def test_progress_bar_on_a_terminal_and_silent_other_ranks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stderr", _Stream(True))
    logger = RunLogger(str(tmp_path / "run"), total_steps=10)
    assert logger.bar is not None
    logger.advance()
    logger.log(RECORD)
    assert logger.bar.n == 1 and "loss 2.5000" in logger.bar.postfix
    logger.close()
    assert capsys.readouterr().out == ""
    silent = RunLogger(str(tmp_path / "other"), total_steps=10, enabled=False)
    silent.write_config({"a": 1})
    silent.log(RECORD)
    assert not (tmp_path / "other").exists()


def test_peak_memory_and_peak_flops_on_cpu():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert peak_memory_bytes(torch.device("cpu")) >= rss > 0
    assert peak_flops_per_device(None, torch.device("cpu")) is None
    assert peak_flops_per_device(2.5, torch.device("cpu")) == 2.5e12
