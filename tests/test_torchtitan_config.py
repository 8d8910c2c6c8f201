"""NITP on torchtitan 0.3.0 in this process: the converted model's outputs, the projector-free loss, and the
errors for what is not supported. (Trainer runs, with FSDP and tensor parallel: tests/test_torchtitan.py.)"""
import sys

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="torchtitan 0.3.0 requires Python >= 3.11")


@pytest.fixture(scope="module")
def titan():
    from nitp_kernels.integrations import torchtitan as integration
    from nitp_kernels.integrations.torchtitan_cpu import sdpa_attention

    return integration, sdpa_attention


def debug_model_config(sdpa_attention):
    from torchtitan.models.llama3 import model_registry

    return sdpa_attention(model_registry("debugmodel").model)


def trainer_config(titan, **parallelism):
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    integration, sdpa_attention = titan
    config = llama3_debugmodel()
    sdpa_attention(config.model_spec.model)
    config.training.seq_len = 64
    config.training.disable_cuda_graphs = True  # the Config refuses CUDA graphs with pipeline parallel
    for name, value in parallelism.items():
        setattr(config.parallelism, name, value)
    return integration.nitp_trainer_config(config)


def test_converted_model_returns_normed_hidden_and_hidden_states_k(titan):
    integration, sdpa_attention = titan
    from torchtitan.models.llama3.model import Llama3Model

    config = integration.NITPConverter.Config().build().convert(debug_model_config(sdpa_attention))
    assert config.nitp_target_layer == integration.default_target_layer(6) == 1  # round(0.2 x 6)
    torch.manual_seed(0)
    model = config.build()
    model.init_weights()
    assert isinstance(model, Llama3Model) and list(dict(model.named_children()))[-1] == "nitp_projector"
    tokens = torch.randint(0, 2048, (2, 16))
    with torch.no_grad():
        stock_logits = Llama3Model.forward(model, tokens)
        assert torch.equal(model(tokens), stock_logits)  # without the flag: logits, as the stock model
        model._skip_lm_head = True
        out = model(tokens)
        after_block_1 = model.layers["0"](model.tok_embeddings(tokens), None, None)
    assert isinstance(out, integration.NITPHiddenStates)
    assert torch.equal(out.shallow, after_block_1)
    assert out.hidden.shape == (2, 16, 256) and len(out.projector) == 3
    torch.testing.assert_close(F.linear(out.hidden, model.lm_head.weight), stock_logits)


def test_projector_free_loss_is_ce_plus_identity_cosine_over_global_tokens(titan):
    integration, sdpa_attention = titan
    config = integration.NITPConverter.Config(target_layer=0, use_projector=False).build().convert(
        debug_model_config(sdpa_attention))
    torch.manual_seed(0)
    model = config.build()
    model.init_weights()
    model._skip_lm_head = True
    assert model.nitp_projector is None
    tokens, labels = torch.randint(0, 2048, (2, 16)), torch.randint(0, 2048, (2, 16))
    labels[0, 3] = -100
    loss_fn = integration.NITPLoss.Config(nitp_weight=0.5).build()
    loss_fn.set_lm_head(model.lm_head)
    loss, metrics = loss_fn(model(tokens), labels, torch.tensor(40))
    hidden, shallow, _ = model(tokens)
    ce = F.cross_entropy(model.lm_head(hidden).flatten(0, 1), labels.flatten(), reduction="sum")
    nitp = ((1 - F.cosine_similarity(hidden[:, :-1], shallow[:, 1:], dim=-1)) * (labels[:, :-1] != -100)).sum()
    assert metrics == {}
    torch.testing.assert_close(loss, (ce + 0.5 * nitp) / 40, rtol=1e-5, atol=0)
    sums = loss_fn.totals.tolist()
    assert sums[1] == 31 and sums[3] == 29  # CE positions; NITP positions (no target after the last one)


@pytest.mark.parametrize("parallelism, message", [
    ({"pipeline_parallel_degree": 2}, "pipeline parallelism"),
    ({"context_parallel_degree": 2}, "context parallelism"),
    ({"tensor_parallel_degree": 2, "spmd_backend": "spmd_types"}, "partial_dtensor"),
])
def test_unsupported_parallelism_is_refused_with_the_reason(titan, parallelism, message):
    config = trainer_config(titan, **parallelism)
    with pytest.raises(NotImplementedError, match=message):
        config.model_spec.model.update_from_config(config=config)


def test_bad_options_are_refused(titan):
    integration, sdpa_attention = titan
    with pytest.raises(ValueError, match=r"target_layer must be an int in \[0, 5\]"):
        integration.NITPConverter.Config(target_layer=6).build().convert(debug_model_config(sdpa_attention))
    with pytest.raises(ValueError, match="hidden_mult"):
        integration.NITPConverter.Config(hidden_mult=0).build()
    with pytest.raises(ValueError, match="applied twice"):
        converter = integration.NITPConverter.Config().build()
        converter.convert(converter.convert(debug_model_config(sdpa_attention)))
    with pytest.raises(TypeError, match="unexpected keyword"):
        integration.nitp_trainer_config(trainer_config(titan), nitp_wieght=1.0)
    with pytest.raises(ValueError, match="nitp_weight"):
        integration.NITPLoss.Config(nitp_weight=-1.0).build()
    loss_fn = integration.NITPLoss.Config().build()
    with pytest.raises(TypeError, match="NITPConverter"):
        loss_fn(torch.zeros(2, 4, 8), torch.zeros(2, 4, dtype=torch.long))


def test_export_adapter_drops_the_projector(titan):
    integration, _ = titan
    config = trainer_config(titan)
    adapter = config.model_spec.state_dict_adapter(config.model_spec.model, None)
    torch.manual_seed(0)
    model = config.model_spec.model.build()
    hf = adapter.to_hf(model.state_dict())
    assert "lm_head.weight" in hf and "model.layers.0.mlp.gate_proj.weight" in hf
    assert not any("nitp" in key for key in hf) and any("nitp" in key for key in model.state_dict())
