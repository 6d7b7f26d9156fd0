"""Slices read from disk equal the same slices of the fully loaded model, in every format.

The reference is `load_model` (HF, Meta with one and two model-parallel files, GGUF at F32 and
Q8_0), which the format parity tests hold to transformers and llama.cpp's own readers.
"""

import pytest
import torch

from herd.model import ModelArgs, build_model
from herd.model.formats import load_model, save_model
from herd.model.gguf import write_gguf
from herd.model.sliced import open_sliced

ARGS = ModelArgs.from_name("debug", vocab_size=255)


@pytest.fixture(scope="module", params=["hf", "meta1", "meta2", "gguf-f32", "gguf-q8", "hf-tied"])
def ckpt(request, tmp_path_factory):
    kind = request.param
    args = ARGS.replace(tie_embeddings=True, vocab_size=256) if kind.endswith("tied") else ARGS
    if kind in ("gguf-q8", "meta2"):  # Q8_0 blocks and Meta's vocabulary split need an even vocabulary
        args = args.replace(vocab_size=256)
    model = build_model(args, seed=2)
    root = tmp_path_factory.mktemp(kind)
    if kind.startswith("hf"):
        path = save_model(model, root / "ck", format="hf")
    elif kind.startswith("meta"):
        path = save_model(model, root / "ck", format="meta", num_shards=int(kind[-1]))
    else:
        path = write_gguf(model, root / "m.gguf", qtype="Q8_0" if kind.endswith("q8") else "F32")
    return path, load_model(path).state_dict()


def test_every_slice_equals_the_full_load(ckpt):
    path, full = ckpt
    sliced = open_sliced(path)
    for name, ref in full.items():
        assert sliced.shape(name) == tuple(ref.shape), name
        torch.testing.assert_close(sliced.read(name), ref, rtol=0, atol=0, msg=name)
        if ref.dim() != 2:
            continue
        head = ARGS.head_dim if ".attention.w" in name else 1
        for dim in (0, 1):
            size = ref.shape[dim]
            # Whole heads for q/k rows (the HF permutation is per head); an odd cut elsewhere.
            cuts = [(0, head * (size // head // 2)), (head * (size // head // 2), size)] if dim == 0 and head > 1 \
                else [(0, 3), (3, size)]
            for start, stop in cuts:
                got = sliced.read(name, dim, start, stop)
                torch.testing.assert_close(got, ref.narrow(dim, start, stop - start), rtol=0, atol=0,
                                           msg=f"{name} dim {dim} [{start}:{stop})")


def test_slices_own_only_their_bytes(ckpt):
    """A view would keep the whole matrix (or the whole mapped file) alive behind a small slice."""
    path, _ = ckpt
    for dim in (0, 1):
        t = open_sliced(path).read("layers.0.feed_forward.w2.weight", dim, 0, 4)
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_bad_slices_name_the_problem(tmp_path):
    path = save_model(build_model(ARGS, seed=0), tmp_path / "ck")
    sliced = open_sliced(path)
    with pytest.raises(ValueError, match="exceeds"):
        sliced.read("layers.0.attention.wo.weight", 1, 0, 10**6)
    with pytest.raises(ValueError, match="whole heads"):
        sliced.read("layers.0.attention.wq.weight", 0, 0, 3)
    with pytest.raises(ValueError, match="no tensor 'nope'"):
        sliced.read("nope")


def test_column_slices_read_in_row_blocks_match(tmp_path, monkeypatch):
    import herd.model.sliced as sliced_mod

    model = build_model(ARGS, seed=1)
    path = save_model(model, tmp_path / "ck")
    monkeypatch.setattr(sliced_mod, "_ROW_BLOCK", 5)  # 64 rows: 12 full blocks and a partial one
    got = open_sliced(path).read("layers.1.feed_forward.w2.weight", 1, 7, 30)
    torch.testing.assert_close(got, model.layers["1"].feed_forward.w2.weight[:, 7:30].detach(), rtol=0, atol=0)
