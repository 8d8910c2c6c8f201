"""Export to Hugging Face: transformers loads the folder (LlamaForCausalLM / Qwen2MoeForCausalLM) and
gives the engine's logits; AutoTokenizer loads; generate runs; --init-from-hf is the exact inverse."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from engine.checkpoint import Checkpointer  # noqa: E402
from engine.config import make_config, parse_cli  # noqa: E402
from engine.data.tokenizer import train_bpe  # noqa: E402
from engine.export import main as export_main  # noqa: E402
from engine.model.hf_adapter import load_hf_into_engine  # noqa: E402
from engine.parallel import close_distributed  # noqa: E402
from engine.trainer import build_state, next_batches, train_step  # noqa: E402

SMALL = dict(d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, ffn_hidden=64, seq_len=16, batch_size=4,
             micro_batch_size=2, warmup_steps=1, log_every=1, steps=4, lr=1e-2)
MOE = dict(n_experts=4, moe_top_k=2, moe_ffn_hidden=16, shared_ffn_hidden=16)
VOCAB = 300



@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few documents of Python source and a 300-token byte-level BPE trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    src = open(json.__file__).read() + open(json.__file__.replace("__init__.py", "decoder.py")).read()
    docs = [src[i:i + 2000] for i in range(0, len(src), 2000)]
    (root / "data").mkdir()
    for i, doc in enumerate(docs):
        (root / "data" / f"doc{i}.txt").write_text(doc)
    train_bpe(docs, VOCAB).save(str(root / "tokenizer.json"))
    return root


def engine_logits(state, ids):
    with torch.no_grad():
        h, _ = state.model(ids, mode="hidden")
        w = state.model.output.lm_head.weight
        return h @ (w.full_tensor() if hasattr(w, "full_tensor") else w).T


def train_and_save(cfg, ids, steps=2):
    state = build_state(cfg)
    try:
        for _ in range(steps):
            train_step(state, next_batches(state))
        Checkpointer(state.cfg, state.dist).save(state)
        return engine_logits(state, ids)
    finally:
        close_distributed(state.dist)


IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_export_loads_in_transformers_with_the_engine_logits(preset, corpus, tmp_path):
    run_dir, hf_dir = tmp_path / "run", tmp_path / "hf"
    if preset == "tiny":  # real data: the run's own tokenizer (config data_tokenizer) is exported
        data = dict(data=str(corpus / "data"), tokenizer=str(corpus / "tokenizer.json"),
                    data_cache_dir=str(tmp_path / "cache"), val_fraction=0.0)
        extra_args = []
    else:  # synthetic data has no tokenizer: pass one
        data, extra_args = dict(vocab_size=VOCAB, data="synthetic"), ["--tokenizer", str(corpus / "tokenizer.json")]
    cfg = make_config(preset, **SMALL, **(MOE if preset == "tiny-moe" else {}), **data, out=str(run_dir))
    want = train_and_save(cfg, IDS)
    export_main([str(run_dir), str(hf_dir), *extra_args])

    config = json.loads((hf_dir / "config.json").read_text())
    arch = "LlamaForCausalLM" if preset == "tiny" else "Qwen2MoeForCausalLM"
    assert config["architectures"] == [arch]
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "projector" in k]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    assert type(model).__name__ == arch
    with torch.no_grad():
        got = model(IDS).logits
    assert (got - want).abs().max().item() < 1e-4
    out = model.generate(IDS[:1, :6], max_new_tokens=4, do_sample=False,
                         attention_mask=torch.ones(1, 6, dtype=torch.long))
    assert out.shape == (1, 10) and out[0, 6].item() == want[0, 5].argmax().item()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert tok.eos_token == "<|endoftext|>" and tok.convert_tokens_to_ids(tok.eos_token) == 0
    assert isinstance(tok.decode(out[0]), str) and tok("def f(x):")["input_ids"]


def _hf_roundtrip(hf_src, tmp_path, preset):
    """--init-from-hf hf_src -> engine logits; checkpoint at step 0 -> export -> transformers logits."""
    ref = AutoModelForCausalLM.from_pretrained(hf_src, dtype=torch.float32)
    with torch.no_grad():
        ref_logits = ref(IDS).logits
    cfg = parse_cli(["--preset", preset, "--data", "synthetic", "--init-from-hf", str(hf_src), "--seq-len", "16",
                     "--batch-size", "2",
                     "--micro-batch-size", "2", "--steps", "1", "--nitp-layer", "1", "--out", str(tmp_path / "run")])
    state = build_state(cfg)
    try:
        assert state.model.output.projector is not None
        engine = engine_logits(state, IDS)
        Checkpointer(state.cfg, state.dist).save(state)  # step 0: the imported weights untouched
    finally:
        close_distributed(state.dist)
    assert (engine - ref_logits).abs().max().item() < 1e-4
    export_main([str(tmp_path / "run"), str(tmp_path / "back")])
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    with torch.no_grad():
        assert (back(IDS).logits - ref_logits).abs().max().item() < 1e-5


def test_init_from_hf_llama_round_trip(tmp_path):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                      initializer_range=0.2,
                                      rope_parameters={"rope_type": "default", "rope_theta": 5e4},
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "src")
    overrides, sd = load_hf_into_engine(tmp_path / "src")
    assert overrides["rope_theta"] == 5e4 and overrides["norm_eps"] == 1e-5 and overrides["n_experts"] == 0
    assert not [k for k in sd if "projector" in k]
    _hf_roundtrip(tmp_path / "src", tmp_path, "tiny")


def test_init_from_hf_qwen2_maps_only_with_zero_attention_biases(tmp_path):
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.bias.fill_(0.1)
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.bias is non-zero"):
        load_hf_into_engine(tmp_path / "src")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.zero_()
    model.save_pretrained(tmp_path / "src")
    _, sd = load_hf_into_engine(tmp_path / "src")  # tied embeddings: the engine starts from two copies
    assert torch.equal(sd["output.lm_head.weight"], sd["backbone.embed_tokens.weight"])
    _hf_roundtrip(tmp_path / "src", tmp_path, "tiny")


def test_init_from_hf_qwen2_moe_round_trip_and_refusals(tmp_path):
    config = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[0], qkv_bias=False, initializer_range=0.2,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(config)
    src = tmp_path / "src"
    src.mkdir()
    config.save_pretrained(src)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}  # transformers 5's fused experts
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(ValueError, match="layer 1: a non-zero shared_expert_gate"):
        load_hf_into_engine(src)
    for k in tensors:
        if k.endswith("shared_expert_gate.weight"):
            tensors[k] = torch.zeros_like(tensors[k])
    save_file(tensors, str(src / "model.safetensors"))
    overrides, _ = load_hf_into_engine(src)
    assert (overrides["n_experts"], overrides["moe_top_k"], overrides["n_dense_layers"]) == (4, 2, 1)
    _hf_roundtrip(src, tmp_path, "tiny-moe")

    qwen3 = tmp_path / "qwen3"
    qwen3.mkdir()
    (qwen3 / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    with pytest.raises(ValueError, match="Qwen3ForCausalLM is not supported"):
        load_hf_into_engine(qwen3)
    assert os.path.isdir(tmp_path / "back")


def test_export_refuses_unsafe_folders_and_bad_tokenizers(corpus, tmp_path, capsys):
    """The run itself, a folder holding it, a folder holding another model's files (unless --overwrite,
    which empties it) are refused; a garbage or missing tokenizer is named; a refusal writes nothing."""
    run_dir = tmp_path / "run"
    own_tok = tmp_path / "own_tokenizer.json"
    own_tok.write_bytes((corpus / "tokenizer.json").read_bytes())
    cfg = make_config("tiny", **SMALL, data=str(corpus / "data"), tokenizer=str(own_tok), val_fraction=0.0,
                      data_cache_dir=str(tmp_path / "cache"), out=str(run_dir))
    state = build_state(cfg)
    try:
        Checkpointer(state.cfg, state.dist).save(state)
    finally:
        close_distributed(state.dist)
    run_files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    def refused(args, message):
        with pytest.raises(SystemExit) as err:
            export_main([str(run_dir), *args])
        assert str(err.value).startswith("error: ") and message in str(err.value), err.value
        assert "\n" not in str(err.value)

    refused([str(run_dir)], "is the run folder")
    refused([str(run_dir), "--overwrite"], "is the run folder")
    refused([str(tmp_path), "--overwrite"], f"holds the run folder {run_dir}")
    refused([str(run_dir / "checkpoints" / "hf"), "--overwrite"], "inside the run's checkpoints")
    refused([str(tmp_path / "new"), "--tokenizer", str(tmp_path / "missing.json")],
            f"--tokenizer {tmp_path / 'missing.json'}: no such file")
    (tmp_path / "garbage.json").write_text("{ this is not a tokenizer")
    refused([str(tmp_path / "new"), "--tokenizer", str(tmp_path / "garbage.json")],
            f"--tokenizer {tmp_path / 'garbage.json'}: not a tokenizer.json")
    assert not (tmp_path / "new").exists()  # refused before anything was written

    other = tmp_path / "other_model"  # a folder holding another model: refused, then emptied with --overwrite
    other.mkdir()
    (other / "tokenizer.json").write_text("another model's tokenizer")
    (other / "weights.bin").write_bytes(b"\0" * 8)
    refused([str(other)], "holds files an export did not write (tokenizer.json, weights.bin)")
    assert (other / "weights.bin").exists()
    export_main([str(run_dir), str(other), "--overwrite"])
    assert json.loads((other / ".nitp-export.json").read_text())["files"][0] == "model.safetensors"
    assert (other / "tokenizer.json").read_bytes() == own_tok.read_bytes() and not (other / "weights.bin").exists()
    # an earlier export is replaced without --overwrite; a run without its tokenizer leaves none behind
    own_tok.unlink()
    refused([str(other)], f"the run's tokenizer {own_tok} (data_tokenizer): no such file; pass --tokenizer PATH")
    export_main([str(run_dir), str(other), "--tokenizer", str(corpus / "tokenizer.json")])
    assert sorted(p.name for p in other.iterdir()) == sorted(
        [".nitp-export.json", "config.json", "generation_config.json", "model.safetensors",
         "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"])
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == run_files  # the run untouched
