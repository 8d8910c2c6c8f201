"""Every bad flag is refused before any data or model work, as one line naming the flag, the value and
what is allowed: in-process through engine.train.main and engine.config, and in real processes to show
that the command line prints that one line and no traceback (NITP_TRACEBACK=1 shows it)."""

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from engine.cli import check_environment
from engine.config import TrainConfig, make_config, parse_cli
from engine.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
FLOAT_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)
                if float in (typing.get_args(typing.get_type_hints(TrainConfig)[f.name])
                             or (typing.get_type_hints(TrainConfig)[f.name],))]


def refusal(argv, tmp_path) -> str:
    """The message train.main exits with; the data cache and the run folder were never created."""
    cache, out = tmp_path / "cache", tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        train_main(["--data-cache-dir", str(cache), "--out", str(out), "--steps", "1", *argv])
    message = str(err.value)
    assert message.startswith("error: ") and "\n" not in message, message
    assert not cache.exists() and not out.exists(), "refused after data or model work started"
    return message


def test_every_float_flag_must_be_finite():
    assert {"lr", "norm_eps", "rope_theta", "init_std", "nitp_weight", "peak_tflops"} <= set(FLOAT_FIELDS)
    for name in FLOAT_FIELDS:
        flag = "--" + name.replace("_", "-")
        for text in ("inf", "-inf", "nan"):
            with pytest.raises(SystemExit) as err:
                parse_cli([f"{flag}={text}"])
            assert str(err.value).startswith(f"error: {flag} must be ") and str(err.value).endswith(
                f"got {float(text)!r}"), err.value


@pytest.mark.parametrize("argv, message", [
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--norm-eps", "-1"], "--norm-eps must be a finite number > 0, got -1.0"),
    (["--rope-theta", "0"], "--rope-theta must be a finite number > 0, got 0.0"),
    (["--init-std", "-1"], "--init-std must be a finite number > 0, got -1.0"),
    (["--beta2", "1"], "--beta2 must be a number in [0, 1), got 1.0"),
    (["--val-fraction", "1"], "--val-fraction must be a number in [0, 1), got 1.0"),
    (["--z-loss-weight", "-0.1"], "--z-loss-weight must be a finite number >= 0, got -0.1"),
    (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    (["--vocab-size", "100"], "--vocab-size 100 is too small for the byte-level BPE trained on --data stdlib: "
                              "it needs >= 257 (256 bytes + end-of-document)"),
    (["--data", "synthetic", "--vocab-size", "4"], "--vocab-size 4 is too small for --data synthetic: it needs >= 8"),
    (["--eval-every", "2", "--val-fraction", "0"], "--eval-every 2 needs a validation split, but --val-fraction is "
                                                   "0.0: set --val-fraction > 0 (e.g. 0.01) or --eval-every 0"),
    (["--eval-every", "2", "--eval-batches", "0"], "--eval-batches must be >= 1 with --eval-every 2, got 0"),
    (["--text-field", ""], "--text-field must be a non-empty string, got ''"),
])
def test_config_errors_are_one_line_naming_flag_value_and_range(argv, message, tmp_path):
    assert refusal(argv, tmp_path) == f"error: {message}"


@pytest.mark.parametrize("argv, message", [
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--doc-mask", "maybe"], "argument --doc-mask/--doc_mask: invalid boolean value: 'maybe'"),
    (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag 1"),
])
def test_malformed_flags_are_one_line_too(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        train_main(argv)
    assert err.value.code == 2
    assert capsys.readouterr().err == f"error: {message} (--help lists the flags)\n"


def test_machine_and_path_errors_before_any_work(tmp_path, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert refusal(["--data-cache-dir", str(a_file)], tmp_path) == (
        f"error: --data-cache-dir {a_file}: is a file; it must be a folder (created if missing)")
    assert refusal(["--data-cache-dir", str(a_file / "sub")], tmp_path) == (
        f"error: --data-cache-dir {a_file / 'sub'}: lies under the file {a_file}; it must be a folder "
        "(created if missing)")
    assert refusal(["--init-from-hf", str(tmp_path / "no_model")], tmp_path).startswith(
        f"error: --init-from-hf {tmp_path / 'no_model'}: no such folder")
    (tmp_path / "empty_model").mkdir()
    assert refusal(["--init-from-hf", str(tmp_path / "empty_model")], tmp_path).startswith(
        f"error: --init-from-hf {tmp_path / 'empty_model'}: no config.json in this folder")
    assert refusal(["--tokenizer", str(tmp_path / "none.json")], tmp_path) == (
        f"error: --tokenizer {tmp_path / 'none.json'}: no such file (expected a tokenizer.json)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert refusal(["--device", "cuda"], tmp_path).startswith(
        "error: --device cuda: CUDA is not available on this machine")
    # triton on the CPU: the op's own rule (CUDA tensors, or Triton's interpreter) decides
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert refusal(["--backend", "triton"], tmp_path).startswith(
        "error: --backend triton on the CPU: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_environment(make_config("tiny", backend="triton", device="cpu"))  # the interpreter runs it


def test_eval_every_on_a_corpus_without_validation_split_is_refused_before_the_model(tmp_path, monkeypatch):
    """val_fraction > 0 but a one-document corpus: only the data can tell; refused by build_data,
    before the model is built (previously a TypeError at the first evaluation)."""
    import engine.trainer

    (tmp_path / "one.txt").write_text("a single document " * 400)
    built = []
    monkeypatch.setattr(engine.trainer, "NITPTransformer", lambda *a, **k: built.append(1))
    with pytest.raises(SystemExit) as err:
        train_main(["--data", str(tmp_path / "one.txt"), "--eval-every", "1", "--steps", "1", "--seq-len", "16",
                    "--vocab-size", "300", "--data-cache-dir", str(tmp_path / "cache"),
                    "--out", str(tmp_path / "run")])
    assert str(err.value) == (
        f"error: --eval-every needs a validation split, but --data '{tmp_path / 'one.txt'}' gave none "
        "(1 document(s), --val-fraction 0.01; a split needs at least two documents). "
        "Use more documents or --eval-every 0.")
    assert not built


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "engine/train.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_command_line_prints_one_line_and_no_traceback(tmp_path):
    proc = run_cli("--lr", "inf", "--out", str(tmp_path / "run"))
    assert (proc.returncode, proc.stderr) == (1, "error: --lr must be a finite number > 0, got inf\n")
    proc = run_cli("--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "run"))
    assert (proc.returncode, proc.stderr.splitlines()) == (
        1, [f"error: --data {tmp_path / 'missing.txt'}: no such file or directory"])
    # NITP_TRACEBACK=1: the same error with its traceback, for debugging
    proc = run_cli("--lr", "inf", env={"NITP_TRACEBACK": "1"})
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert "ValueError: --lr must be a finite number > 0, got inf" in proc.stderr
    assert "NITP_TRACEBACK=1" in run_cli("--help").stdout
