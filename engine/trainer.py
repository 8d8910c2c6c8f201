"""The training loop: build a TrainState, then run one optimizer step at a time.

Loss normalisation (exact under gradient accumulation and data parallelism). Each forward
returns *sums* over its valid positions. Before the forwards of a step, every rank counts the
valid positions of all its micro-batches from the labels and the counts are all-reduced:
N_ce (labels != -100), N_nitp (also t + shift < T, the op's rule) and N_seq (sequences). The
fused op computes loss = ce_sum + w·nitp_sum with its nitp_weight w; we pass
w = λ·N_ce/N_nitp and divide by N_ce, so the step minimises

    ce_sum/N_ce + λ·nitp_sum/N_nitp      (cosreg: + λ·Σ_seq penalty/N_seq)

over the whole global batch, whatever its split into ranks and micro-batches. (The op's
ce_loss / nitp_loss outputs are detached, so the weighting has to go through its arguments.)
FSDP2 averages gradients over ranks, so the backward loss is also multiplied by world_size.
The MoE load-balancing loss is a per-micro-batch mean, averaged over micro-batches and ranks.

Extension points: TrainState holds everything that evolves (model, optimizer, scheduler, data
loader position, step) and saves itself: ``state_dict`` / ``load_state_dict`` (JSON) and
``tensor_state`` (DCP Stateful objects), handed to the checkpointer, which only does IO;
``train_step`` is the body of one optimizer step; ``run`` is the outer loop (logging, evaluation).
The run directory is claimed (lock, relaunch rules: engine/run_dir.py) before any data or model
work; resume semantics: engine/checkpoint/resume.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from engine.checkpoint import Checkpointer, check_resumable
from engine.checkpoint.stateful import ModelState, OptimizerState
from engine.cli import check_environment
from engine.config import TrainConfig, gradient_accumulation_steps, validate, with_micro_batch_size
from engine.data import IGNORE_INDEX, DataBundle, build_data
from engine.faults import StopSignals, TrainingDiverged, debug_nan_steps, debug_signal_after
from engine.flops import training_flops_per_token
from engine.geometry import GeometryProbe
from engine.metrics import RunLogger, peak_flops_per_device, peak_memory_bytes, truncate_metrics
from engine.model import HFImportError, NITPTransformer, config_from_hf
from engine.optim import build_optimizer, build_scheduler
from engine.parallel import DistInfo, build_model, close_distributed, init_distributed
from engine.run_dir import RunDirLock, claim_run_dir_on_rank0
from nitp_kernels.contract import valid_positions


@dataclass
class TrainState:
    """Everything that evolves during training (and what a checkpoint must save)."""

    cfg: TrainConfig
    dist: DistInfo
    model: NITPTransformer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: DataBundle
    step: int = 0                       # optimizer steps completed
    bad_steps: int = 0                  # steps skipped for a non-finite loss or grad norm
    consecutive_bad_steps: int = 0
    run_lock: RunDirLock | None = None  # rank 0: the lock on cfg.out (engine/run_dir.py)
    # The parameter-group settings this run's config and device give (the schedule's base lr,
    # betas, weight decay, fused/foreach): a resume puts them back over the checkpoint's.
    _group_settings: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._group_settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """The JSON part of a checkpoint (state.json): position, counters, and what it was made with."""
        return {"step": self.step, "bad_steps": self.bad_steps, "consecutive_bad_steps": self.consecutive_bad_steps,
                "loader": self.data.train.state_dict(), "world_size": self.dist.world_size,
                "config": self.cfg.to_dict(), "data_info": self.data.info}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()`` output, after ``tensor_state()`` was loaded.

        The LR scheduler is not restored but rebuilt from this run's config at the resumed step,
        and the optimizer's group settings are this run's: schedule and optimizer changes made
        on resume take effect at once (engine/checkpoint/resume.py).
        """
        self.data.train.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.bad_steps = int(state.get("bad_steps", 0))
        self.consecutive_bad_steps = int(state.get("consecutive_bad_steps", 0))
        for group, settings in zip(self.optimizer.param_groups, self._group_settings, strict=True):
            group.update(settings)
        self.scheduler = build_scheduler(self.optimizer, self.cfg, start_step=self.step)

    def tensor_state(self) -> dict[str, Any]:
        """The tensors of a checkpoint, as DCP Stateful objects (saved and loaded sharded)."""
        return {"model": ModelState(self.model), "optim": OptimizerState(self.model, self.optimizer)}

    def check_resumable(self, saved: dict[str, Any], where: str) -> None:
        """Refuse (ResumeMismatchError) a checkpoint this run may not continue, naming every difference."""
        check_resumable(saved, self.cfg.to_dict(), self.data.info, where)

    def close(self) -> None:
        """Release the run directory and leave the process group (if this state joined it)."""
        if self.run_lock is not None:
            self.run_lock.release()
        close_distributed(self.dist)


def build_state(cfg: TrainConfig) -> TrainState:
    """Join the process group, claim cfg.out, open the data, build and shard the model, make the optimizer."""
    check_environment(cfg)  # the machine and the paths, before joining a process group or any data work
    info = init_distributed(cfg)
    lock = None
    try:
        # --out first: a folder in use or holding an earlier run is refused before any data or model work
        lock = claim_run_dir_on_rank0(cfg.out, cfg.resume, cfg.overwrite, info.rank, info.world_size)
        hf_weights = None
        if cfg.init_from_hf:  # continued pre-training from a Hugging Face checkpoint
            cfg, hf_weights = config_from_hf(cfg)
        validate(cfg, info.world_size)
        cfg = with_micro_batch_size(cfg, info.world_size)  # "auto" -> this world size's micro-batch
        data = build_data(cfg, rank=info.rank, world_size=info.world_size)
        if hf_weights is not None and data.vocab_size > cfg.vocab_size:
            raise HFImportError(f"--init-from-hf: the data's vocabulary ({data.vocab_size}) is larger than "
                                f"the model's ({cfg.vocab_size})")
        if data.vocab_size != cfg.vocab_size and hf_weights is None:  # HF models may pad theirs
            cfg = dataclasses.replace(cfg, vocab_size=data.vocab_size)
            validate(cfg, info.world_size)
        # built on meta, sharded, then each rank initialises its shards: seeded, any world size alike
        model = build_model(cfg, info, hf_weights)
        optimizer = build_optimizer(model, cfg)
        return TrainState(cfg, info, model, optimizer, build_scheduler(optimizer, cfg), data, run_lock=lock)
    except BaseException:
        if lock is not None:
            lock.release()
        close_distributed(info)
        raise


def nitp_active(cfg: TrainConfig, step: int) -> bool:
    return cfg.objective == "nitp" and step >= cfg.nitp_start_step


def count_positions(batches: list[dict[str, torch.Tensor]], cfg: TrainConfig,
                    device: torch.device) -> torch.Tensor:
    """Global (N_ce, N_nitp, N_seq) over all micro-batches of all ranks, as an int64 tensor."""
    counts = torch.zeros(3, dtype=torch.int64)
    for b in batches:
        ce_valid, nitp_valid = valid_positions(b["labels"], IGNORE_INDEX, cfg.nitp_shift)
        counts[0] += ce_valid.sum()
        counts[1] += nitp_valid.sum()
        counts[2] += ce_valid.shape[0]
    counts = counts.to(device)
    dist.all_reduce(counts)
    return counts.cpu()


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _full(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if isinstance(x, DTensor) else x


def train_step(state: TrainState, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches; returns the step's global metrics."""
    cfg, model, info = state.cfg, state.model, state.dist
    counts = count_positions(batches, cfg, info.device)
    n_ce, n_nitp, n_seq = (int(c) for c in counts)
    mode = "nitp" if nitp_active(cfg, state.step) else ("ntp" if cfg.objective == "nitp" else cfg.objective)
    lam = cfg.nitp_weight if mode in ("nitp", "cosreg") else 0.0
    if mode == "nitp":
        aux_weight = lam * n_ce / n_nitp if n_nitp > 0 else 0.0
        aux_count = max(n_nitp, 1)
    elif mode == "cosreg":
        aux_weight, aux_count = lam * n_ce / n_seq, n_seq
    else:
        aux_weight, aux_count = 0.0, 1
    scale = info.world_size / max(n_ce, 1)
    moe_scale = cfg.moe_aux_weight / len(batches) if cfg.is_moe else 0.0

    sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss, ce, aux, moe balance
    poison = state.step + 1 in debug_nan_steps()  # fault-injection test hook (engine/faults.py)
    for batch in batches:
        b = _to_device(batch, info.device)
        out, balance = model(b["input_ids"], b["labels"], b.get("doc_ids"), aux_weight=aux_weight, mode=mode)
        loss = out.loss * scale
        if moe_scale:
            loss = loss + balance * moe_scale
        if poison:
            loss = loss * float("nan")
        loss.backward()
        sums += torch.stack([out.loss.detach(), out.ce_sum, out.aux_sum, balance.detach()]).double()
    if poison:
        sums += float("nan")

    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = _full(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
    lr = state.optimizer.param_groups[0]["lr"]
    dist.all_reduce(sums)  # before the update: every rank must agree on skipping a bad step
    loss_sum, ce_sum, aux_sum, balance_sum = sums.tolist()
    # A non-finite loss or grad norm skips the update (weights and Adam moments untouched); the
    # step still counts: its data is consumed and the LR schedule advances, so lr(step) and the
    # loader position stay what they are in a run without faults.
    skipped = not (math.isfinite(loss_sum) and math.isfinite(float(grad_norm)))
    if skipped:
        state.bad_steps += 1
        state.consecutive_bad_steps += 1
    else:
        state.optimizer.step()
        state.consecutive_bad_steps = 0
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    state.step += 1

    moe_balance = balance_sum / (len(batches) * info.world_size)
    metrics = {
        "loss": loss_sum / max(n_ce, 1) + (cfg.moe_aux_weight * moe_balance if cfg.is_moe else 0.0),
        "ce_loss": ce_sum / max(n_ce, 1),
        "nitp_loss": aux_sum / aux_count if mode == "nitp" else 0.0,
        "nitp_weight": lam,
        "lr": lr,
        "grad_norm": float(grad_norm),
        "n_ce": n_ce,
        "n_nitp": n_nitp if mode == "nitp" else 0,
        "skipped": skipped,
        "bad_steps": state.bad_steps,
    }
    if mode == "cosreg":
        metrics["cosreg_penalty"] = aux_sum / aux_count
    if cfg.is_moe:
        metrics["moe_balance_loss"] = moe_balance
    return metrics


@torch.no_grad()
def evaluate(state: TrainState, batches: int | str | None = None) -> float | None:
    """Cross-entropy over `batches` validation micro-batches (default cfg.eval_batches; "all": the
    whole split, every token once), over all ranks; no gradient buffers are built."""
    val = state.data.val
    if val is None:
        return None
    batches = state.cfg.eval_batches if batches is None else batches
    sums = torch.zeros(2, dtype=torch.float64, device=state.dist.device)
    # eval_batches counts micro-batches over all ranks, so any world size sees the same windows.
    per_rank = None if batches == "all" else -(-batches // state.dist.world_size)
    for batch in val.batches(per_rank):
        b = _to_device(batch, state.dist.device)
        out, _ = state.model(b["input_ids"], b["labels"], b.get("doc_ids"), mode="ntp")
        sums[0] += out.ce_sum.double()
        sums[1] += (b["labels"] != IGNORE_INDEX).sum()
    dist.all_reduce(sums)
    return float(sums[0] / sums[1]) if sums[1] > 0 else None


def next_batches(state: TrainState) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of the next optimizer step."""
    accum = gradient_accumulation_steps(state.cfg, state.dist.world_size)
    return [state.data.train.next_batch() for _ in range(accum)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train cfg.steps steps, writing config.json and metrics.jsonl to cfg.out; returns the last record."""
    state = build_state(cfg)
    cfg, info = state.cfg, state.dist
    ckpt, stop = Checkpointer(cfg, info), StopSignals()
    try:
        ckpt.start(state)  # resume if asked (--resume); set aside checkpoints newer than the start
        if cfg.resume and info.is_main:
            truncate_metrics(os.path.join(cfg.out, "metrics.jsonl"), state.step)
    except BaseException:
        state.close()
        raise
    if state.step >= cfg.steps and info.is_main:
        print(f"the run is already at step {state.step} of --steps {cfg.steps}: nothing to train "
              "(raise --steps to continue it)", flush=True)
    logger = RunLogger(cfg.out, cfg.steps, enabled=info.is_main, start_step=state.step)
    stop.install()
    try:
        logger.write_config({**cfg.to_dict(), **state.data.info, "world_size": info.world_size,
                             "n_params": state.model.num_params(),
                             "n_params_backbone": state.model.num_params(include_projector=False)})
        flops_per_token = training_flops_per_token(cfg)
        peak = peak_flops_per_device(cfg.peak_tflops, info.device)
        tokens_per_step = cfg.batch_size * cfg.seq_len
        record: dict[str, Any] = {}
        probe = GeometryProbe(cfg, state.data, info.rank, info.device) if cfg.geometry_every else None
        _sync(info.device)
        t_last, steps_since = time.perf_counter(), 0
        while state.step < cfg.steps:
            metrics = train_step(state, next_batches(state))
            steps_since += 1
            logger.advance()
            step = state.step
            do_eval = cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == cfg.steps)
            do_geometry = probe is not None and (step % cfg.geometry_every == 0 or step in (1, cfg.steps))
            if (step % cfg.log_every == 0 or step == cfg.steps or step == 1 or do_eval or do_geometry
                    or metrics["skipped"]):
                _sync(info.device)
                elapsed = time.perf_counter() - t_last
                tokens_per_s = steps_since * tokens_per_step / elapsed
                record = {"step": step, **metrics, "tokens_per_s": tokens_per_s,
                          "mfu": flops_per_token * tokens_per_s / (peak * info.world_size) if peak else None,
                          "peak_mem_bytes": peak_memory_bytes(info.device),
                          "tokens_seen": step * tokens_per_step}
                if do_eval:
                    record["val_ce"] = evaluate(state)
                    if step == cfg.steps and cfg.eval_full_at_end:
                        record["val_ce_full"] = (record["val_ce"] if cfg.eval_batches == "all"
                                                 else evaluate(state, "all"))
                if do_geometry:  # like evaluation, outside the timed interval
                    record.update(probe.measure(state.model))
                logger.log(record)
                _sync(info.device)
                t_last, steps_since = time.perf_counter(), 0
            if cfg.max_bad_steps and state.consecutive_bad_steps >= cfg.max_bad_steps:
                ckpt.finalize()
                last = (f"step {ckpt.last_saved_step} in {ckpt.root}" if ckpt.last_saved_step is not None
                        else "none saved yet")
                raise TrainingDiverged(
                    f"{state.consecutive_bad_steps} consecutive steps (up to step {step}) had a "
                    f"non-finite loss or gradient norm (--max-bad-steps {cfg.max_bad_steps}); stopping. "
                    f"Last good checkpoint: {last}")
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and not metrics["skipped"]:
                ckpt.save(state)
            debug_signal_after(step)  # fault-injection test hook
            if stop.requested(info.device):
                break
        if ckpt.last_saved_step != state.step and cfg.steps > 0:  # --steps 0 only builds and writes config.json
            ckpt.save(state)  # the end of the run, or a stop signal
        ckpt.finalize()
        if info.world_size > 1:
            # leave together: rank 0 commits checkpoints after the others are done with them, and a rank that
            # tears its process group down while a peer still works on rank-0-only IO can abort gloo's threads
            dist.barrier()
        if stop.received and info.is_main:
            print(f"received {stop.received}: saved a checkpoint at step {state.step} in {ckpt.root}; "
                  "exiting (continue with --resume auto)", flush=True)
    finally:
        stop.restore()
        logger.close()
        state.close()
    if info.is_main:
        print(f"metrics: {logger.metrics_path}\nconfig:  {logger.config_path}", flush=True)
    return record
