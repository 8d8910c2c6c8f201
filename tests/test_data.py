"""Packing, sharding, resuming and document masking of engine.data, on the synthetic source.

Expected values come from plain Python loops over the token stream, not from the code under test.
"""

import json

import numpy as np
import pytest
import torch

from engine.data import (IGNORE_INDEX, DataConfig, DataError, TokenStream, build_data, doc_cu_seqlens,
                         make_batch, split_documents, synthetic_stream, token_dtype)


def synth_cfg(**kw):
    base = dict(data="synthetic", vocab_size=64, seq_len=16, micro_batch_size=3, seed=7,
                doc_mask=False, val_fraction=0.05, synthetic_tokens=6000)
    base.update(kw)
    return DataConfig(**base)


def flat_doc_ids(stream: TokenStream) -> list[int]:
    """Document id of every token, by a loop over documents."""
    out = []
    for d in range(stream.n_docs):
        out += [d] * int(stream.doc_starts[d + 1] - stream.doc_starts[d])
    return out


def test_synthetic_stream_is_deterministic_and_well_formed():
    a, b = synthetic_stream(64, 3000), synthetic_stream(64, 3000)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.doc_starts, b.doc_starts)
    assert a.tokens.dtype == np.uint16 and a.n_tokens >= 3000
    assert a.doc_starts[0] == 0 and a.doc_starts[-1] == a.n_tokens
    # each document ends with EOD (0) and contains no other EOD
    for d in range(a.n_docs):
        doc = a.tokens[a.doc_starts[d]:a.doc_starts[d + 1]]
        assert doc[-1] == 0 and (doc[:-1] != 0).all() and 16 <= len(doc) - 1 <= 256
    # learnable: every token is followed by at most 4 distinct tokens inside a document
    succ: dict[int, set] = {}
    for x, y in zip(a.tokens[:-1], a.tokens[1:]):
        if x != 0 and y != 0:
            succ.setdefault(int(x), set()).add(int(y))
    assert max(len(s) for s in succ.values()) <= 4


def test_packing_round_trip_reproduces_the_stream():
    cfg = synth_cfg()
    bundle = build_data(cfg)
    loader, stream = bundle.train, bundle.train.stream
    n, t = loader.n_windows, cfg.seq_len
    assert n == (stream.n_tokens - 1) // t
    by_window = {}
    for _ in range(-(-n // cfg.micro_batch_size)):
        ids = loader.window_ids()
        batch = loader.next_batch()
        for w, inp, lab in zip(ids, batch["input_ids"], batch["labels"]):
            by_window.setdefault(int(w), (inp, lab))
    assert sorted(by_window) == list(range(n))
    inputs = torch.cat([by_window[w][0] for w in range(n)])
    labels = torch.cat([by_window[w][1] for w in range(n)])
    expect = torch.tensor(stream.tokens[: n * t + 1].astype(np.int64))
    assert torch.equal(inputs, expect[:-1]) and torch.equal(labels, expect[1:])
    assert batch["input_ids"].dtype == torch.int64 and batch["labels"].dtype == torch.int64
    assert "doc_ids" not in batch


def test_ranks_are_disjoint_and_together_complete_an_epoch():
    world = 3
    loaders = [build_data(synth_cfg(), rank=r, world_size=world).train for r in range(world)]
    n, mb = loaders[0].n_windows, 3
    steps = n // (world * mb)
    seen = [[] for _ in range(world)]
    for _ in range(steps):
        for r, ld in enumerate(loaders):
            seen[r] += ld.window_ids().tolist()
            ld.next_batch()
    flat = [w for s in seen for w in s]
    assert len(flat) == len(set(flat)) == steps * world * mb
    # the windows not yet seen are exactly the remainder of the epoch (fewer than one step)
    assert len(set(range(n)) - set(flat)) == n - steps * world * mb < world * mb
    # a different seed gives a different order
    other = build_data(synth_cfg(seed=8)).train
    assert other.window_ids().tolist() != seen[0][:mb]


def test_resume_returns_exactly_the_next_batches_also_across_epochs():
    cfg = synth_cfg(doc_mask=True)
    a = build_data(cfg).train
    steps_per_epoch = a.n_windows // cfg.micro_batch_size
    for _ in range(steps_per_epoch - 2):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON
    expect = [a.next_batch() for _ in range(5)]  # crosses into epoch 1
    assert a.epoch == 1
    b = build_data(cfg).train
    b.load_state_dict(state)
    for want in expect:
        got = b.next_batch()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    # resumed on another world size: one rank continues with what ranks 0 and 1 would have read
    two = [build_data(cfg, rank=r, world_size=2).train for r in range(2)]
    for ld in two:
        ld.load_state_dict(state)
    want = np.concatenate([ld.window_ids() for ld in two])
    one = build_data(cfg).train
    one.load_state_dict(two[0].state_dict())
    got = np.concatenate([one.window_ids(), (one.next_batch(), one.window_ids())[1]])
    assert np.array_equal(got, want)
    with pytest.raises(ValueError, match="seed"):
        build_data(synth_cfg(seed=99)).train.load_state_dict(state)
    with pytest.raises(TypeError):
        b.load_state_dict([1, 2])


def test_doc_mask_labels_and_doc_ids_match_a_loop_reference():
    tokens = np.arange(1, 41, dtype=np.uint16)
    starts = np.array([0, 3, 4, 15, 16, 33, 40], dtype=np.int64)  # docs of length 3, 1, 11, 1, 17, 7
    stream = TokenStream(tokens, starts)
    docs = flat_doc_ids(stream)
    seq_len, win = 8, np.array([0, 8, 16, 32, 40])  # the last row runs past the end: padding
    batch = make_batch(stream, win, seq_len, doc_mask=True, pad_id=0)
    plain = make_batch(stream, win, seq_len, doc_mask=False, pad_id=0)
    for row, a in enumerate(win):
        for t in range(seq_len):
            g = a + t
            if g + 1 >= len(tokens):
                want_label, want_plain = IGNORE_INDEX, IGNORE_INDEX
            else:
                want_plain = int(tokens[g + 1])
                want_label = want_plain if docs[g + 1] == docs[g] else IGNORE_INDEX
            assert batch["labels"][row, t] == want_label, (row, t)
            assert plain["labels"][row, t] == want_plain, (row, t)
            assert batch["input_ids"][row, t] == (tokens[g] if g < len(tokens) else 0)
        real = [docs[a + t] if a + t < len(tokens) else None for t in range(seq_len)]
        ids = batch["doc_ids"][row].tolist()
        # same document <=> same id, and ids start at 0 in every row
        assert ids[0] == 0
        for i in range(seq_len):
            for j in range(seq_len):
                assert (ids[i] == ids[j]) == (real[i] == real[j])
    assert batch["doc_ids"].dtype == torch.int32


def test_cu_seqlens_segments_give_per_document_causal_attention():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    cu, max_len = doc_cu_seqlens(doc_ids)
    assert cu.tolist() == [0, 2, 5, 6, 12] and max_len == 6 and cu.dtype == torch.int32
    # reference: each query attends, by plain softmax, to the keys at or before it in its document
    q = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = torch.empty_like(q)
    for b in range(2):
        for t in range(6):
            keys = [s for s in range(t + 1) if doc_ids[b, s] == doc_ids[b, t]]
            weights = torch.softmax(q[b, keys] @ q[b, t] / 2.0, dim=0)  # 1/sqrt(head dim 4)
            want[b, t] = weights @ q[b, keys]
    # causal attention over each flattened cu_seqlens segment (what a varlen kernel computes)
    flat_q, flat_want = q.reshape(12, 4), want.reshape(12, 4)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        seg = flat_q[s:e][None, None]
        got = torch.nn.functional.scaled_dot_product_attention(seg, seg, seg, is_causal=True)
        torch.testing.assert_close(got[0, 0], flat_want[s:e], rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="doc_ids"):
        doc_cu_seqlens(torch.zeros(3, dtype=torch.int32))


def test_validation_is_deterministic_covers_the_split_and_pads_evenly():
    cfg = synth_cfg(val_fraction=0.2, micro_batch_size=2)
    world = 2
    sets = [build_data(cfg, rank=r, world_size=world).val for r in range(world)]
    stream = sets[0].stream
    first = list(sets[0].batches())
    again = list(sets[0].batches())
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(first, again))
    assert len(list(sets[0].batches(2))) == 2
    per_rank = [list(s.batches()) for s in sets]
    assert len(per_rank[0]) == len(per_rank[1])  # equal counts: collectives stay matched
    labels = [lab for r in range(world) for b in per_rank[r] for lab in b["labels"].flatten().tolist()]
    valid = sorted(x for x in labels if x != IGNORE_INDEX)
    assert valid == sorted(stream.tokens[1:].astype(np.int64).tolist())  # each val label once
    with pytest.raises(ValueError, match="max_batches"):
        next(sets[0].batches(0))


def test_split_is_fixed_and_disjoint():
    tr, va = split_documents(100, 0.1)
    assert len(va) == 10 and not set(tr) & set(va) and len(tr) + len(va) == 100
    assert np.array_equal(va, split_documents(100, 0.1)[1])
    assert len(split_documents(1, 0.5)[1]) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(10, 1.0)


def test_bad_arguments_and_too_small_corpus():
    with pytest.raises(ValueError, match="seq_len"):
        build_data(synth_cfg(seq_len=0))
    with pytest.raises(ValueError, match="rank"):
        build_data(synth_cfg(), rank=2, world_size=2)
    with pytest.raises(ValueError, match="vocab_size"):
        build_data(synth_cfg(vocab_size=4))
    with pytest.raises(DataError, match=r"has \d+ tokens, but one batch needs 24577") as err:
        build_data(synth_cfg(seq_len=4096, micro_batch_size=3), world_size=2)
    assert isinstance(err.value, ValueError)  # library errors are ValueErrors; only the CLI exits


def test_token_dtype_fits_every_id():
    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(152064) == np.uint32
    big = build_data(synth_cfg(vocab_size=70000))
    assert big.train.stream.tokens.dtype == np.uint32 and big.vocab_size == 70000
    assert int(big.train.next_batch()["input_ids"].max()) < 70000
