"""engine.plan against what the engine really holds on the tiny presets (one CPU process): parameters,
gradients and AdamW states counted by tensor storage after a step, activations counted with
saved-tensor hooks, with and without activation checkpointing; and the command line."""

from pathlib import Path

import pytest
import torch

from engine.config import make_config
from engine.model import NITPTransformer
from engine.parallel import close_distributed
from engine.plan import main, make_plan, saved_activation_bytes
from engine.trainer import build_state, next_batches


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_plan_components_match_what_the_engine_holds(preset, tmp_path):
    state = build_state(make_config(preset, data="synthetic", micro_batch_size=2, steps=1, out=str(tmp_path)))
    try:
        cfg = state.cfg
        batch = next_batches(state)[0]
        out, balance = state.model(batch["input_ids"], batch["labels"], aux_weight=1.0)
        (out.loss + balance).backward()
        measured = {
            "params": _storage_bytes(_local(p) for p in state.model.parameters()),
            "grads": _storage_bytes(_local(p.grad) for p in state.model.parameters()),
        }
        state.optimizer.step()
        measured["optimizer"] = _storage_bytes(_local(v) for s in state.optimizer.state.values()
                                               for v in s.values() if torch.is_tensor(v))
    finally:
        close_distributed(state.dist)
    for key, checkpointing in (("activations", False), ("activations_ac", True)):
        measured[key] = saved_activation_bytes(NITPTransformer(cfg), batch["input_ids"], batch["labels"],
                                               checkpointing)
    plan = make_plan(cfg, 1, kernels="cpu")
    assert plan.micro_batch == 2
    for key, value in measured.items():
        assert abs(getattr(plan, key) - value) <= 0.1 * value, (key, getattr(plan, key), value)
    assert measured["activations_ac"] < 0.5 * measured["activations"]


def test_command_line_plans_a_paper_preset_and_says_what_to_change(capsys):
    main(["--preset", "moe-9b-a1b", "--gpus", "8"])
    text = capsys.readouterr().out
    assert "FITS" in text and "no expert parallelism" in text and "tokens/s per GPU" in text
    main(["--preset", "dense-3b", "--gpus", "1", "--gpu-mem-gib", "24", "--activation-checkpointing", "false"])
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "to fit: use" in text and "GPUs" in text
    with pytest.raises(SystemExit, match="batch_size=1024 is not divisible by world_size=3"):
        main(["--preset", "dense-2b", "--gpus", "3"])


def test_readme_shows_the_plan_as_the_command_prints_it(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = "$ python -m engine.plan --preset moe-9b-a1b --gpus 8\n"
    shown = readme.split(command, 1)[1].split("```", 1)[0]
    main(command.split()[4:])
    assert capsys.readouterr().out == shown
