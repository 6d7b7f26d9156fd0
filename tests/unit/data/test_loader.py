"""PackedLoader: epoch coverage, document boundaries (checked against the model), exact resume,
data-parallel ranks, weighted mixing and its errors.

Most tests use documents whose token values are all distinct, so a value says which document and
position it came from.
"""

import copy
import json
import warnings

import numpy as np
import pytest
import torch

from herd.data.loader import IGNORE_INDEX, PackedLoader
from herd.data.shards import ShardWriter
from herd.model import ModelArgs, build_model


def write_docs(path, docs, *, vocab_size, max_tokens_per_shard=200, tokenizer_sha256=None):
    with ShardWriter(path, vocab_size=vocab_size, max_tokens_per_shard=max_tokens_per_shard,
                     tokenizer_sha256=tokenizer_sha256) as w:
        for d in docs:
            w.add(d)
    return path


def unique_docs(num_tokens, *, seed=0, offset=0, max_len=40):
    """Documents of random lengths (one of them empty) holding the values offset..offset+num_tokens-1 once."""
    rng = np.random.default_rng(seed)
    values = rng.permutation(num_tokens) + offset
    cuts = np.sort(rng.choice(np.arange(1, num_tokens), size=num_tokens // (max_len // 2), replace=False))
    docs = np.split(values, cuts)
    docs.insert(3, values[:0])
    return docs


@pytest.fixture
def corpus(tmp_path):
    docs = unique_docs(997)  # prime: rows never line up with epochs
    return write_docs(tmp_path / "a", docs, vocab_size=997), docs


def _stream(loader, calls):
    """Concatenated inputs and targets of a single-source, single-rank loader over (batch, seq) calls."""
    ins, tgt = [], []
    for b, s in calls:
        batch = loader.next_batch(batch_size=b, seq_len=s)
        ins.append(batch.inputs.reshape(-1))
        tgt.append(batch.targets.reshape(-1))
    return torch.cat(ins).numpy(), torch.cat(tgt).numpy()


def test_every_token_is_an_input_once_and_a_target_once_per_epoch(corpus):
    path, docs = corpus
    n = 997
    firsts = {int(d[0]) for d in docs if len(d)}
    loader = PackedLoader([path], seq_len=16, batch_size=3, seed=0)
    inputs, targets = _stream(loader, [(3, 16)] * 70)  # 3,360 tokens: three epochs and a bit
    for e in range(3):
        epoch = inputs[e * n : (e + 1) * n]
        assert sorted(epoch) == list(range(n))  # every token an input exactly once
        # ...as whole documents back to back: cut at document starts, the pieces are the documents.
        starts = [i for i, v in enumerate(epoch) if v in firsts] + [n]
        pieces = {tuple(epoch[a:b]) for a, b in zip(starts, starts[1:])}
        assert pieces == {tuple(d) for d in docs if len(d)}
        valid = targets[e * n : (e + 1) * n]
        assert sorted(valid[valid != IGNORE_INDEX].tolist() + list(firsts)) == list(range(n))
    # Targets are the next input, or -100 exactly where the next token starts a document.
    nxt = inputs[1:]
    expected = np.where(np.isin(nxt, list(firsts)), IGNORE_INDEX, nxt)
    np.testing.assert_array_equal(targets[:-1], expected)
    assert not np.array_equal(inputs[:n], inputs[n : 2 * n])  # each epoch is shuffled anew


def test_doc_ids_change_exactly_at_document_starts(corpus):
    path, docs = corpus
    firsts = {int(d[0]) for d in docs if len(d)}
    batch = PackedLoader([path], seq_len=64, batch_size=4, seed=5).next_batch()
    for row_in, row_ids, row_tgt in zip(batch.inputs.tolist(), batch.doc_ids.tolist(), batch.targets.tolist()):
        assert row_ids[0] == 0
        for t in range(1, 64):
            assert row_ids[t] - row_ids[t - 1] == (1 if row_in[t] in firsts else 0)
        assert [t == IGNORE_INDEX for t in row_tgt[:-1]] == [v in firsts for v in row_in[1:]]
    assert batch.num_targets == int((batch.targets != IGNORE_INDEX).sum())
    assert batch.inputs.dtype == batch.targets.dtype == batch.doc_ids.dtype == torch.int64
    assert batch.inputs.shape == batch.targets.shape == batch.doc_ids.shape == (4, 64)


def test_packed_rows_through_the_model_equal_documents_run_alone(tmp_path):
    args = ModelArgs.from_name("debug")
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, args.vocab_size, size=int(n)) for n in rng.integers(5, 30, size=40)]
    loader = PackedLoader([write_docs(tmp_path / "m", docs, vocab_size=args.vocab_size)], seq_len=64,
                          batch_size=1, seed=0)
    batch = loader.next_batch()
    model = build_model(args, seed=0).eval()
    with torch.no_grad():
        packed = model(batch.inputs, doc_ids=batch.doc_ids)
        unmasked = model(batch.inputs)
        for r in range(1):
            ids = batch.doc_ids[r]
            segments = torch.unique_consecutive(ids, return_counts=True)[1].tolist()
            assert len(segments) >= 3
            a = 0
            for n in segments:
                alone = model(batch.inputs[r : r + 1, a : a + n])
                torch.testing.assert_close(packed[r, a : a + n], alone[0], atol=1e-5, rtol=1e-5)
                a += n
            # Without the ids the later documents would see the earlier ones: the ids matter.
            assert not torch.allclose(packed[r, segments[0]:], unmasked[r, segments[0]:], atol=1e-3)


def test_same_seed_same_batches_other_seed_other_order(corpus):
    path, _ = corpus
    a, b, c = (PackedLoader([path], seq_len=32, batch_size=2, seed=s) for s in (7, 7, 8))
    for _ in range(5):
        x, y, z = a.next_batch(), b.next_batch(), c.next_batch()
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.doc_ids, y.doc_ids)
    assert not torch.equal(x.inputs, z.inputs)


SCHEDULE = [(2, 16)] * 10 + [(3, 24)] * 8 + [(1, 7)] * 5 + [(4, 40)] * 6  # batch and sequence ramps


def test_resume_continues_at_the_exact_next_token(tmp_path):
    docs_a, docs_b = unique_docs(401, seed=1), unique_docs(233, seed=2, offset=401)
    paths = [write_docs(tmp_path / "a", docs_a, vocab_size=634), write_docs(tmp_path / "b", docs_b, vocab_size=634)]

    def make():
        return PackedLoader(paths, weights=[0.6, 0.4], seq_len=16, batch_size=2, seed=3)

    reference = make()
    expected, positions = [], []
    for b, s in SCHEDULE:
        positions.append(reference.tokens_read)
        expected.append(reference.next_batch(batch_size=b, seq_len=s))
    # The schedule crosses several epochs of both sources, so some cuts fall right before a call
    # that straddles an epoch boundary, and others right after a change of batch size or length.
    assert reference.tokens_read[0] > 2 * 401 and reference.tokens_read[1] > 3 * 233
    crossing = [k for k, (p, (b, s)) in enumerate(zip(positions, SCHEDULE)) if p[1] // 233 != (p[1] + b * s) // 233]
    assert crossing
    for cut in range(len(SCHEDULE)):  # every cut point: after each call
        first = make()
        for b, s in SCHEDULE[:cut]:
            first.next_batch(batch_size=b, seq_len=s)
        state = json.loads(json.dumps(first.state_dict()))  # plain ints and lists: nothing hidden
        resumed = make()
        resumed.load_state_dict(state)
        for (b, s), want in zip(SCHEDULE[cut:], expected[cut:]):
            got = resumed.next_batch(batch_size=b, seq_len=s)
            for field in ("inputs", "targets", "doc_ids"):
                assert torch.equal(getattr(got, field), getattr(want, field)), (cut, field)


def test_the_token_stream_does_not_depend_on_the_shape_of_the_calls(corpus):
    path, _ = corpus
    fixed, _ = _stream(PackedLoader([path], seq_len=8, batch_size=1, seed=2), [(1, 8)] * 300)
    ramped, _ = _stream(PackedLoader([path], seq_len=8, batch_size=1, seed=2), [(b, s) for b, s in SCHEDULE])
    np.testing.assert_array_equal(ramped, fixed[: ramped.size])


def test_state_survives_torch_distributed_checkpoint(corpus, tmp_path):
    import torch.distributed.checkpoint as dcp

    path, _ = corpus
    loader = PackedLoader([path], seq_len=16, batch_size=2, seed=0)
    for _ in range(7):
        loader.next_batch()
    fresh = PackedLoader([path], seq_len=16, batch_size=2, seed=0)
    target = {"loader": fresh.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving in a single process"
        dcp.save({"loader": loader.state_dict()}, checkpoint_id=tmp_path / "ckpt")
        dcp.load(target, checkpoint_id=tmp_path / "ckpt")
    fresh.load_state_dict(target["loader"])
    assert torch.equal(fresh.next_batch().inputs, loader.next_batch().inputs)


def test_dp_ranks_are_disjoint_and_cover_the_global_batch(corpus):
    path, _ = corpus
    world, B = 3, 2
    single = PackedLoader([path], seq_len=20, batch_size=B * world, seed=4)
    ranks = [PackedLoader([path], seq_len=20, batch_size=B, seed=4, dp_rank=r, dp_world=world) for r in range(world)]
    seen = []
    for step in range(4):
        parts = [r.next_batch() for r in ranks]
        whole = single.next_batch()
        assert torch.equal(torch.cat([p.inputs for p in parts]), whole.inputs)
        assert torch.equal(torch.cat([p.targets for p in parts]), whole.targets)
        seen.append([set(p.inputs.reshape(-1).tolist()) for p in parts])
    # 4 steps x 120 tokens stay inside the first epoch (997 tokens): no value may repeat across ranks.
    per_rank = [set().union(*(s[r] for s in seen)) for r in range(world)]
    assert sum(len(s) for s in per_rank) == len(set().union(*per_rank)) == 4 * world * B * 20
    assert all(r.state_dict() == single.state_dict() for r in ranks)


def test_weighted_mix_holds_its_proportions(tmp_path):
    a = write_docs(tmp_path / "a", unique_docs(500, seed=1), vocab_size=4000)
    b = write_docs(tmp_path / "b", unique_docs(3000, seed=2, offset=1000), vocab_size=4000)
    loader = PackedLoader([a, b], weights=[3, 1], seq_len=32, batch_size=4, seed=0)
    from_a = total = 0
    for step in range(1, 201):
        x = loader.next_batch().inputs
        from_a += int((x < 1000).sum())
        total += x.numel()
        if step in (1, 10, 200):  # within one row of the target share at every step
            assert abs(from_a - 0.75 * total) <= 32
    # By size when no weights are given; a zero weight is never read.
    by_size = PackedLoader([a, b], seq_len=32, batch_size=8, seed=0)
    x = torch.cat([by_size.next_batch().inputs for _ in range(50)])
    assert abs(float((x < 1000).float().mean()) - 500 / 3500) < 0.01
    only_b = PackedLoader([a, b], weights=[0, 1], seq_len=32, batch_size=8, seed=0)
    assert bool((only_b.next_batch().inputs >= 1000).all())


def test_clear_errors(tmp_path, corpus):
    path, _ = corpus
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PackedLoader([tmp_path / "missing"], seq_len=8, batch_size=1, seed=0)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "shard_00000.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="incomplete"):
        PackedLoader([tmp_path / "partial"], seq_len=8, batch_size=1, seed=0)
    other = write_docs(tmp_path / "other", [[1, 2, 3]], vocab_size=500)
    with pytest.raises(ValueError, match="another vocabulary"):
        PackedLoader([path, other], seq_len=8, batch_size=1, seed=0)
    other_tok = write_docs(tmp_path / "other_tok", [[1, 2, 3]], vocab_size=997, tokenizer_sha256="f" * 64)
    with pytest.raises(ValueError, match="another vocabulary"):
        PackedLoader([path, other_tok], seq_len=8, batch_size=1, seed=0)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="seq_len must be a positive int"):
            PackedLoader([path], seq_len=bad, batch_size=1, seed=0)
    loader = PackedLoader([path], seq_len=8, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        loader.next_batch(seq_len=0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        loader.next_batch(batch_size=0)
    with pytest.raises(ValueError, match="one weight per source"):
        PackedLoader([path], weights=[1, 2], seq_len=8, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="weights must be"):
        PackedLoader([path], weights=[-1], seq_len=8, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="dp_rank"):
        PackedLoader([path], seq_len=8, batch_size=1, seed=0, dp_rank=2, dp_world=2)
    with pytest.raises(ValueError, match="list of shard directories"):
        PackedLoader(str(path), seq_len=8, batch_size=1, seed=0)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed"):
        PackedLoader([path], seq_len=8, batch_size=1, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="same shard directories"):
        PackedLoader([other], seq_len=8, batch_size=1, seed=0).load_state_dict(copy.deepcopy(state))
