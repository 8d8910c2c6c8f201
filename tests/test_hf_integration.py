"""nitp_kernels.integrations.hf against plain PyTorch on tiny random-weight transformers models (offline).

The reference asks the unmodified model for logits and output_hidden_states=True, and computes
CE (F.cross_entropy on shifted labels) + λ·(1 − cos(P(h_t), z_{t+1})) with its own SwiGLU and cosine.
"""
import importlib.util
import math
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from nitp_kernels.integrations.hf import apply_nitp, remove_nitp, save_pretrained_without_nitp  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB, BATCH, SEQ = 97, 2, 10
_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=64)
_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=32, output_router_logits=True, router_aux_loss_coef=0.1)),
}
PRESENT = [name for name, (cfg, cls, _) in _FAMILIES.items()
           if hasattr(transformers, cfg) and hasattr(transformers, cls)]


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


def plain_pytorch_loss(model, ids, mask, labels, k: int, lam: float):
    """CE + λ·NITP (+ MoE aux) from the unmodified forward: logits and every hidden state materialised."""
    moe = {"output_router_logits": True} if hasattr(model, "router_aux_loss_coef") else {}
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **moe)
    shifted = labels[:, 1:]
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB).float(), shifted.reshape(-1), ignore_index=-100)
    h, z = out.hidden_states[-1][:, :-1], out.hidden_states[k][:, 1:].detach()
    proj = model.nitp_projector
    p = F.linear(F.silu(F.linear(h, proj.w_gate)) * F.linear(h, proj.w_up), proj.w_down)
    cos = (p * z).sum(-1) / (p.norm(dim=-1).clamp_min(1e-6) * z.norm(dim=-1).clamp_min(1e-6))
    nitp = (1 - cos)[shifted != -100].mean()
    loss = ce + lam * nitp
    if moe:
        loss = loss + model.router_aux_loss_coef * out.aux_loss
    return loss


def checked_params(model):
    """The projector and a few backbone weights, shallow and deep, that gradients must reach."""
    backbone = model.model
    return {"w_gate": model.nitp_projector.w_gate, "w_up": model.nitp_projector.w_up,
            "w_down": model.nitp_projector.w_down, "embed": backbone.embed_tokens.weight,
            "q_proj0": backbone.layers[0].self_attn.q_proj.weight,
            "o_proj_last": backbone.layers[-1].self_attn.o_proj.weight, "norm": backbone.norm.weight,
            "lm_head": model.lm_head.weight}


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in checked_params(model).items()}


def assert_rel_close(actual, expected, rel=1e-5, what=""):
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert scale > 0, f"{what}: reference is all zeros, the comparison would be empty"
    assert err <= rel * scale, f"{what}: max abs error {err:.3e} > {rel:g} × {scale:.3e}"


CASES = [(family, None, 1.0) for family in PRESENT]
if "llama" in PRESENT:
    CASES += [("llama", 0, 0.5), ("llama", 3, 1.0)]


@pytest.mark.parametrize("family,target_layer,lam", CASES)
def test_loss_and_grads_match_plain_pytorch(family, target_layer, lam):
    model = tiny_model(family)
    apply_nitp(model, target_layer=target_layer, nitp_weight=lam)
    k = round(0.2 * 4) if target_layer is None else target_layer
    ids, mask, labels = batch()
    expected = plain_pytorch_loss(model, ids, mask, labels, k, lam)
    expected_grads = grads_of(model, expected)

    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    assert_rel_close(out.loss.detach(), expected.detach(), what="loss")
    for name, grad in grads_of(model, out.loss).items():
        assert_rel_close(grad, expected_grads[name], what=f"grad {name}")
    parts = model.nitp_last_output
    assert int(parts.n_ce) == int(parts.n_nitp) == int((labels[:, 1:] != -100).sum())


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
    for name, p in checked_params(model).items():
        assert_rel_close(p.grad, full_grads[name], what=f"accumulated grad {name}")


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
