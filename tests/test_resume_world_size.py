"""Two processes against one, in one torchrun start: the sharded meta-device initialisation gives
the weights of an unsharded model; a run saved by one process resumes on two with the losses of
the uninterrupted run; `engine/train.py --preset tiny` starts on two processes as typed (auto
micro-batch). (Two processes resumed on one: tests/test_checkpoint_resume.py.)"""

import json
import os
import shutil
import subprocess
import sys

import torch

import engine.model.init as model_init
from engine.config import make_config
from engine.model import NITPTransformer
from engine.trainer import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(data="synthetic", vocab_size=131, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64,
             seq_len=16, batch_size=4, warmup_steps=2, log_every=1, steps=8)
KEYS = ("loss", "ce_loss", "nitp_loss", "grad_norm", "lr")
# Init blocks of 100 values: a 32-wide parameter has 3-row blocks, so blocks straddle the shard
# boundaries (131 rows shard unevenly as 66 + 65) and each rank draws partial blocks.
SMALL_BLOCK = 100

DRIVER = """
import json, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
dist.init_process_group("gloo")
import engine.model.init as model_init
from engine.config import make_config
from engine.parallel import close_distributed
from engine.train import main
from engine.trainer import build_state, run
small, root, block = json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
main(["--preset", "tiny", "--steps", "0", "--data", "synthetic", "--out", root + "/cli"])
model_init.INIT_BLOCK_ELEMENTS = block
state = build_state(make_config("tiny", **small, out=root + "/init"))
full = {n: p.full_tensor() for n, p in state.model.named_parameters()}
local = {n: p.to_local().shape[0] for n, p in state.model.named_parameters()}
close_distributed(state.dist)
if dist.get_rank() == 0:
    torch.save(full, root + "/weights.pt")
json.dump(local, open(f"{root}/local_rows_{dist.get_rank()}.json", "w"))
model_init.INIT_BLOCK_ELEMENTS = 1 << 20
run(make_config("tiny", **small, out=root + "/two", resume="auto"))
dist.destroy_process_group()
"""


def rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_one_process_run_resumes_on_two_and_sharded_init_equals_unsharded(tmp_path, monkeypatch):
    run(make_config("tiny", **SMALL, out=str(tmp_path / "one"), ckpt_every=4, keep_last=0))
    want = rows(tmp_path / "one")
    step4 = "checkpoints/step_00000004"
    shutil.copytree(tmp_path / "one" / step4, tmp_path / "two" / step4)
    (tmp_path / "driver.py").write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "driver.py"), REPO, json.dumps(SMALL), str(tmp_path), str(SMALL_BLOCK)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    # --preset tiny as typed on two processes: batch 4 -> micro-batch 2 per rank, no accumulation
    cli = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert (cli["world_size"], cli["micro_batch_size"], cli["batch_size"]) == (2, 2, 4)
    assert cli["n_params"] > 0 and not (tmp_path / "cli" / "checkpoints").exists()

    # sharded meta init == an unsharded model initialised in this process with the same seed
    monkeypatch.setattr(model_init, "INIT_BLOCK_ELEMENTS", SMALL_BLOCK)
    plain = dict(NITPTransformer(make_config("tiny", **SMALL)).named_parameters())
    sharded = torch.load(tmp_path / "weights.pt")
    assert sharded.keys() == plain.keys()
    for name, p in plain.items():
        assert torch.equal(sharded[name], p.detach()), name
    local = [json.loads((tmp_path / f"local_rows_{r}.json").read_text()) for r in (0, 1)]
    assert (local[0]["backbone.embed_tokens.weight"], local[1]["backbone.embed_tokens.weight"]) == (66, 65)

    # resumed on two processes at step 4: the uninterrupted one-process run's steps 5..8
    got = rows(tmp_path / "two")
    assert [r["step"] for r in got] == [5, 6, 7, 8]
    for r, w in zip(got, want[4:]):
        for key in KEYS:
            assert abs(r[key] - w[key]) <= 1e-5, (r["step"], key, r[key], w[key])
