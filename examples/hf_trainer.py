"""NITP with a Hugging Face transformers model and Trainer: the README example, runnable offline.

    python examples/hf_trainer.py --out runs/hf_trainer

A tiny random-weight Llama (no download) trains 3 steps on random tokens with CE + NITP, then is saved as a
plain transformers checkpoint without the projector. For a real model, replace the first two lines of `main`
with `LlamaForCausalLM.from_pretrained(...)` and the data with your tokenized dataset.
"""
from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from nitp_kernels.integrations.hf import apply_nitp, save_pretrained_without_nitp


def main(output_dir: str, max_steps: int = 3) -> Trainer:
    """Train a tiny Llama with NITP for max_steps; save it without the projector to output_dir/final."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(config)
    apply_nitp(model, nitp_weight=1.0)  # hidden_states[round(0.2 * 4)] as the implicit-token target
    tokens = torch.randint(0, config.vocab_size, (16, 32))
    data = [{"input_ids": row, "labels": row} for row in tokens]  # labels unshifted, as transformers expects
    args = TrainingArguments(output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    print("last step:", {k: float(v) for k, v in model.nitp_last_output._asdict().items() if v is not None})
    save_pretrained_without_nitp(model, f"{output_dir}/final")  # loads back with LlamaForCausalLM
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/hf_trainer", help="Trainer output directory")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps")
    cli = parser.parse_args()
    main(cli.out, cli.steps)
