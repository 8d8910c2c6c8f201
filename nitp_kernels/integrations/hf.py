"""NITP for Hugging Face transformers causal LMs in one call, as Liger-Kernel's apply_liger_kernel_to_* does.

    from nitp_kernels.integrations.hf import apply_nitp, save_pretrained_without_nitp
    apply_nitp(model)                                   # Llama, Mistral, Qwen2/3, Qwen2-MoE, Gemma 1/2/3, Phi3, OLMo2
    loss = model(input_ids, labels=input_ids).loss      # CE + λ·NITP, fused: logits are never built
    save_pretrained_without_nitp(model, "out/")         # a plain transformers checkpoint, no projector

How it works, without editing transformers:
- `model.nitp_projector` (an NITPProjector, in the LM head's dtype and device) is a registered submodule, so
  optimizers, FSDP, `state_dict` and Trainer checkpoints see it.
- A forward pre-hook on decoder layer k records that layer's input, which is `hidden_states[k]` in transformers'
  numbering (0 = the embeddings, k = after decoder layer k). It records only while an NITP forward runs, so
  generation and the recomputation of activation checkpointing keep nothing; the model is never asked for
  `output_hidden_states`, which would keep every layer.
- `model.forward` is replaced on the instance by a wrapper. Without labels it calls the original forward
  unchanged (logits, generation, caches). With labels it runs the backbone (`model.model`) with every argument
  passed through, then `fused_nitp_loss` on the final normed hidden states, the LM head's weight and the
  recorded layer: `.loss` is CE + λ·NITP and `.logits` is None. MoE router aux loss is added as transformers
  adds it.
- Only families whose logits were checked to be exactly `lm_head(final normed hidden)` (bias included), optionally
  tanh-softcapped by a config attribute (Gemma2/Gemma3's final_logit_softcapping, read at every call as their
  forward reads it), are accepted: the fused op must see the same inputs as the model's own loss. Families that
  scale the logits (Cohere's logit_scale, Granite's logits_scaling, ...) or build them otherwise are refused.

Labels follow transformers' convention (labels[t] is token t; -100 ignored); they are shifted here to the op's
convention (labels[t] is token t+1). A `shift_labels` argument, as transformers' loss takes, is used as given.
With `num_items_in_batch` (Trainer passes it), the losses are summed and divided by it, so gradient accumulation
and data parallelism are exact; without it each term is the mean over its own positions. With the default
shift=1 every CE position also has an NITP target, so both divisions count the same positions (with shift > 1
the NITP sum is divided by the CE count, slightly more positions than it has).

With Trainer: do not set TrainingArguments.label_smoothing_factor or compute_loss_func. Trainer then takes the
labels out of the inputs and computes its own loss from logits, so the model is called without labels and NITP
is not trained; pass label_smoothing to apply_nitp instead. Evaluation with labels returns the loss and no
logits; for metrics that need logits, call the model without labels (or remove_nitp first).
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
import types
from typing import Any, Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..api import NITPLossOutput, fused_nitp_loss
from ..modules import NITPProjector
from ..options import BACKENDS, validate_options


@dataclasses.dataclass(frozen=True)
class _Family:
    """How a transformers causal LM makes its logits and loss, beyond logits = lm_head(model.model(...)[0])."""

    logit_softcap_config: Optional[str] = None  # config attribute c: logits = c·tanh(logits / c) when c is set
    moe: bool = False  # adds its router load-balancing loss with output_router_logits


# Each entry was checked against the family's transformers 5.x forward (the tests compare losses and gradients).
_FAMILIES = {
    "LlamaForCausalLM": _Family(), "MistralForCausalLM": _Family(), "Qwen2ForCausalLM": _Family(),
    "Qwen3ForCausalLM": _Family(), "Qwen2MoeForCausalLM": _Family(moe=True),
    "GemmaForCausalLM": _Family(),  # its √d embedding scale is inside embed_tokens, hence in hidden_states[0]
    "Gemma2ForCausalLM": _Family(logit_softcap_config="final_logit_softcapping"),
    "Gemma3ForCausalLM": _Family(logit_softcap_config="final_logit_softcapping"),  # the text-only Gemma3
    "Phi3ForCausalLM": _Family(), "Olmo2ForCausalLM": _Family(),
}
SUPPORTED_MODEL_CLASSES = tuple(_FAMILIES)
# What to do instead, for refused classes that users reach for most often.
_REFUSAL_HINTS = {
    "Gemma3ForConditionalGeneration": "the multimodal Gemma3 (what AutoModelForCausalLM gives for model_type "
                                      "gemma3) keeps its decoder under model.language_model; the text-only "
                                      "Gemma3 (model_type gemma3_text) is Gemma3ForCausalLM, which is supported",
}

# Options forwarded to fused_nitp_loss. `reduction` is not among them: it follows num_items_in_batch.
_OP_OPTIONS = ("shift", "stop_gradient", "ignore_index", "label_smoothing", "z_loss_weight", "softcap",
               "chunk_size", "backend")
_STATE_ATTR = "_nitp_state"
PROJECTOR_ATTR = "nitp_projector"
LAST_OUTPUT_ATTR = "nitp_last_output"


@dataclasses.dataclass
class _NITPState:
    """Everything apply_nitp changed on a model, kept on it so remove_nitp can undo exactly that."""

    target_layer: int
    nitp_weight: float
    loss_type: str
    op_options: dict
    load_balancing_loss: Optional[Callable]  # the MoE family's own aux loss function; None for dense models
    logit_softcap_config: Optional[str]  # the config attribute that softcaps the logits, read at every call
    original_forward: Callable
    original_signature: inspect.Signature
    instance_forward: Optional[Callable]  # a forward set on the instance before us (restored on removal)
    hook: Any = None
    wrapper: Optional[Callable] = None
    recording: bool = False
    recorded: Optional[Tensor] = None

    def record_layer_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on decoder layer k: its input is hidden_states[k]."""
        if self.recording:
            self.recorded = args[0] if args else kwargs["hidden_states"]


def _supported_class(model: nn.Module) -> type:
    """The transformers class in model's MRO that apply_nitp knows, or a ValueError naming model's class."""
    for klass in type(model).__mro__:
        if klass.__name__ in SUPPORTED_MODEL_CLASSES and klass.__module__.startswith("transformers."):
            return klass
    name = type(model).__name__
    hint = f" ({_REFUSAL_HINTS[name]})" if name in _REFUSAL_HINTS else ""
    raise ValueError(
        f"apply_nitp supports transformers' {', '.join(SUPPORTED_MODEL_CLASSES)} (and subclasses); got "
        f"{name}{hint}. A family is supported only once its logits (LM head, scaling, softcapping) are checked to "
        "be what the fused op computes. For another model, call nitp_kernels.fused_nitp_loss (or "
        "fused_linear_cross_entropy for CE alone) on its final normed hidden states and LM-head weight")


def _check_layout(model: nn.Module) -> int:
    """Check the attributes the wrapper relies on; return the number of decoder layers."""
    backbone = getattr(model, "model", None)
    layers = getattr(backbone, "layers", None)
    lm_head = getattr(model, "lm_head", None)
    if not isinstance(layers, nn.ModuleList) or not isinstance(lm_head, nn.Linear):
        raise ValueError(f"{type(model).__name__} does not have the expected layout (model.model.layers as an "
                         "nn.ModuleList and model.lm_head as an nn.Linear)")
    return min(int(model.config.num_hidden_layers), len(layers))


def _load_balancing_loss(klass: type) -> Optional[Callable]:
    # Looked up from the transformers class itself: FSDP2 later swaps type(model) for a class defined in torch.
    if not _FAMILIES[klass.__name__].moe:
        return None
    return sys.modules[klass.__module__].load_balancing_loss_func


def _config_logit_softcap(model: nn.Module, config_attr: Optional[str]) -> Optional[float]:
    """The softcap the model's own forward applies to its logits (None: none), checked as the op checks it."""
    if config_attr is None:
        return None
    value = getattr(model.config, config_attr, None)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
        raise ValueError(f"{type(model).__name__}: config.{config_attr} must be None or a number > 0 (the logit "
                         f"softcap its forward applies), got {value!r}")
    return value


def default_target_layer(num_layers: int) -> int:
    """round(0.2 × layers), the paper's choice of k near 20% of depth (3 of 16, 5 of 24, 6 of 28)."""
    return min(round(0.2 * num_layers), num_layers - 1)


def _validated_op_options(nitp_weight: float, loss_type: str, op_options: dict) -> dict:
    if "reduction" in op_options:
        raise ValueError("reduction is not an option of apply_nitp: the loss is a mean, or a sum divided by "
                         "num_items_in_batch when the caller (e.g. Trainer) passes it")
    unknown = sorted(set(op_options) - set(_OP_OPTIONS))
    if unknown:
        raise TypeError(f"apply_nitp got unexpected keyword argument(s) {unknown}; fused_nitp_loss options "
                        f"accepted here: {list(_OP_OPTIONS)}")
    backend = op_options.get("backend", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    checked = {k: v for k, v in op_options.items() if k != "backend"}
    validate_options(nitp_weight=nitp_weight, loss_type=loss_type, **checked)
    return dict(op_options)


def apply_nitp(model: nn.Module, target_layer: Optional[int] = None, nitp_weight: float = 1.0,
               loss_type: str = "cosine", *, hidden_mult: int = 4, use_projector: bool = True,
               **op_options: Any) -> nn.Module:
    """Make `model(..., labels=...)` return CE + nitp_weight·NITP as `.loss`, fused, without building logits.

    model: a transformers causal LM of a class in SUPPORTED_MODEL_CLASSES (Llama, Mistral, Qwen2, Qwen3,
        Qwen2-MoE, Gemma, Gemma2, Gemma3 text, Phi3, OLMo2) or a subclass; others raise ValueError naming the
        class. Gemma2/Gemma3's logit softcap is config.final_logit_softcapping, read at every call (the softcap
        option is refused for them).
    target_layer: k of hidden_states[k] (0 = embeddings, k = after decoder layer k), in [0, layers-1];
        default round(0.2 × layers).
    nitp_weight, loss_type: λ and the NITP loss ("cosine", "mse", "smooth_l1", "kl").
    hidden_mult: projector width as a multiple of hidden_size (the paper's 4).
    use_projector: False for the projector-free ablation (P = identity; no submodule is added).
    op_options: fused_nitp_loss's shift, stop_gradient, ignore_index, label_smoothing, z_loss_weight, softcap,
        chunk_size, backend.

    Adds `model.nitp_projector`; after each loss forward `model.nitp_last_output` holds the detached parts for
    logging: an NITPLossOutput whose loss is CE + λ·NITP as returned (divided by num_items_in_batch when given;
    before any MoE aux loss) and whose ce_loss / nitp_loss / z_loss are means over that call's positions.
    Returns model.
    Undo with remove_nitp(model); save a checkpoint without the projector with save_pretrained_without_nitp.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers causal LM (nn.Module), got {type(model).__name__}")
    klass = _supported_class(model)
    if getattr(model, _STATE_ATTR, None) is not None:
        raise ValueError("apply_nitp was already applied to this model; call remove_nitp(model) first")
    num_layers = _check_layout(model)
    if target_layer is None:
        target_layer = default_target_layer(num_layers)
    if not isinstance(target_layer, int) or isinstance(target_layer, bool) or not 0 <= target_layer < num_layers:
        raise ValueError(f"target_layer must be an int in [0, {num_layers - 1}] (hidden_states index: 0 = "
                         f"embeddings, k = after decoder layer k), got {target_layer!r}")
    if not isinstance(use_projector, bool):
        raise TypeError(f"use_projector must be a bool, got {type(use_projector).__name__}")
    op_options = _validated_op_options(nitp_weight, loss_type, op_options)
    softcap_config = _FAMILIES[klass.__name__].logit_softcap_config
    if softcap_config is not None:
        if "softcap" in op_options:
            raise ValueError(f"softcap is not an option for {klass.__name__}: its logits are softcapped by "
                             f"config.{softcap_config} (now {getattr(model.config, softcap_config, None)!r}), "
                             "which apply_nitp reads at every call; set that instead")
        _config_logit_softcap(model, softcap_config)
    if use_projector:  # validates hidden_mult before anything on the model changes
        lm_weight = model.lm_head.weight
        projector = NITPProjector(int(model.config.hidden_size), hidden_mult, device=lm_weight.device,
                                  dtype=lm_weight.dtype)

    state = _NITPState(
        target_layer=target_layer, nitp_weight=float(nitp_weight), loss_type=loss_type, op_options=op_options,
        load_balancing_loss=_load_balancing_loss(klass), logit_softcap_config=softcap_config,
        original_forward=model.forward, original_signature=inspect.signature(model.forward),
        instance_forward=model.__dict__.get("forward"))
    if use_projector:
        setattr(model, PROJECTOR_ATTR, projector)
    # Bound methods (not closures) for the hook and the forward, so that copy.deepcopy(model) rebinds them.
    state.hook = model.model.layers[target_layer].register_forward_pre_hook(state.record_layer_input,
                                                                            with_kwargs=True)
    state.wrapper = types.MethodType(_forward_with_signature(state.original_signature), model)
    setattr(model, _STATE_ATTR, state)
    model.forward = state.wrapper
    return model


def _forward_with_signature(signature: inspect.Signature) -> Callable:
    """A fresh function calling _nitp_forward, which shows transformers' forward signature to inspect.

    Trainer reads that signature to keep dataset columns and to decide to pass num_items_in_batch.
    """
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _nitp_forward(self, *args, **kwargs)

    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = signature.replace(parameters=[self_param, *signature.parameters.values()])
    forward.__doc__ = _nitp_forward.__doc__
    return forward


def _nitp_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The wrapped forward: the original one without labels, the fused NITP loss with them."""
    state: _NITPState = getattr(self, _STATE_ATTR)
    bound = state.original_signature.bind_partial(*args, **kwargs)
    arguments: dict = {}
    for name, value in bound.arguments.items():
        if state.original_signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        else:
            arguments[name] = value
    labels = arguments.pop("labels", None)
    if labels is None:
        return state.original_forward(*args, **kwargs)
    return _loss_forward(self, state, labels, arguments)


def _loss_forward(model: nn.Module, state: _NITPState, labels: Tensor, arguments: dict) -> Any:
    arguments.pop("logits_to_keep", None)  # no logits are built, so there is nothing to slice
    num_items_in_batch = arguments.pop("num_items_in_batch", None)
    shift_labels = arguments.pop("shift_labels", None)
    return_dict = arguments.pop("return_dict", None)
    output_router_logits = False
    is_moe = state.load_balancing_loss is not None
    if is_moe:
        output_router_logits = arguments.pop("output_router_logits", None)
        if output_router_logits is None:
            output_router_logits = bool(getattr(model.config, "output_router_logits", False))
        arguments["output_router_logits"] = output_router_logits

    state.recorded, state.recording = None, True
    try:
        outputs = model.model(**arguments, return_dict=True)
        shallow = state.recorded
    finally:
        state.recorded, state.recording = None, False
    if shallow is None:
        raise RuntimeError(f"decoder layer {state.target_layer} did not run, so hidden_states"
                           f"[{state.target_layer}] could not be recorded")

    hidden = outputs.last_hidden_state
    ignore_index = state.op_options.get("ignore_index", -100)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    op_options = state.op_options
    if state.logit_softcap_config is not None:
        op_options = {**op_options, "softcap": _config_logit_softcap(model, state.logit_softcap_config)}
    result = fused_nitp_loss(
        hidden, model.lm_head.weight, shift_labels.to(hidden.device), shallow.to(hidden.device, hidden.dtype),
        getattr(model, PROJECTOR_ATTR, None), lm_bias=model.lm_head.bias, nitp_weight=state.nitp_weight,
        loss_type=state.loss_type, reduction=reduction, **op_options)
    loss = result.loss
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    setattr(model, LAST_OUTPUT_ATTR, _per_position_means(result, loss, reduction))

    extra = {}
    if is_moe:
        aux_loss = None
        if output_router_logits:
            aux_loss = state.load_balancing_loss(outputs.router_logits, model.num_experts,
                                                 model.num_experts_per_tok, arguments.get("attention_mask"))
            loss = loss + model.router_aux_loss_coef * aux_loss.to(loss.device)
        extra = {"aux_loss": aux_loss, "router_logits": getattr(outputs, "router_logits", None)}
    output = _causal_lm_output(is_moe, loss, outputs, extra)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    return output if return_dict is not False else output.to_tuple()


def _per_position_means(result: NITPLossOutput, loss: Tensor, reduction: str) -> NITPLossOutput:
    """The parts for logging, as means over this call's positions whatever the reduction."""
    if reduction == "mean":
        ce, nitp, z = result.ce_loss, result.nitp_loss, result.z_loss
    else:
        n_ce = result.n_ce.clamp(min=1).to(result.ce_loss.dtype)
        ce, z = result.ce_loss / n_ce, result.z_loss / n_ce
        nitp = result.nitp_loss / result.n_nitp.clamp(min=1).to(result.nitp_loss.dtype)
    return NITPLossOutput(loss.detach(), ce, nitp, z, result.n_ce, result.n_nitp)


def _causal_lm_output(is_moe: bool, loss: Tensor, outputs: Any, extra: dict) -> Any:
    """transformers' own output class, with logits None; field names read from it (`cache` in 5.x)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

    output_class = MoeCausalLMOutputWithPast if is_moe else CausalLMOutputWithPast
    fields = {field.name for field in dataclasses.fields(output_class)}
    values = {"loss": loss, "logits": None, **extra}
    for name in ("cache", "past_key_values", "hidden_states", "attentions"):
        if name in fields:
            values[name] = getattr(outputs, name, None)
    return output_class(**{k: v for k, v in values.items() if k in fields})


def _state(model: nn.Module) -> _NITPState:
    state = getattr(model, _STATE_ATTR, None) if isinstance(model, nn.Module) else None
    if state is None:
        raise ValueError(f"apply_nitp has not been applied to this {type(model).__name__}")
    return state


def remove_nitp(model: nn.Module) -> nn.Module:
    """Undo apply_nitp: original forward, no hook, no projector; logits are then exactly the original model's.

    Raises ValueError if apply_nitp was not applied, or if something replaced model.forward after apply_nitp
    (restoring ours would silently drop that wrapper; to save a checkpoint use save_pretrained_without_nitp).
    """
    state = _state(model)
    if model.__dict__.get("forward") is not state.wrapper:
        raise ValueError("model.forward was replaced after apply_nitp (e.g. by a mixed-precision wrapper); "
                         "remove that wrapper first, or use save_pretrained_without_nitp to save")
    state.hook.remove()
    if state.instance_forward is None:
        del model.forward
    else:
        model.forward = state.instance_forward
    if PROJECTOR_ATTR in model._modules:
        delattr(model, PROJECTOR_ATTR)
    model.__dict__.pop(LAST_OUTPUT_ATTR, None)
    delattr(model, _STATE_ATTR)
    return model


def save_pretrained_without_nitp(model: nn.Module, save_directory: str, **save_kwargs: Any) -> None:
    """model.save_pretrained(save_directory, **save_kwargs) without the projector; NITP stays applied.

    The result loads with the plain transformers class (from_pretrained) with no unexpected keys. A checkpoint
    that Trainer writes during training keeps the projector, so training can resume from it.
    """
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    projector = model._modules.pop(PROJECTOR_ATTR, None)
    try:
        model.save_pretrained(save_directory, **save_kwargs)
    finally:
        if projector is not None:
            model._modules[PROJECTOR_ATTR] = projector


__all__ = ["apply_nitp", "remove_nitp", "save_pretrained_without_nitp", "default_target_layer",
           "SUPPORTED_MODEL_CLASSES"]
