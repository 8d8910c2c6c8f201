"""NITP for torchtitan 0.3.0 (pinned: its model, loss and trainer APIs change between releases).

    from torchtitan.models.llama3.config_registry import llama3_8b
    from nitp_kernels.integrations.torchtitan import nitp_trainer_config

    def llama3_8b_nitp():                      # a config_registry function: --module my_configs --config ...
        return nitp_trainer_config(llama3_8b(), nitp_weight=1.0)

What it changes, each through torchtitan's own extension points:
- Model: `NITPConverter` (a ModelConfigConverter, applied like LoRA's) turns any `Decoder` config into the
  config of a subclass of the same model class that also owns `nitp_projector` (an NITPProjector, a root
  parameter, so it is in the optimizer, in FSDP's root group and in DCP checkpoints). With `_skip_lm_head` set
  (the Trainer sets it for a ChunkedLossWrapper loss) its forward returns `NITPHiddenStates`: the final normed
  hidden state, hidden_states[k] (0 = embeddings, k = after block k; k by the paper's rule, round(0.2·layers),
  unless given) and the projector weights. Without it, the forward returns logits as before (inference, export).
- Loss: `NITPLoss` calls `fused_nitp_loss` with reduction="sum" divided by torchtitan's global_valid_tokens
  (the CE count: with shift=1 each sequence's last position has no NITP target, so the NITP sum is divided
  by slightly more positions than it has, as in the Hugging Face integration). The target is stop-gradient.
  It subclasses ChunkedLossWrapper only because that is how the 0.3.0 Trainer hands a loss the LM head and
  asks the model for hidden states; no chunked logits are built.
- Trainer: `NITPTrainer` logs CE and NITP separately (the 0.3.0 Trainer drops a loss's metrics), each a mean
  over its own positions across data-parallel ranks and micro-batches; `nitp_history` keeps them.
- Export: the model spec's state-dict adapter is wrapped to drop the projector, so `--checkpoint.last_save_in_hf`
  writes a checkpoint Hugging Face transformers loads.

Parallelism: FSDP2 and tensor parallel (the projector replicated; the vocab-sharded LM head weight is
all-gathered for the loss, V·d elements per step, and every TP rank computes the whole loss on the replicated
final hidden state), with activation checkpointing and per-block compile. Tensor parallel needs
`--parallelism.spmd_backend partial_dtensor`. Pipeline and context parallel are refused (see `_refuse`).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from ..api import fused_nitp_loss
from ..modules import NITPProjector
from ..options import validate_options
from .hf import default_target_layer  # the paper's rule, shared with the Hugging Face integration

TORCHTITAN_VERSION = "0.3.0"
try:
    _installed: Optional[str] = importlib.metadata.version("torchtitan")
except importlib.metadata.PackageNotFoundError:
    _installed = None
if _installed != TORCHTITAN_VERSION:
    raise ImportError(f"nitp_kernels.integrations.torchtitan is written for torchtitan=={TORCHTITAN_VERSION} "
                      f"(its model, loss and trainer APIs change between releases); found "
                      f"{_installed or 'none installed'}. Install it (Python >= 3.11) with: "
                      "pip install 'nitp-kernels[torchtitan]'")

from torchtitan.components.loss import IGNORE_INDEX, BaseLoss, ChunkedLossWrapper  # noqa: E402
from torchtitan.config import CompileConfig  # noqa: E402
from torchtitan.distributed import utils as dist_utils  # noqa: E402
from torchtitan.models.common.decoder import Decoder  # noqa: E402
from torchtitan.protocols.model import ModelConfigConverter  # noqa: E402
from torchtitan.protocols.module import Module  # noqa: E402
from torchtitan.tools.logging import logger  # noqa: E402
from torchtitan.trainer import Trainer  # noqa: E402

PROJECTOR_NAME = "nitp_projector"


class NITPHiddenStates(NamedTuple):
    """What an NITP model returns to the loss: final normed hidden, hidden_states[k], projector weights."""

    hidden: Tensor
    shallow: Tensor
    projector: Optional[tuple[Tensor, Tensor, Tensor]]


class TitanNITPProjector(NITPProjector, Module):
    """nitp_kernels' NITPProjector as a torchtitan Module (built from a Config, initialised by init_states)."""

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        dim: int
        hidden_mult: int = 4

    def __init__(self, config: Config) -> None:
        NITPProjector.__init__(self, config.dim, config.hidden_mult)


def _refuse(parallelism: Any) -> None:
    """Raise for the parallelisms NITP cannot run under yet, with the reason."""
    if parallelism.pipeline_parallel_degree > 1:
        raise NotImplementedError(
            f"NITP does not support pipeline parallelism (pipeline_parallel_degree="
            f"{parallelism.pipeline_parallel_degree}): the loss needs hidden_states[k] from an early stage on the "
            "last stage, which torchtitan's pipeline schedule does not carry. Use FSDP and tensor parallel.")
    if parallelism.context_parallel_degree > 1:
        raise NotImplementedError(
            f"NITP does not support context parallelism (context_parallel_degree="
            f"{parallelism.context_parallel_degree}): the target of position t is hidden_states[k] at t+1, which "
            "for the last position of a sequence shard lives on the next rank (a one-row halo exchange "
            "torchtitan does not do). Use FSDP and tensor parallel.")
    if parallelism.tensor_parallel_degree > 1 and parallelism.spmd_backend != "partial_dtensor":
        raise NotImplementedError(
            f"NITP with tensor parallel needs --parallelism.spmd_backend partial_dtensor (got "
            f"{parallelism.spmd_backend!r}): the loss gathers the vocab-sharded LM head from its DTensor.")


_model_class_cache: dict[type, type] = {}


def _nitp_model_class(parent: type) -> type:
    """A subclass of the Decoder class `parent` that owns the projector and returns NITPHiddenStates."""
    if parent in _model_class_cache:
        return _model_class_cache[parent]

    class NITPModel(parent):  # type: ignore[valid-type, misc]
        @dataclasses.dataclass(kw_only=True, slots=True)
        class Config(parent.Config):  # type: ignore[misc, name-defined]
            nitp_target_layer: int
            nitp_projector: Optional[TitanNITPProjector.Config] = None

            def update_from_config(self, *, config: Any, **kwargs: Any) -> None:
                _refuse(config.parallelism)
                parent.Config.update_from_config(self, config=config, **kwargs)
                if self.nitp_projector is not None:
                    self.nitp_projector.sharding_config = _replicated_sharding()

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.nitp_target_layer = config.nitp_target_layer
            # Registered last, so init_states draws the stock model's weights first, in the stock order.
            self.nitp_projector = config.nitp_projector.build() if config.nitp_projector is not None else None

        def forward(self, tokens: Tensor, positions: Optional[Tensor] = None,
                    attention_masks: Any = None) -> Any:
            # Decoder.forward, plus recording hidden_states[k]. Blocks may be wrapped (activation checkpointing,
            # compile): only their outputs are read.
            h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
            shallow = h if self.nitp_target_layer == 0 else None
            for index, layer in enumerate(self.layers.values(), start=1):
                h = layer(h, attention_masks, positions)
                if index == self.nitp_target_layer:
                    shallow = h
            h = self.norm(h) if self.norm is not None else h
            if not self._skip_lm_head:
                return self.lm_head(h) if self.lm_head is not None else h
            projector = self.nitp_projector
            weights = None if projector is None else (projector.w_gate, projector.w_up, projector.w_down)
            return NITPHiddenStates(h, shallow, weights)

    NITPModel.__name__ = NITPModel.__qualname__ = f"NITP{parent.__name__}"
    _model_class_cache[parent] = NITPModel
    return NITPModel


def _replicated_sharding() -> Any:
    import spmd_types as spmd
    from torchtitan.models.common.decoder_sharding import dense_param_placement
    from torchtitan.protocols.sharding import ShardingConfig

    placement = dense_param_placement(tp=spmd.R)
    return ShardingConfig(state_shardings={"w_gate": placement, "w_up": placement, "w_down": placement})


class NITPConverter(ModelConfigConverter):
    """Adds NITP to a Decoder model config: the projector, and hidden_states[k] returned with the final hidden."""

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(ModelConfigConverter.Config):
        target_layer: Optional[int] = None
        """k of hidden_states[k] (0 = embeddings, k = after block k), in [0, layers-1]; None: round(0.2·layers)."""
        hidden_mult: int = 4
        """Projector width as a multiple of the model dim (the paper's 4)."""
        use_projector: bool = True
        """False: the projector-free ablation (P = identity)."""

    def __init__(self, config: Config, **kwargs: Any) -> None:
        if not isinstance(config.hidden_mult, int) or isinstance(config.hidden_mult, bool) or config.hidden_mult < 1:
            raise ValueError(f"hidden_mult must be a positive int, got {config.hidden_mult!r}")
        self.config = config

    def convert(self, model_config: Any) -> Any:
        if not isinstance(model_config, Decoder.Config):
            raise TypeError(f"NITPConverter converts torchtitan Decoder configs, got {type(model_config).__name__}")
        if hasattr(model_config, "nitp_target_layer"):
            raise ValueError("this model config already has NITP (NITPConverter was applied twice)")
        num_layers = len(model_config.layers)
        target = self.config.target_layer
        if target is None:
            target = default_target_layer(num_layers)
        if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < num_layers:
            raise ValueError(f"target_layer must be an int in [0, {num_layers - 1}] (hidden_states index: 0 = "
                             f"embeddings, k = after block k), got {target!r}")
        projector = (TitanNITPProjector.Config(dim=model_config.dim, hidden_mult=self.config.hidden_mult)
                     if self.config.use_projector else None)
        model_class = _nitp_model_class(model_config._owner)
        fields = {f.name: getattr(model_config, f.name) for f in dataclasses.fields(model_config) if f.init}
        return model_class.Config(**fields, nitp_target_layer=target, nitp_projector=projector)


def _replicated_local(tensor: Tensor) -> Tensor:
    """The whole tensor on this rank: a DTensor is gathered (sharded) or unwrapped (replicated).

    Under tensor parallel every rank computes the same loss, so the gradient of the local tensor is the
    replicated gradient, which is what to_local's default grad placement says.
    """
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(tensor, DTensor):
        return tensor
    if any(not isinstance(p, Replicate) for p in tensor.placements):
        tensor = tensor.redistribute(placements=[Replicate()] * tensor.device_mesh.ndim)
    return tensor.to_local()


_LOSS_OPTIONS = ("nitp_weight", "loss_type", "shift", "stop_gradient", "label_smoothing", "z_loss_weight",
                 "softcap", "chunk_size", "backend")


class NITPLoss(ChunkedLossWrapper):
    """CE + λ·NITP with fused_nitp_loss, summed and divided by global_valid_tokens (torchtitan's convention).

    Subclasses ChunkedLossWrapper only for the Trainer's isinstance check that hands over the LM head and
    sets the model's _skip_lm_head; none of its chunking runs.
    """

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        nitp_weight: float = 1.0
        """λ: loss = CE + λ·NITP."""
        loss_type: str = "cosine"
        """cosine, mse, smooth_l1 or kl."""
        shift: int = 1
        """Target position t + shift (1: the next token, the paper's default)."""
        stop_gradient: bool = True
        label_smoothing: float = 0.0
        z_loss_weight: float = 0.0
        softcap: Optional[float] = None
        chunk_size: Optional[int] = None
        backend: str = "auto"

    def __init__(self, config: Config, *, compile_config: Optional[CompileConfig] = None) -> None:
        options = {name: getattr(config, name) for name in _LOSS_OPTIONS}
        validate_options(**{k: v for k, v in options.items() if k not in ("backend", "chunk_size")})
        self.options = options
        self.lm_head: Optional[torch.nn.Module] = None
        # [ce sum, ce count, nitp sum, nitp count] since the last reset, for NITPTrainer's logging.
        self.totals = torch.zeros(4, dtype=torch.float64)

    def __call__(self, pred: Any, labels: Tensor, global_valid_tokens: Optional[Tensor] = None,
                 **kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        if not isinstance(pred, NITPHiddenStates):
            raise TypeError(f"NITPLoss needs a model converted by NITPConverter (it returns NITPHiddenStates); "
                            f"got {type(pred).__name__}")
        lm_head = self.lm_head
        if lm_head is None:
            raise RuntimeError("NITPLoss has no LM head: the Trainer sets it (set_lm_head) before training")
        from torch.distributed._composable.fsdp import FSDPModule

        if isinstance(lm_head, FSDPModule):
            lm_head.unshard()  # a no-op unless --parallelism.fsdp_reshard_after_forward always resharded it
        projector = None if pred.projector is None else tuple(_replicated_local(w) for w in pred.projector)
        # Detached before any gather: with the stop-gradient target, no gradient goes back through it.
        shallow = pred.shallow.detach() if self.options["stop_gradient"] else pred.shallow
        result = fused_nitp_loss(
            _replicated_local(pred.hidden), _replicated_local(lm_head.weight), _replicated_local(labels),
            _replicated_local(shallow), projector,
            lm_bias=None if lm_head.bias is None else _replicated_local(lm_head.bias),
            reduction="sum", ignore_index=IGNORE_INDEX, **self.options)
        with torch.no_grad():
            parts = torch.stack([result.ce_loss.double(), result.n_ce.double(), result.nitp_loss.double(),
                                 result.n_nitp.double()])
            self.totals = self.totals.to(parts.device) + parts
        loss = result.loss
        if global_valid_tokens is not None:
            loss = loss / global_valid_tokens
        return loss, {}


class NITPTrainer(Trainer):
    """torchtitan's Trainer, also logging CE and NITP separately at each log step (`nitp_history`)."""

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        pass

    def __init__(self, config: Config) -> None:
        if not isinstance(config.loss, NITPLoss.Config):
            raise ValueError(f"NITPTrainer needs config.loss to be an NITPLoss.Config, got "
                             f"{type(config.loss).__name__}; build the config with nitp_trainer_config")
        self.nitp_history: list[dict[str, float]] = []
        super().__init__(config)

    def train_step(self, data_iterator: Any) -> None:
        self.loss_fn.totals.zero_()
        super().train_step(data_iterator)
        if not self.metrics_processor.should_log(self.step):
            return
        totals = self.loss_fn.totals.to(self.device)
        if self.parallel_dims.dp_cp_enabled:
            totals = dist_utils.dist_sum_tensor(totals, self.parallel_dims.get_optional_mesh("loss"))
        ce_sum, n_ce, nitp_sum, n_nitp = totals.tolist()
        entry = {"step": self.step, "ce": ce_sum / max(n_ce, 1.0), "nitp": nitp_sum / max(n_nitp, 1.0)}
        self.nitp_history.append(entry)
        logger.info(f"step {self.step:2}  nitp/ce {entry['ce']:.4f}  nitp/nitp {entry['nitp']:.4f}")
        self.metrics_processor.logger.log({"nitp/ce": entry["ce"], "nitp/nitp": entry["nitp"]}, self.step)


_adapter_class_cache: dict[type, type] = {}


def _adapter_without_projector(parent: type) -> type:
    """The model's state-dict adapter, dropping the projector on the way to Hugging Face."""
    if parent not in _adapter_class_cache:
        class NITPStateDictAdapter(parent):  # type: ignore[valid-type, misc]
            def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
                kept = {k: v for k, v in state_dict.items() if not k.startswith(PROJECTOR_NAME + ".")}
                return super().to_hf(kept)

        NITPStateDictAdapter.__name__ = NITPStateDictAdapter.__qualname__ = f"NITP{parent.__name__}"
        _adapter_class_cache[parent] = NITPStateDictAdapter
    return _adapter_class_cache[parent]


def nitp_trainer_config(config: Trainer.Config, *, target_layer: Optional[int] = None, hidden_mult: int = 4,
                        use_projector: bool = True, **loss_options: Any) -> NITPTrainer.Config:
    """A copy of a torchtitan Trainer config (e.g. llama3_8b()) that trains with NITP.

    target_layer, hidden_mult, use_projector: NITPConverter's options; loss_options: NITPLoss.Config's
    (nitp_weight, loss_type, shift, stop_gradient, label_smoothing, z_loss_weight, softcap, chunk_size, backend).
    The model spec gets the converted model config and a state-dict adapter that exports without the projector.
    """
    if not isinstance(config, Trainer.Config):
        raise TypeError(f"config must be a torchtitan Trainer.Config, got {type(config).__name__}")
    if config.model_spec is None:
        raise ValueError("config.model_spec is None: start from a config_registry function's config")
    unknown = sorted(set(loss_options) - set(_LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"nitp_trainer_config got unexpected keyword argument(s) {unknown}; "
                        f"NITPLoss options: {list(_LOSS_OPTIONS)}")
    converter = NITPConverter.Config(target_layer=target_layer, hidden_mult=hidden_mult,
                                     use_projector=use_projector).build()
    spec = config.model_spec
    adapter = spec.state_dict_adapter
    spec = dataclasses.replace(spec, model=converter.convert(spec.model),
                               state_dict_adapter=None if adapter is None else _adapter_without_projector(adapter))
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    fields.update(model_spec=spec, loss=NITPLoss.Config(**loss_options))
    return NITPTrainer.Config(**fields)


__all__ = ["NITPConverter", "NITPLoss", "NITPTrainer", "NITPHiddenStates", "TitanNITPProjector",
           "nitp_trainer_config", "default_target_layer", "TORCHTITAN_VERSION"]
