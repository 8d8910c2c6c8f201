"""The model and the optimizer as DCP Stateful objects (what a TrainState hands the checkpointer).

torch.distributed.checkpoint calls ``state_dict()`` before saving and, on load, fills that
structure in place and passes it to ``load_state_dict()``. Parameters and Adam moments stay
sharded DTensors; DCP reshards them when the world size changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)


class ModelState:
    """The model's parameters (and buffers that are part of its state dict)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state)


class OptimizerState:
    """The optimizer's per-parameter state (Adam moments, step counts) and its parameter groups."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)
