"""Adapters from nitp_kernels to other training stacks, each imported lazily.

`nitp_kernels.integrations.hf`: apply_nitp / remove_nitp / save_pretrained_without_nitp for Hugging Face
transformers causal LMs. Importing this package (or that module) does not import transformers; the
functions import it when they run.

`nitp_kernels.integrations.torchtitan`: NITPConverter, NITPLoss and NITPTrainer for torchtitan 0.3.0 (the
`torchtitan` extra); `nitp_kernels.integrations.torchtitan_cpu`: the stand-ins that let its Trainer run on
CPU with gloo. Import them by module path: nothing here imports torchtitan.
"""
from __future__ import annotations

from typing import Any

_HF_NAMES = ("apply_nitp", "remove_nitp", "save_pretrained_without_nitp", "SUPPORTED_MODEL_CLASSES")


def __getattr__(name: str) -> Any:
    # Lazy so that `import nitp_kernels.integrations` stays free of any third-party import.
    if name in _HF_NAMES:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_HF_NAMES)
