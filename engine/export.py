"""Export a run's checkpoint to Hugging Face format.

    python -m engine.export RUN_DIR OUT_DIR [--step N] [--dtype bfloat16] [--tokenizer tokenizer.json]

writes the backbone (the NITP projector is a training-only head and is dropped) as
model.safetensors + config.json + generation_config.json + tokenizer files, a folder that
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load offline.
Dense models become LlamaForCausalLM, MoE models Qwen2MoeForCausalLM; the parameter-name mapping
(and its inverse, for ``--init-from-hf``) is engine/model/hf_adapter.py. Nothing here imports
transformers; tensors are read with DCP, never unpickled.
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.checkpoint import (SafeFileSystemReader, SafeLoadPlanner, checkpoint_root, latest_valid,
                               read_metadata_safely, step_dir, validate_checkpoint)
from engine.model.hf_adapter import engine_to_hf, hf_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint under {root}")
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


def write_tokenizer(tokenizer_json: Path, out_dir: Path, max_length: int) -> int | None:
    """Copy tokenizer.json and write the tokenizer_config.json AutoTokenizer needs; returns the EOS id."""
    from tokenizers import Tokenizer

    from engine.data.tokenizer import EOD_CANDIDATES

    tok = Tokenizer.from_file(str(tokenizer_json))
    eos = next((t for t in EOD_CANDIDATES if tok.token_to_id(t) is not None), None)
    shutil.copyfile(tokenizer_json, out_dir / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "eos_token": eos, "pad_token": eos, "bos_token": None, "unk_token": None,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos, "pad_token": eos}) + "\n")
    return tok.token_to_id(eos) if eos is not None else None


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None, dtype: str = "float32",
               tokenizer: str | Path | None = None) -> Path:
    """Write the Hugging Face folder for a run's checkpoint; returns out_dir."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ckpt = find_checkpoint(run_dir, step)
    saved = json.loads((ckpt / "state.json").read_text())
    cfg, info = saved["config"], saved.get("data_info", {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_path = tokenizer or info.get("data_tokenizer")
    eos = info.get("data_eod_id")
    if tok_path:
        if not Path(tok_path).is_file():
            raise FileNotFoundError(f"tokenizer {tok_path} (from the run's data_tokenizer) not found; "
                                    "pass --tokenizer PATH")
        eos = write_tokenizer(Path(tok_path), out, cfg["seq_len"])
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
    print(f"exported {ckpt} (step {saved['step']}) -> {out} as {config['architectures'][0]}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a run's checkpoint to Hugging Face format "
                                                 "(backbone only, without the NITP projector).")
    parser.add_argument("run_dir", help="the run's --out folder")
    parser.add_argument("out_dir", help="where to write the Hugging Face folder")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's own)")
    args = parser.parse_args(argv)
    try:
        export_run(args.run_dir, args.out_dir, args.step, args.dtype, args.tokenizer)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
