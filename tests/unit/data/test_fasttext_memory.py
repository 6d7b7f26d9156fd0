"""fastText training must not depend on what happens to lie in memory.

The fasttext-numpy2-wheel build (fastText's main branch since b733943, "Predict 1.9-4.2x faster")
keeps matrices in an `AlignedVector` that is `posix_memalign`ed and never zeroed, and
`DenseMatrix::uniform` with one thread fills only the first tenth of the input matrix. The rest is
read as it was found. These tests put garbage there on purpose: the old in-process training failed
both of them with "Encountered NaN".
"""

import ctypes
import filecmp
import os
import platform
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from herd.data.steps.classifiers import train_fasttext

ANIMALS = "llama alpaca camel grass hay valley river herd wool mountain farmer sleeps eats walks".split()
CODE = "def return import self None for in range if else lambda yield class print len".split()


def examples(n: int = 150) -> list[tuple[str, str]]:
    rng = random.Random(0)
    return [(" ".join(rng.choice(words) for _ in range(rng.randint(60, 120))), label)
            for label, words in (("prose", ANIMALS), ("code", CODE)) for _ in range(n)]


def test_word_unigrams_train_without_reading_recycled_heap_memory(tmp_path):
    # wordNgrams=1 and no subwords: fastText's input matrix is just nwords x dim (~8 KB), which
    # malloc serves from chunks the interpreter has freed. In-process, nine tenths of it were stale
    # bytes (values like 5e34) and every run ended in "Encountered NaN".
    info = train_fasttext(examples(), tmp_path / "m.bin", epoch=5, word_ngrams=1)
    assert info["accuracy"] == 1.0


_MB = 1 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
_DIM = 16  # keeps the test quick: a 128 MB input matrix
# fastText's two big allocations, in order: the dictionary's word -> id table (MAX_VOCAB_SIZE int32)
# and the input matrix, (nwords + 2M n-gram buckets) x dim fp32.
_WORD_TABLE_BYTES = 30_000_000 * 4
_INPUT_MATRIX_BYTES = (2_000_000 + 30) * _DIM * 4


def _leave_nan_in_the_heap(nbytes: int) -> None:
    """The suite's state: herd's CPU Trainer (`keep_freed_memory_in_the_heap`) sets glibc's mmap
    and trim thresholds to 1 GiB for the whole process, so blocks below that come from the brk heap
    and stay there when freed. A tensor freed afterwards leaves its bytes where the next large
    malloc, fastText's, is carved from."""
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    stale = np.full(nbytes // 4, np.nan, np.float32)
    del stale


def _malloc_lands_on_nan(first: int, then: int) -> bool:
    """Whether a block of `then` bytes, allocated after one of `first` bytes, is NaN-filled memory."""
    libc = ctypes.CDLL(None)
    blocks = [ctypes.c_void_p(), ctypes.c_void_p()]
    try:
        for block, size in zip(blocks, (first, then)):
            assert libc.posix_memalign(ctypes.byref(block), 64, ctypes.c_size_t(size)) == 0
        floats = np.ctypeslib.as_array(ctypes.cast(blocks[1], ctypes.POINTER(ctypes.c_float)), shape=(then // 4,))
        return bool(np.isnan(floats[then // 2::4096]).all())  # past the tenth that fastText writes
    finally:
        for block in blocks:
            libc.free(block)


def _stale_heap_scenario(folder: Path) -> None:
    """Trains the same model twice, the second time with NaN lying in freed memory where fastText allocates."""
    rows = examples()
    train_fasttext(rows, folder / "clean.bin", epoch=5, dim=_DIM)
    _leave_nan_in_the_heap(320 * _MB)
    # Without this the test would prove nothing: fastText's allocations must be able to land there.
    assert _malloc_lands_on_nan(_WORD_TABLE_BYTES, _INPUT_MATRIX_BYTES), "the NaN is not where malloc looks"
    info = train_fasttext(rows, folder / "dirty.bin", epoch=5, dim=_DIM)
    # Same data, same seed: the same model, bit for bit, whatever the caller's memory held.
    assert info["accuracy"] == 1.0
    assert filecmp.cmp(folder / "clean.bin", folder / "dirty.bin", shallow=False), "the model depends on the heap"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="builds the stale-memory state with glibc's malloc")
def test_training_does_not_depend_on_the_callers_heap(tmp_path):
    """The suite flake: once a CPU Trainer had run in the test process, the input matrix of a
    word-bigram model (512 MB at dim 64) was carved out of memory that earlier tensors had used,
    instead of fresh (zeroed) pages, and sometimes held NaN or huge values.

    The scenario runs in a fresh interpreter, whose heap is known, so that the NaN reliably lies
    where fastText's allocations go, and so that the malloc settings do not leak into pytest's."""
    import herd

    env = dict(os.environ, PYTHONPATH=str(Path(herd.__file__).resolve().parents[1]))  # the herd under test
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr


if __name__ == "__main__":
    _stale_heap_scenario(Path(sys.argv[1]))
