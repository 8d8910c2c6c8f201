"""Export a run's checkpoint to Hugging Face format.

    python -m engine.export RUN_DIR OUT_DIR [--step N] [--dtype bfloat16] [--tokenizer tokenizer.json]
                                            [--overwrite]

writes the backbone (the NITP projector is a training-only head and is dropped) as
model.safetensors + config.json + generation_config.json + tokenizer files, a folder that
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load offline.
OUT_DIR must be new, empty or an earlier export (its files, listed in .nitp-export.json, are
replaced); a folder holding anything else is refused unless --overwrite, which empties it first.
The run itself, a folder holding it, or its checkpoints folder is always refused.
Dense models become LlamaForCausalLM, MoE models Qwen2MoeForCausalLM; the parameter-name mapping
(and its inverse, for ``--init-from-hf``) is engine/model/hf_adapter.py. Nothing here imports
transformers; tensors are read with DCP, never unpickled.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine.checkpoint import (CKPT_SUBDIR, SafeFileSystemReader, SafeLoadPlanner, checkpoint_root, latest_valid,
                               read_metadata_safely, step_dir, validate_checkpoint)
from engine.cli import TRACEBACK_HELP, OneLineArgumentParser, cli_errors, one_line
from engine.model.hf_adapter import engine_to_hf, hf_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPORT_MARKER = ".nitp-export.json"  # the names of the files an export wrote into its folder


# ----------------------------------------------------------------------------- checkpoint -> tensors

def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint of ``run_dir`` at ``step`` (default: the newest complete one)."""
    root = checkpoint_root(str(run_dir))
    if step is not None:
        path = step_dir(root, step)
        validate_checkpoint(path)
        return path
    found = latest_valid(root)
    if found is None:
        raise ValueError(f"{run_dir}: no complete checkpoint under {root} (is it a run's --out folder?)")
    return found[0]


def read_backbone(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model's tensors without the projector, loaded by DCP in one process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata_safely(ckpt / ".metadata")
    sd = {fqn[len("model."):]: torch.empty(meta.size, dtype=meta.properties.dtype)
          for fqn, meta in metadata.state_dict_metadata.items()
          if fqn.startswith("model.") and not fqn.startswith("model.output.projector")
          and isinstance(meta, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": sd}, storage_reader=SafeFileSystemReader(ckpt), planner=SafeLoadPlanner(),
                 no_dist=True)
    return sd


def read_tokenizer(path: str | Path, given: bool) -> Any:
    """The tokenizer at `path` (--tokenizer when `given`, else the run's own), or a ValueError saying
    which one is missing or unreadable."""
    from tokenizers import Tokenizer

    source = f"--tokenizer {path}" if given else f"the run's tokenizer {path} (data_tokenizer)"
    if not Path(path).is_file():
        raise ValueError(f"{source}: no such file" + ("" if given else "; pass --tokenizer PATH"))
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 -- tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{source}: not a tokenizer.json that the tokenizers library can read "
                         f"({one_line(err)})") from None


def write_tokenizer(tok: Any, tokenizer_json: Path, out_dir: Path, max_length: int) -> int | None:
    """Copy tokenizer.json and write the tokenizer_config.json AutoTokenizer needs; returns the EOS id."""
    from engine.data.tokenizer import EOD_CANDIDATES

    eos = next((t for t in EOD_CANDIDATES if tok.token_to_id(t) is not None), None)
    shutil.copyfile(tokenizer_json, out_dir / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "eos_token": eos, "pad_token": eos, "bos_token": None, "unk_token": None,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos, "pad_token": eos}) + "\n")
    return tok.token_to_id(eos) if eos is not None else None


def _earlier_export(out: Path) -> set[str]:
    """The files an earlier export recorded in `out` (empty if none, or the record is unreadable)."""
    try:
        names = json.loads((out / EXPORT_MARKER).read_text())["files"]
        return {n for n in names if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def prepare_out_dir(out: Path, run_dir: Path, overwrite: bool) -> None:
    """Create `out`, or empty it when it holds only an earlier export's files (or --overwrite).

    Refused: the run folder, a folder holding the run, anything inside its checkpoints folder, a file,
    and (without overwrite) a folder holding files an export did not write.
    """
    target, run = out.resolve(), run_dir.resolve()
    if target == run or target in run.parents:
        what = "is the run folder" if target == run else f"holds the run folder {run_dir}"
        raise ValueError(f"output folder {out} {what}; export writes a new folder (choose another)")
    if (run / CKPT_SUBDIR) in (target, *target.parents):
        raise ValueError(f"output folder {out} is inside the run's checkpoints; choose another")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    ours = _earlier_export(out) | {EXPORT_MARKER}
    entries = sorted(out.iterdir())
    foreign = [p.name for p in entries if p.name not in ours or p.is_dir()]
    if foreign and not overwrite:
        listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ValueError(f"output folder {out} holds files an export did not write ({listed}); choose a "
                         "new or empty folder, or pass --overwrite to empty it first")
    for path in entries:  # nothing stale (a tokenizer of another model) survives into this export
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None, dtype: str = "float32",
               tokenizer: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the Hugging Face folder for a run's checkpoint; returns out_dir."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ckpt = find_checkpoint(run_dir, step)
    saved = json.loads((ckpt / "state.json").read_text())
    cfg, info = saved["config"], saved.get("data_info", {})
    tok_path = tokenizer or info.get("data_tokenizer")
    tok = read_tokenizer(tok_path, given=tokenizer is not None) if tok_path else None
    out = Path(out_dir)
    prepare_out_dir(out, Path(run_dir), overwrite)  # after every check: a refused export changes nothing
    eos = info.get("data_eod_id")
    written = ["model.safetensors", "config.json", "generation_config.json"]
    if tok is not None:
        eos = write_tokenizer(tok, Path(tok_path), out, cfg["seq_len"])
        written += ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    else:
        print(f"note: {run_dir} used {info.get('data_source', 'synthetic')} data without a tokenizer; "
              "no tokenizer files written (pass --tokenizer PATH)")
    tensors = engine_to_hf(cfg, read_backbone(ckpt))
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {**hf_config(cfg, eos), "torch_dtype": dtype}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"eos_token_id": eos, "pad_token_id": eos, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / EXPORT_MARKER).write_text(json.dumps({"files": written, "run": str(run_dir),
                                                 "checkpoint": str(ckpt)}, indent=1) + "\n")
    print(f"exported {ckpt} (step {saved['step']}) -> {out} as {config['architectures'][0]}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(description="Export a run's checkpoint to Hugging Face format "
                                               "(backbone only, without the NITP projector).",
                                   epilog=TRACEBACK_HELP)
    parser.add_argument("run_dir", help="the run's --out folder")
    parser.add_argument("out_dir", help="where to write the Hugging Face folder: new, empty or an earlier export")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's own)")
    parser.add_argument("--overwrite", action="store_true",
                        help="empty OUT_DIR first even if it holds files an export did not write")
    args = parser.parse_args(argv)
    with cli_errors():
        export_run(args.run_dir, args.out_dir, args.step, args.dtype, args.tokenizer, args.overwrite)


if __name__ == "__main__":
    main()
