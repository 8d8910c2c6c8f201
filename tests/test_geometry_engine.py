"""Engine geometry metrics: the probe against a plain (unsharded) model + numpy + autograd, and
the training loop logging the fields to metrics.jsonl."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_SHAPE, metrics_rows, training_state

from engine.config import make_config
from engine.data import IGNORE_INDEX
from engine.geometry import GeometryProbe, fixed_sample
from engine.model import NITPTransformer
from engine.trainer import run

RUN = dict(TINY_SHAPE, data="synthetic", vocab_size=64, seq_len=32, batch_size=2, micro_batch_size=2, log_every=100,
             nitp_layer=1, geometry_tokens=48, backend="torch", device="cpu")


def _np_effective_rank(x: np.ndarray) -> float:
    c = x - x.mean(0)
    ev = np.clip(np.linalg.eigvalsh(c.T @ c), 0, None)
    p = ev[ev > 0] / ev.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def _np_avg_cos(x: np.ndarray) -> float:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    g = u @ u.T
    n = len(x)
    return float((g.sum() - np.trace(g)) / (n * (n - 1)))


def test_probe_matches_plain_model_numpy_and_autograd(tmp_path):
    cfg = make_config("tiny", **RUN, out=str(tmp_path))
    with training_state(cfg) as state:
        metrics = GeometryProbe(state.cfg, state.data, 0, state.dist.device).measure(state.model)
        batches = fixed_sample(state.cfg, state.data, 0)
    torch.manual_seed(cfg.seed)  # the same initial weights as build_state's model, without FSDP
    plain = NITPTransformer(state.cfg)
    ids = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    with torch.no_grad():
        last, target, _ = plain.backbone(ids, cfg.nitp_layer)
        h = plain.output.norm(last)
    valid = (labels != IGNORE_INDEX).reshape(-1)
    rows = h.reshape(-1, cfg.d_model)[valid][:48].double().numpy()
    rows_t = target.reshape(-1, cfg.d_model)[valid][:48].double().numpy()
    assert metrics["geometry_tokens"] == 48
    assert metrics["eff_rank_last"] == pytest.approx(_np_effective_rank(rows), rel=1e-4)
    assert metrics["eff_rank_target"] == pytest.approx(_np_effective_rank(rows_t), rel=1e-4)
    assert metrics["avg_cos_last"] == pytest.approx(_np_avg_cos(rows), abs=1e-5)
    assert metrics["avg_cos_target"] == pytest.approx(_np_avg_cos(rows_t), abs=1e-5)

    # Gradient norms of the mean CE and mean NITP (cosine) loss with respect to h, by autograd.
    hg = h.detach().requires_grad_(True)
    ce = F.cross_entropy((hg @ plain.output.lm_head.weight.detach().T).flatten(0, 1), labels.flatten(),
                         ignore_index=IGNORE_INDEX)
    (d_ce,) = torch.autograd.grad(ce, hg)
    proj = plain.output.projector
    pred = proj(hg[:, :-1])
    row_ok = labels[:, :-1] != IGNORE_INDEX
    cos = F.cosine_similarity(pred, target[:, 1:].detach(), dim=-1)
    nitp = (1 - cos)[row_ok].mean()
    (d_nitp,) = torch.autograd.grad(nitp, hg)
    assert metrics["ce_grad_norm"] == pytest.approx(float(d_ce.norm()), rel=1e-4)
    assert metrics["nitp_grad_norm"] == pytest.approx(float(d_nitp.norm()), rel=1e-4)
    assert metrics["grad_norm_ratio"] == pytest.approx(float(d_ce.norm() / d_nitp.norm()), rel=1e-4)


@pytest.mark.parametrize("objective", ["nitp", "ntp"])
def test_training_loop_logs_geometry(tmp_path, objective):
    out = tmp_path / objective
    cfg = make_config("tiny", **RUN, objective=objective, steps=3, geometry_every=2, out=str(out))
    run(cfg)
    records = metrics_rows(out)
    geo = {r["step"]: r for r in records if "eff_rank_last" in r}
    assert sorted(geo) == [1, 2, 3]  # step 1, every 2 steps, and the last step
    for r in geo.values():
        assert 1.0 <= r["eff_rank_last"] <= cfg.d_model and 1.0 <= r["eff_rank_target"] <= cfg.d_model
        assert -1.0 <= r["avg_cos_last"] <= 1.0 and -1.0 <= r["avg_cos_target"] <= 1.0
        assert r["geometry_tokens"] == 48 and r["geometry_seconds"] > 0
        if objective == "nitp":
            assert r["ce_grad_norm"] > 0 and r["nitp_grad_norm"] > 0
            assert r["grad_norm_ratio"] == pytest.approx(r["ce_grad_norm"] / r["nitp_grad_norm"])
        else:
            assert "ce_grad_norm" not in r
    assert geo[1]["eff_rank_last"] != geo[3]["eff_rank_last"]  # measured on the model as it trains


def test_geometry_config_refused():
    with pytest.raises(ValueError, match="geometry_every"):
        make_config("tiny", geometry_every=-1)
    with pytest.raises(ValueError, match="geometry_tokens"):
        make_config("tiny", geometry_tokens=1)
