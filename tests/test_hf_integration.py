"""nitp_kernels.integrations.hf against the unmodified model on tiny random-weight transformers models (offline).

The reference is a copy of the model taken before apply_nitp: its own forward with labels gives transformers' loss
(CE, Gemma2/Gemma3's logit softcap, Qwen2-MoE's router aux loss), and with output_hidden_states=True the NITP
term is computed here in plain PyTorch, 1 − cos(P(h_t), z_{t+1}) with its own SwiGLU and cosine.
"""
import copy
import importlib.util
import math
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from nitp_kernels.integrations.hf import (SUPPORTED_MODEL_CLASSES, apply_nitp, remove_nitp,  # noqa: E402
                                          save_pretrained_without_nitp)

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB, BATCH, SEQ = 97, 2, 10
# Small enough to bend the tiny models' logits: ignoring or doubling it moves the loss by ~1e-3 (relative).
SOFTCAP = 0.2
_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
               bos_token_id=1, eos_token_id=2)
_SLIDING = dict(final_logit_softcapping=SOFTCAP, sliding_window=6)  # Gemma2/3 alternate sliding and full layers
_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=32, output_router_logits=True, router_aux_loss_coef=0.1)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", _SLIDING),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", _SLIDING),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}),  # scales its logits: refused
}
PRESENT = [name for name, (cfg, cls, _) in _FAMILIES.items()
           if hasattr(transformers, cfg) and hasattr(transformers, cls)]
SUPPORTED = [name for name in PRESENT if _FAMILIES[name][1] in SUPPORTED_MODEL_CLASSES]


def test_every_supported_class_is_tested_here():
    assert sorted(SUPPORTED_MODEL_CLASSES) == sorted(cls for _, cls, _ in _FAMILIES.values()
                                                    if cls in SUPPORTED_MODEL_CLASSES)


def tiny_model(family: str = "llama", seed: int = 0):
    config_name, class_name, extra = _FAMILIES[family]
    config = getattr(transformers, config_name)(**_COMMON, **extra)
    torch.manual_seed(seed)
    return getattr(transformers, class_name)(config)


def batch(seed: int = 1):
    """Token ids, an attention mask with left padding in row 1, and transformers-style (unshifted) labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 6] = -100  # an ignored label in the middle of a sequence as well
    return ids, mask, labels


def plain_pytorch_nitp(hidden_states, labels, k: int, projector_weights):
    """mean over labelled t of 1 − cos(P(h_t), sg[z_{t+1}]), from the unmodified model's hidden states."""
    h, z = hidden_states[-1][:, :-1], hidden_states[k][:, 1:].detach()
    w_gate, w_up, w_down = projector_weights
    p = F.linear(F.silu(F.linear(h, w_gate)) * F.linear(h, w_up), w_down)
    cos = (p * z).sum(-1) / (p.norm(dim=-1).clamp_min(1e-6) * z.norm(dim=-1).clamp_min(1e-6))
    return (1 - cos)[labels[:, 1:] != -100].mean()


def grads_of(model, loss):
    """Every parameter's gradient by name (None where the loss does not reach it)."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def assert_rel_close(actual, expected, rel=1e-5, what=""):
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert scale > 0, f"{what}: reference is all zeros, the comparison would be empty"
    assert err <= rel * scale, f"{what}: max abs error {err:.3e} > {rel:g} × {scale:.3e}"


def assert_grads_match(actual: dict, expected: dict, rel=1e-5):
    """Same gradient for every parameter; an all-zero reference (an MoE expert no token chose) must stay zero."""
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got = actual[name]
        if want is None or not want.any():
            assert got is None or not got.any(), f"grad {name}: nonzero where the reference has none"
        else:
            assert got is not None, f"grad {name}: missing"
            assert_rel_close(got, want, rel, what=f"grad {name}")


CASES = [(family, None, lam) for family in SUPPORTED for lam in (0.0, 1.0)]
if "llama" in SUPPORTED:
    CASES += [("llama", 0, 0.5), ("llama", 3, 1.0)]


@pytest.mark.parametrize("family,target_layer,lam", CASES)
def test_loss_and_grads_match_the_model_and_plain_pytorch_nitp(family, target_layer, lam):
    """λ = 0: exactly the model's own loss and gradients; λ > 0: that loss + λ·NITP, NITP computed here."""
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    apply_nitp(model, target_layer=target_layer, nitp_weight=lam)
    k = round(0.2 * 4) if target_layer is None else target_layer
    ids, mask, labels = batch()

    ref_out = reference(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    projector_weights = [w.detach().clone().requires_grad_() for w in model.nitp_projector.parameters()]
    ref_nitp = plain_pytorch_nitp(ref_out.hidden_states, labels, k, projector_weights)
    expected = ref_out.loss + lam * ref_nitp if lam else ref_out.loss  # λ = 0: transformers' loss alone
    expected_grads = grads_of(reference, expected)
    for name, w in zip(("w_gate", "w_up", "w_down"), projector_weights):
        expected_grads[f"nitp_projector.{name}"] = w.grad

    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    assert_rel_close(out.loss.detach(), expected.detach(), what="loss")
    assert_rel_close(model.nitp_last_output.nitp_loss, ref_nitp.detach(), what="NITP term")
    assert_grads_match(grads_of(model, out.loss), expected_grads)
    parts = model.nitp_last_output
    assert int(parts.n_ce) == int(parts.n_nitp) == int((labels[:, 1:] != -100).sum())


@pytest.mark.skipif("gemma2" not in SUPPORTED, reason="needs Gemma2ForCausalLM")
def test_logit_softcap_is_read_from_the_config_at_every_call():
    ids, mask, labels = batch()
    model = tiny_model("gemma2")
    reference = copy.deepcopy(model)
    apply_nitp(model, nitp_weight=0.0)
    losses = {}
    for softcap in (SOFTCAP, None, 2 * SOFTCAP):
        model.config.final_logit_softcapping = reference.config.final_logit_softcapping = softcap
        losses[softcap] = model(input_ids=ids, attention_mask=mask, labels=labels).loss.detach()
        want = reference(input_ids=ids, attention_mask=mask, labels=labels).loss.detach()
        assert_rel_close(losses[softcap], want, what=f"loss with final_logit_softcapping={softcap}")
    # The comparisons here and in the family test would catch a softcap ignored (None) or misread (doubled): at
    # SOFTCAP either moves the loss by more than 50 times their 1e-5 tolerance.
    assert abs(losses[SOFTCAP] - losses[None]) > 50 * 1e-5 * losses[None]
    assert abs(losses[SOFTCAP] - losses[2 * SOFTCAP]) > 50 * 1e-5 * losses[None]

    with pytest.raises(ValueError, match="final_logit_softcapping"):
        apply_nitp(tiny_model("gemma2"), softcap=30.0)  # would contradict the model's own forward
    bad = tiny_model("gemma2")
    bad.config.final_logit_softcapping = -1.0
    with pytest.raises(ValueError, match="final_logit_softcapping.*-1.0"):
        apply_nitp(bad)


@pytest.mark.skipif("cohere" not in PRESENT, reason="needs CohereForCausalLM")
def test_a_family_that_scales_its_logits_is_refused_with_the_way_out():
    model = tiny_model("cohere")  # logits = lm_head(h) · config.logit_scale
    with pytest.raises(ValueError, match=r"got CohereForCausalLM\. .*fused_nitp_loss.*fused_linear_cross_entropy"):
        apply_nitp(model)
    assert "forward" not in model.__dict__ and not hasattr(model, "nitp_projector")
    if hasattr(transformers, "Gemma3ForConditionalGeneration"):
        # The refusal looks only at the class; building a real one would import its vision tower (seconds).
        multimodal = transformers.Gemma3ForConditionalGeneration.__new__(transformers.Gemma3ForConditionalGeneration)
        with pytest.raises(ValueError, match=r"got Gemma3ForConditionalGeneration \(.*is Gemma3ForCausalLM"):
            apply_nitp(multimodal)


@pytest.mark.skipif("llama" not in PRESENT, reason="needs LlamaForCausalLM")
def test_ce_part_equals_transformers_loss_and_accumulation_is_exact():
    model = tiny_model("llama")
    ids, mask, labels = batch()
    hf_ce = model(input_ids=ids, attention_mask=mask, labels=labels).loss.detach()
    apply_nitp(model)
    full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert_rel_close(model.nitp_last_output.ce_loss, hf_ce, what="ce part vs transformers' own loss")
    full_grads = grads_of(model, full)

    # Two micro-batches with Trainer's num_items_in_batch (the count over both) sum to the full-batch mean.
    num_items = (labels[:, 1:] != -100).sum()
    model.zero_grad(set_to_none=True)
    total = 0.0
    for rows in (slice(0, 1), slice(1, 2)):
        part = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows],
                     num_items_in_batch=num_items).loss
        part.backward()
        total += part.item()
    assert math.isclose(total, full.item(), rel_tol=1e-5)
    assert_grads_match({name: p.grad for name, p in model.named_parameters()}, full_grads)


@pytest.mark.skipif("llama" not in PRESENT, reason="needs LlamaForCausalLM")
def test_remove_nitp_restores_logits_and_generation_works():
    model = tiny_model("llama").eval()
    ids, mask, _ = batch()
    logits = model(input_ids=ids, attention_mask=mask).logits
    keys = set(model.state_dict())
    greedy = model.generate(ids[:1], max_new_tokens=4, do_sample=False)

    apply_nitp(model)
    assert {"nitp_projector.w_gate", "nitp_projector.w_up", "nitp_projector.w_down"} <= set(model.state_dict())
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)  # no labels: untouched path
    assert torch.equal(model.generate(ids[:1], max_new_tokens=4, do_sample=False), greedy)
    as_tuple = model(input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].dim() == 0

    remove_nitp(model)
    assert "forward" not in model.__dict__ and set(model.state_dict()) == keys
    assert not model.model.layers[1]._forward_pre_hooks
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)
    assert model(input_ids=ids, labels=ids).logits is not None  # transformers' own loss path again


@pytest.mark.skipif("llama" not in PRESENT, reason="needs LlamaForCausalLM")
def test_save_pretrained_without_nitp_loads_as_plain_model(tmp_path):
    model = tiny_model("llama").eval()
    apply_nitp(model)
    ids, mask, _ = batch()
    save_pretrained_without_nitp(model, str(tmp_path))
    assert hasattr(model, "nitp_projector")  # still training-ready
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert not any("nitp" in key for key in loaded.state_dict())
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                       model(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.skipif("llama" not in PRESENT, reason="needs LlamaForCausalLM")
def test_bad_input_is_refused_with_a_clear_message():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="LlamaModel"):
        apply_nitp(model.model)  # the backbone has no LM head
    with pytest.raises(ValueError, match="Linear"):
        apply_nitp(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="target_layer"):
        apply_nitp(model, target_layer=4)
    with pytest.raises(ValueError, match="reduction"):
        apply_nitp(model, reduction="sum")
    with pytest.raises(TypeError, match="bogus"):
        apply_nitp(model, bogus=1)
    with pytest.raises(ValueError, match="loss_type"):
        apply_nitp(model, loss_type="l3")
    with pytest.raises(ValueError, match="not been applied"):
        remove_nitp(model)
    assert "forward" not in model.__dict__ and not hasattr(model, "nitp_projector")  # nothing half-applied
    apply_nitp(model)
    with pytest.raises(ValueError, match="already applied"):
        apply_nitp(model)


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="Trainer needs accelerate")
def test_trainer_example_runs_three_steps(tmp_path):
    spec = importlib.util.spec_from_file_location("hf_trainer_example", REPO / "examples" / "hf_trainer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer = example.main(str(tmp_path), max_steps=3)

    assert trainer.state.global_step == 3
    assert trainer.model_accepts_loss_kwargs  # so Trainer passes num_items_in_batch to the wrapped forward
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    for weight in trainer.model.nitp_projector.parameters():  # the projector was trained by Trainer's AdamW
        assert trainer.optimizer.state[weight]["exp_avg"].abs().sum() > 0
    assert (tmp_path / "final" / "config.json").exists()


def test_importing_nitp_kernels_does_not_import_transformers():
    code = ("import sys, nitp_kernels, nitp_kernels.integrations, nitp_kernels.integrations.hf; "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


@pytest.mark.skipif("llama" not in PRESENT, reason="needs LlamaForCausalLM")
def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_nothing():
    ids, mask, labels = batch()
    plain, checkpointed = tiny_model("llama"), tiny_model("llama")
    # transformers 5.x checkpoints forward (hooks outside), 4.x checkpointed __call__ (hooks replayed in backward).
    enable = getattr(checkpointed, "activation_checkpointing_enable", None)
    (enable or checkpointed.gradient_checkpointing_enable)()
    grads = []
    for model in (plain, checkpointed):
        apply_nitp(model)
        torch.manual_seed(3)
        model.nitp_projector.reset_parameters()  # same projector in both models
        grads.append(grads_of(model, model(input_ids=ids, attention_mask=mask, labels=labels).loss))
        assert model._nitp_state.recorded is None  # no reference to hidden_states[k] outlives the call
    for name, grad in grads[1].items():
        assert_rel_close(grad, grads[0][name], what=f"checkpointed grad {name}")
