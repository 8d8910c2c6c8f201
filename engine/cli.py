"""What the command lines share: errors as one line, and the checks of the machine and the paths
a run needs, made before any data or model work.

Library code raises ValueError-family errors (and OSError from the file system) with a message
naming the argument, the value and what is allowed; only the command lines (engine/train.py,
engine/export.py) turn them into ``error: <message>`` on stderr and exit status 1 -- one line, no
traceback. ``NITP_TRACEBACK=1`` in the environment shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NoReturn

if TYPE_CHECKING:
    from engine.config import TrainConfig

TRACEBACK_ENV = "NITP_TRACEBACK"
TRACEBACK_HELP = (f"Errors are one line on stderr (exit status 1, 2 for a malformed flag); "
                  f"{TRACEBACK_ENV}=1 in the environment shows the full traceback instead.")


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (some libraries put newlines in theirs)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, (ValueError, RuntimeError)) else f"{type(exc).__name__}: {text}"


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn ValueError/OSError (and a diverged run) into SystemExit("error: ...") (one line) unless
    NITP_TRACEBACK is set."""
    from engine.faults import TrainingDiverged

    try:
        yield
    except (ValueError, OSError, TrainingDiverged) as exc:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        raise SystemExit(f"error: {one_line(exc)}") from None


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a malformed flag is one line (``error: argument --lr: invalid float value:
    'abc'``) instead of the usage block and the message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {' '.join(message.split())} (--help lists the flags)\n")


def check_environment(cfg: TrainConfig) -> None:
    """Refuse, before any data or model work, what this machine or file system cannot do:
    --device cuda without CUDA, --backend triton where it cannot run, a --data-cache-dir that is
    (or lies under) a file, a missing --tokenizer or --init-from-hf folder."""
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"--device cuda: CUDA is not available on this machine (torch {torch.__version__}, "
                         f"{build}); use --device cpu or --device auto")
    on_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.backend == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ValueError("--backend triton: Triton is not installed; use --backend auto or torch")
        if not on_cuda:
            from nitp_kernels.api import resolve_backend  # the op's own rule for where triton runs

            try:
                resolve_backend("triton", torch.empty(0))
            except ValueError as err:
                raise ValueError(f"--backend triton on the CPU: {err}; use --backend auto or torch") from None
    cache = Path(cfg.data_cache_dir).expanduser()
    for folder in (cache, *cache.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "is a file" if folder == cache else f"lies under the file {folder}"
                raise ValueError(f"--data-cache-dir {cfg.data_cache_dir}: {where}; it must be a folder "
                                 "(created if missing)")
            break
    if cfg.tokenizer is not None and not Path(cfg.tokenizer).expanduser().is_file():
        raise ValueError(f"--tokenizer {cfg.tokenizer}: no such file (expected a tokenizer.json)")
    if cfg.init_from_hf is not None:
        hf_dir = Path(cfg.init_from_hf).expanduser()
        if not hf_dir.is_dir():
            raise ValueError(f"--init-from-hf {cfg.init_from_hf}: no such folder (expected a Hugging Face "
                             "checkpoint folder with config.json and *.safetensors)")
        if not (hf_dir / "config.json").is_file():
            raise ValueError(f"--init-from-hf {cfg.init_from_hf}: no config.json in this folder (expected "
                             "a Hugging Face checkpoint folder with config.json and *.safetensors)")
