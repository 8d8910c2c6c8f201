"""Real sources of engine.data: local .txt/.jsonl/.parquet via datasets, stdlib, tokenizer and
preparation caches, bad data. Tiny corpora in tmp_path; expected documents are the texts we wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.data import DataConfig, DataError, build_data
from engine.data.tokenizer import cached_bpe

ROOT = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def text(i: int, n_words: int = 60) -> str:
    rng = np.random.default_rng(i)
    return f"doc {i}: " + " ".join(rng.choice(WORDS, n_words)) + "\n  ünïcode ok ✓\n"


def cfg_for(data, tmp_path, **kw):
    base = dict(data=str(data), vocab_size=300, seq_len=8, micro_batch_size=2, seed=0,
                doc_mask=False, val_fraction=0.25, data_cache_dir=str(tmp_path / "cache"),
                text_field="text", tokenizer=None)
    base.update(kw)
    return DataConfig(**base)


def decoded_docs(bundle, split="train"):
    """The documents of a prepared split, decoded back to text (EOD stripped)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(bundle.info["data_tokenizer"])
    stream = (bundle.train if split == "train" else bundle.val).stream
    out = []
    for d in range(stream.n_docs):
        ids = stream.tokens[stream.doc_starts[d]:stream.doc_starts[d + 1]].tolist()
        assert ids[-1] == bundle.eod_id and bundle.eod_id not in ids[:-1]
        out.append(tok.decode(ids[:-1]))
    return out


@pytest.fixture(scope="module")
def txt_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("txt")
    texts = [text(i) for i in range(8)]
    for i, t in enumerate(texts):
        (d / ("sub" if i % 3 == 0 else "") / f"f{i}.txt").parent.mkdir(exist_ok=True)
        (d / ("sub" if i % 3 == 0 else "") / f"f{i}.txt").write_text(t, encoding="utf-8")
    (d / "empty.txt").write_bytes(b"")
    (d / "blank.txt").write_text("  \n\n ")
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (d / ".hidden").mkdir()
    (d / ".hidden" / "x.txt").write_text("never read")
    (d / "notes.md").write_text("not a supported type")
    return d, texts


def test_txt_directory_round_trip_and_bad_files_counted(txt_corpus, tmp_path):
    d, texts = txt_corpus
    bundle = build_data(cfg_for(d, tmp_path))
    info = bundle.info
    assert info["data_source"] == "local" and info["data_n_files"] == 11
    assert (info["data_skipped_empty_files"], info["data_skipped_non_utf8_files"],
            info["data_skipped_empty_docs"]) == (1, 1, 1)
    assert info["data_n_docs_train"] + info["data_n_docs_val"] == 8 and info["data_n_docs_val"] == 2
    train, val = decoded_docs(bundle), decoded_docs(bundle, "val")
    assert sorted(train + val) == sorted(texts)  # lossless, each document exactly once
    assert info["data_n_tokens_train"] == bundle.train.stream.n_tokens
    assert bundle.train.stream.tokens.dtype == np.uint16 and bundle.vocab_size <= 300
    assert isinstance(bundle.train.stream.tokens, np.memmap)
    assert len(info["data_corpus_hash"]) == 64
    json.dumps(info)  # goes into config.json


def test_second_run_hits_the_caches_and_edits_invalidate_them(txt_corpus, tmp_path):
    d, _ = txt_corpus
    first = build_data(cfg_for(d, tmp_path)).info
    tok_mtime = os.stat(first["data_tokenizer"]).st_mtime_ns
    again = build_data(cfg_for(d, tmp_path)).info
    assert not first["data_prep_cache_hit"] and again["data_prep_cache_hit"]
    assert again["data_corpus_hash"] == first["data_corpus_hash"]
    assert os.stat(first["data_tokenizer"]).st_mtime_ns == tok_mtime
    # a new val_fraction re-prepares and retrains (the tokenizer sees the training split only)
    other = build_data(cfg_for(d, tmp_path, val_fraction=0.5)).info
    assert not other["data_prep_cache_hit"] and not other["data_tokenizer_cache_hit"]
    # the tokenizer cache alone: hit on the second call, its texts never requested
    calls = []
    texts = lambda: calls.append(1) or [text(i) for i in range(4)]  # noqa: E731
    _, p1, i1 = cached_bpe(tmp_path / "tc", "h", 300, 0.1, texts)
    _, p2, i2 = cached_bpe(tmp_path / "tc", "h", 300, 0.1, texts)
    assert p1 == p2 and calls == [1]
    assert (i1["data_tokenizer_cache_hit"], i2["data_tokenizer_cache_hit"]) == (False, True)
    # changing one file changes the corpus hash
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "a.txt").write_text(text(1))
    h1 = build_data(cfg_for(copy, tmp_path, val_fraction=0.0)).info["data_corpus_hash"]
    (copy / "a.txt").write_text(text(2))
    h2 = build_data(cfg_for(copy, tmp_path, val_fraction=0.0)).info["data_corpus_hash"]
    assert h1 != h2


def test_jsonl_with_text_field_and_bad_records(tmp_path, caplog):
    """Bad records are skipped one at a time and counted per file; the good ones around them stay."""
    d = tmp_path / "j"
    d.mkdir()
    rows = [{"content": text(i), "id": i} for i in range(5)]
    rows += [{"content": "", "id": 5}, {"content": None, "id": 6}, {"content": "   ", "id": 7}]
    (d / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    good = [text(100 + i) for i in range(200)]
    lines = [json.dumps({"content": t}) for t in good]
    lines.insert(57, "{not json at all")                    # one malformed line among 200 good ones
    lines.insert(120, json.dumps(["a", "list"]))            # valid JSON, not a record
    lines.insert(150, json.dumps({"other": "no content"}))  # a record without the field
    (d / "broken.jsonl").write_text("\n".join(lines) + "\n\n")
    (d / "latin1.jsonl").write_bytes('{"content": "caf\xe9"}\n'.encode("latin-1")
                                     + (json.dumps({"content": "ok"}) + "\n").encode())
    with caplog.at_level("WARNING", logger="engine.data.documents"):
        bundle = build_data(cfg_for(d, tmp_path, text_field="content", val_fraction=0.0))
    info = bundle.info
    assert (info["data_skipped_empty_docs"], info["data_skipped_malformed_records"],
            info["data_skipped_records_without_field"], info["data_skipped_non_utf8_docs"]) == (3, 2, 1, 1)
    assert info["data_skipped_unreadable_files"] == 0 and info["data_skipped_non_utf8_files"] == 0
    assert info["data_n_files"] == 3
    assert sorted(decoded_docs(bundle)) == sorted([r["content"] for r in rows[:5]] + good + ["ok"])
    assert bundle.val is None and info["data_text_field"] == "content"
    log = caplog.text
    assert "broken.jsonl: skipped 3 of 203 records (2 malformed records, 1 records without field)" in log
    assert "a.jsonl: skipped 3 of 8 records (3 empty docs)" in log
    assert "latin1.jsonl: skipped 1 of 2 records (1 non utf8 docs)" in log
    with pytest.raises(DataError, match=r"--text-field 'body'.*columns: content, id, other"):
        build_data(cfg_for(d, tmp_path, text_field="body"))


def test_parquet_with_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [text(i) for i in range(6)]
    pq.write_table(pa.table({"body": texts + [""], "n": list(range(7))}), tmp_path / "d.parquet")
    bundle = build_data(cfg_for(tmp_path / "d.parquet", tmp_path, text_field="body",
                                val_fraction=0.2))
    assert bundle.info["data_skipped_empty_docs"] == 1 and bundle.info["data_n_files"] == 1
    assert sorted(decoded_docs(bundle) + decoded_docs(bundle, "val")) == sorted(texts)


def test_stdlib_source_on_a_few_files_and_existing_tokenizer(tmp_path):
    bundle = build_data(cfg_for("stdlib", tmp_path, max_files=4, val_fraction=0.0))
    info = bundle.info
    assert info["data_source"] == "stdlib" and info["data_n_files"] == 4
    assert "site-packages" not in info["data_path"]
    batch = bundle.train.next_batch()
    assert batch["input_ids"].shape == (2, 8)
    # --tokenizer PATH: the trained one, reused from a file; same vocabulary, same tokens
    reused = build_data(cfg_for("stdlib", tmp_path, max_files=4, val_fraction=0.0,
                                tokenizer=info["data_tokenizer"], vocab_size=999))
    assert not reused.info["data_tokenizer_trained"] and reused.vocab_size == bundle.vocab_size
    assert np.array_equal(reused.train.stream.tokens, bundle.train.stream.tokens)
    with pytest.raises(DataError, match="--tokenizer .*nope.json: no such file"):
        build_data(cfg_for("stdlib", tmp_path, tokenizer=str(tmp_path / "nope.json")))


def test_hugging_face_name_goes_through_load_dataset(tmp_path, monkeypatch):
    import datasets

    seen = {}

    def fake_load(name, config=None, split=None, cache_dir=None):
        seen.update(name=name, config=config, split=split)
        return datasets.Dataset.from_dict({"text": [text(i) for i in range(4)]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    bundle = build_data(cfg_for("someone/corpus:small", tmp_path, val_fraction=0.0))
    assert seen == {"name": "someone/corpus", "config": "small", "split": "train"}
    assert bundle.info["data_source"] == "hf" and bundle.info["data_n_docs_train"] == 4

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="someone/other.*ConnectionError: no network"):
        build_data(cfg_for("someone/other", tmp_path))


def test_missing_path_fails_naming_it(tmp_path):
    # the same without a traceback, in real processes: the two-rank test below
    missing = tmp_path / "no_such_corpus"
    with pytest.raises(DataError, match=f"--data {missing}: no such file or directory"):
        build_data(cfg_for(missing, tmp_path))


def test_too_small_and_empty_corpora(tmp_path):
    (tmp_path / "tiny.txt").write_text("a b c d")
    with pytest.raises(DataError, match=r"training split has \d+ tokens, but one batch needs 129"):
        build_data(cfg_for(tmp_path / "tiny.txt", tmp_path, seq_len=64, val_fraction=0.0))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "a.txt").write_bytes(b"")
    with pytest.raises(DataError, match="no usable documents"):
        build_data(cfg_for(tmp_path / "e", tmp_path))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type"):
        build_data(cfg_for(tmp_path / "x.csv", tmp_path))


WORKER = """
import json, sys
import torch.distributed as dist
from engine.data import DataConfig, build_data
rank, store, data, missing, cache = int(sys.argv[1]), *sys.argv[2:]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
cfg = DataConfig(data=data, vocab_size=300, seq_len=8, micro_batch_size=2, seed=0,
                 val_fraction=0.25, data_cache_dir=cache, max_files=3)
try:
    b = build_data(cfg, rank=rank, world_size=2)
    print(json.dumps({"hit": b.info["data_prep_cache_hit"], "windows": b.train.window_ids().tolist(),
                      "n_tokens": b.train.stream.n_tokens}), flush=True)
    build_data(DataConfig(**{**cfg.__dict__, "data": missing}), rank=rank, world_size=2)
except ValueError as err:  # what the command line does: the message, no traceback
    raise SystemExit(f"error: {err}")
finally:
    dist.destroy_process_group()
"""


def test_two_ranks_rank0_prepares_others_wait_and_errors_exit_cleanly(tmp_path):
    """Two gloo processes: rank 0 prepares, rank 1 waits and opens the same files; then a
    missing path stops both ranks with the message, no traceback, no hang."""
    missing = tmp_path / "missing_corpus"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(tmp_path / "store"),
                               "stdlib", str(missing), str(tmp_path / "cache")], cwd=ROOT,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(2)]
    out = [(*p.communicate(timeout=180), p.returncode) for p in procs]
    assert [rc for _, _, rc in out] == [1, 1], out
    r0, r1 = (json.loads(o.strip().splitlines()[-1]) for o, _, _ in out)
    # one preparation, made by rank 0 and received by rank 1 (which never found a cache itself)
    assert r0["hit"] is False and r1["hit"] is False and r0["n_tokens"] == r1["n_tokens"]
    assert len(list((tmp_path / "cache" / "prepared").iterdir())) == 1
    assert not set(r0["windows"]) & set(r1["windows"])
    assert f"--data {missing}: no such file or directory" in out[0][1]
    assert "rank 0 could not prepare the data" in out[1][1] and str(missing) in out[1][1]
    assert "Traceback" not in out[0][1] + out[1][1]
