"""The prepared-data and tokenizer caches are checked on every reuse and rebuilt, with a warning, when a
file was cut, overwritten, extended or is unreadable; the tokenizer stays bounded on text without
whitespace. Expected tokens are those of the first, intact preparation."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from engine.data import DataConfig, build_data
from engine.data.tokenizer import split_text, train_bpe

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A small .txt corpus prepared once: (corpus dir, intact cache dir, train tokens, val tokens)."""
    root = tmp_path_factory.mktemp("integrity")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS, 300)) + f"\nend of {i}\n")
    bundle = build_data(cfg(corpus, root / "cache"))
    assert not bundle.info["data_prep_cache_hit"]
    return corpus, root / "cache", np.array(bundle.train.stream.tokens), np.array(bundle.val.stream.tokens)


def cfg(corpus, cache):
    return DataConfig(data=str(corpus), vocab_size=300, seq_len=8, micro_batch_size=2,
                      val_fraction=0.2, data_cache_dir=str(cache))


def cut_in_half(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def random_bytes(p: Path) -> None:
    p.write_bytes(np.random.default_rng(1).integers(0, 256, p.stat().st_size, dtype=np.uint8).tobytes())


def odd_size(p: Path) -> None:
    p.write_bytes(p.read_bytes() + b"\x01")


def garbage(p: Path) -> None:
    p.write_text("{ garbage")


def edited_merges(p: Path) -> None:  # still a valid tokenizer.json, but not the one the tokens were made with
    tok = json.loads(p.read_text())
    tok["model"]["merges"] = tok["model"]["merges"][:-1]
    p.write_text(json.dumps(tok))


@pytest.mark.parametrize("target, damage, warning", [
    ("prepared/train.bin", cut_in_half, "train.bin has"),
    ("prepared/train.bin", random_bytes, "train.bin does not match its recorded sha256"),
    ("prepared/val.bin", odd_size, "val.bin has"),
    ("prepared/train_docs.npy", random_bytes, "train_docs.npy does not match"),
    ("prepared/meta.json", garbage, "meta.json has"),
    ("prepared/checksums.json", garbage, "JSONDecodeError"),
    ("tokenizers/tokenizer.json", garbage, "the cached tokenizer in"),
    ("tokenizers/tokenizer.json", edited_merges, "the cached tokenizer in"),
])
def test_damaged_cache_is_rebuilt_with_a_warning(prepared, tmp_path, caplog, target, damage, warning):
    corpus, intact, train_tokens, val_tokens = prepared
    cache = tmp_path / "cache"
    shutil.copytree(intact, cache)
    kind, name = target.split("/")
    (folder,) = (cache / kind).iterdir()
    damage(folder / name)
    with caplog.at_level("WARNING", logger="engine.data"):
        again = build_data(cfg(corpus, cache))
    assert warning in caplog.text and "preparing it again" in caplog.text
    assert not again.info["data_prep_cache_hit"]
    assert np.array_equal(again.train.stream.tokens, train_tokens)
    assert np.array_equal(again.val.stream.tokens, val_tokens)
    assert build_data(cfg(corpus, cache)).info["data_prep_cache_hit"]  # and trusted again


def test_split_text_cuts_only_at_whitespace_and_keeps_the_ids(tmp_path):
    text = Path(json.__file__).read_text() + "x" * 700 + "\u3000tail  \t\n"
    for max_chars in (1, 7, 64, 300):
        pieces = list(split_text(text, max_chars))
        assert "".join(pieces) == text and all(0 < len(p) <= max_chars for p in pieces)
    # cut between a non-space and a whitespace character whenever the window has one
    pieces = list(split_text(text, 300))
    for left, right in zip(pieces, pieces[1:]):
        if any(c.isspace() for c in left[1:]):
            assert not left[-1].isspace() and right[0] in " \t\n\u3000", (left[-20:], right[:20])
    tok = train_bpe([text[:20000]], 400)
    whole = tok.encode(text[:-800], add_special_tokens=False).ids  # no whitespace-free run over 300 chars
    assert [i for p in split_text(text[:-800], 300) for i in tok.encode(p, add_special_tokens=False).ids] == whole


def test_two_megabyte_line_without_whitespace_prepares_in_seconds(tmp_path):
    """Was minutes (BPE training grew much faster than linearly with the longest pre-token: 1 MB took
    178 s); ~5 s on a loaded 2-core machine now. The bound leaves room for a slow CI machine."""
    rng = np.random.default_rng(0)
    line = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 2_000_000))
    (tmp_path / "line.txt").write_text(line)
    start = time.perf_counter()
    bundle = build_data(DataConfig(data=str(tmp_path / "line.txt"), vocab_size=512, seq_len=64,
                                   micro_batch_size=2, val_fraction=0.0, data_cache_dir=str(tmp_path / "c")))
    elapsed = time.perf_counter() - start
    assert elapsed < 45, f"{elapsed:.1f} s"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(bundle.info["data_tokenizer"])
    assert tok.decode(bundle.train.stream.tokens[:-1].tolist()) == line  # lossless
    assert bundle.info["data_tokenizer_sample_bytes"] == 2**20  # one document contributes at most 1 MiB


def test_encode_documents_in_bounded_batches_gives_each_documents_ids(monkeypatch):
    import engine.data.tokenizer as tokenizer_module

    texts = [" ".join(WORDS[i:] + WORDS[:i]) * (1 + 3 * i) for i in range(8)]
    tok = train_bpe(texts, 300)
    monkeypatch.setattr(tokenizer_module, "ENCODE_PIECE_CHARS", 20)  # every document in several pieces,
    monkeypatch.setattr(tokenizer_module, "ENCODE_BATCH_CHARS", 50)  # and in several batches
    docs, current = [], []
    for ids, ends in tokenizer_module.encode_documents(tok, texts):
        current += ids.tolist()
        if ends:
            docs.append(current)
            current = []
    assert not current and docs == [tok.encode(t, add_special_tokens=False).ids for t in texts]
