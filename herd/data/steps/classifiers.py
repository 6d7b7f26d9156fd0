"""Model-based quality and domain classifiers: fastText, and a tiny transformer in plain torch.nn.

What Llama 3 did (§3.1.1-2): fastText trained to recognise text "that would be referenced by
Wikipedia", and DistilRoBERTa quality/code/reasoning scorers trained on Llama 2 judgements.
Neither the judge's labels nor pretrained DistilRoBERTa weights can be had offline, so herd keeps
the machinery and is honest about the labels: a classifier is trained from labelled *sources*
(any pipeline reader per label, e.g. Wikipedia leads as the "referenced by Wikipedia" positives,
web pages as negatives; Python sources as code, Wikipedia's Mathematics articles as maths), or
from a JSONL of `{"text", "label"}` that a stronger model produced elsewhere.

Trade-off: fastText (linear over hashed word n-grams, ~7,700 docs/s per core) is the workhorse;
the transformer (2 layers, dim 64, Llama 3 BPE ids hashed into 8,192 buckets, ~0.3M parameters)
is the small stand-in for DistilRoBERTa, trained from scratch in seconds on CPU, and slower to
apply. It lives here in plain torch.nn because herd/data may not import herd.model.

Scores are used three ways: a hard `threshold`, Pareto sampling (NeMo's GPT-3-style
`pareto(alpha) > 1 - score`, keeping some low scorers), or no filtering (just annotate, for the
mix and the annealing set).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from herd.data.document import Document
from herd.data.steps.base import Step, StepStats, matches
from herd.io import atomic_path

_WS = re.compile(r"\s+")


def fasttext_line(text: str, *, max_chars: int = 4000) -> str:
    """fastText reads one example per line: newlines become spaces, text is lowercased."""
    return _WS.sub(" ", text[:max_chars]).strip().lower()


# ---- fastText --------------------------------------------------------------------------------------

# Why fastText trains in a child process. The fastText build herd depends on (fasttext-numpy2-wheel,
# fastText's main branch since b733943) reads memory it never wrote: its matrices are now a
# posix_memalign'ed AlignedVector that nothing zeroes, and DenseMatrix::uniform fills only `thread`
# tenths of the input matrix (a tenth with one thread). The other nine tenths, most word-n-gram
# buckets among them, start as whatever malloc hands back. In a fresh process the 512 MB matrix
# (2M buckets x dim 64) gets new, zeroed pages, so training passed alone. In the test suite a CPU
# Trainer had run first, and herd.train.trainer.keep_freed_memory_in_the_heap sets glibc's mmap and
# trim thresholds to 1 GiB for the whole process: the matrix was then carved from heap memory that
# earlier tensors had used, and when they had left NaN or huge values there, training ended with
# "Encountered NaN" whatever the learning rate. The small matrix of a word_ngrams=1 model
# (nwords x dim) came from recycled memory every time, in any process.
# The child starts with a clean heap, and glibc's perturb tunable makes every block its malloc
# returns zero-filled (the fill byte is perturb ^ 0xff), large or small. Zeros are what a fresh
# process always gave the big matrix, so the models are bit-identical to the good runs before. Cost:
# ~0.3 s to start the interpreter, and the whole matrix is written once (resident, as fastText
# 0.9.2's zero-initialised std::vector was). Other C libraries ignore the tunable; there only the
# clean heap protects the matrix.
_FASTTEXT_CHILD = Path(__file__).with_name("fasttext_child.py")
_ZERO_FILLING_MALLOC = "glibc.malloc.perturb=255"


def train_fasttext(examples: Sequence[tuple[str, str]], out_path: str | Path, *, epoch: int = 10, dim: int = 64,
                   word_ngrams: int = 2, lr: float = 0.5, seed: int = 0, threads: int = 1) -> dict[str, Any]:
    """Trains a supervised fastText model on (text, label) pairs; holds out 10% to report accuracy.
    Writes atomically; returns {"train": n, "valid": n, "accuracy": a, "labels": [...]}.

    Training runs in a separate interpreter (`fasttext_child.py`), so that its result depends only
    on the data and the arguments, not on this process's memory (see the comment above)."""
    import importlib.util
    import subprocess
    import sys
    import tempfile

    if importlib.util.find_spec("fasttext") is None:
        raise ImportError("fastText classifiers need the fasttext-numpy2-wheel package: pip install 'herd[data]'")
    rows = list(examples)
    random.Random(seed).shuffle(rows)
    n_valid = max(1, len(rows) // 10)
    valid, train = rows[:n_valid], rows[n_valid:]
    if len({lab for _, lab in train}) < 2:
        raise ValueError("a classifier needs examples of at least two labels")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp, tempfile.TemporaryDirectory(prefix="herd-fasttext-") as work:
        train_file, result = Path(work) / "train.txt", Path(work) / "result.json"
        with open(train_file, "w", encoding="utf-8") as f:
            f.writelines(f"__label__{lab} {fasttext_line(text)}\n" for text, lab in train)
        job = {"train_file": str(train_file), "model": str(tmp), "result": str(result),
               "valid": [fasttext_line(text) for text, _ in valid],
               "params": {"epoch": epoch, "dim": dim, "wordNgrams": word_ngrams, "lr": lr, "seed": seed,
                          "thread": threads, "verbose": 0}}
        env = dict(os.environ)
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), _ZERO_FILLING_MALLOC]))
        # -P keeps the script's folder off sys.path: the child imports fastText, none of herd's modules.
        done = subprocess.run([sys.executable, "-P", str(_FASTTEXT_CHILD)], input=json.dumps(job), text=True,
                              capture_output=True, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"fastText training failed (exit code {done.returncode}):\n{done.stderr.strip()}")
        out = json.loads(result.read_text(encoding="utf-8"))
    pred = [p.removeprefix("__label__") for p in out["predicted"]]
    acc = float(np.mean([p == lab for p, (_, lab) in zip(pred, valid)]))
    return {"train": len(train), "valid": len(valid), "accuracy": round(acc, 4),
            "labels": sorted(lab.removeprefix("__label__") for lab in out["labels"])}


# ---- tiny transformer (plain torch.nn) -------------------------------------------------------------


def _torch_model(n_labels: int, *, buckets: int, dim: int, layers: int, heads: int, max_len: int) -> Any:
    import torch
    from torch import nn

    class TinyClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(buckets, dim, padding_idx=0)
            self.pos = nn.Embedding(max_len, dim)
            layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True,
                                               norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = nn.Linear(dim, n_labels)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: (B, S), 0 = padding
            pad = ids == 0
            x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))  # (B, S, D)
            x = self.encoder(x, src_key_padding_mask=pad)                                  # (B, S, D)
            keep = (~pad).unsqueeze(-1).to(x.dtype)
            pooled = (x * keep).sum(1) / keep.sum(1).clamp(min=1)                          # (B, D)
            return self.head(pooled)                                                       # (B, L)

    return TinyClassifier()


class _Hasher:
    """Llama 3 BPE ids folded into `buckets` (id 0 is padding)."""

    def __init__(self, buckets: int, max_len: int) -> None:
        from herd.tokenizer import Tokenizer, llama3_tokenizer_path

        self.tok = Tokenizer.from_file(llama3_tokenizer_path())
        self.buckets, self.max_len = buckets, max_len

    def __call__(self, texts: Sequence[str]) -> Any:
        import torch

        out = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = self.tok.encode(t[: self.max_len * 8], bos=False, eos=False)[: self.max_len]
            out[i, : len(ids)] = torch.tensor([1 + x % (self.buckets - 1) for x in ids], dtype=torch.long)
        return out


def train_transformer(examples: Sequence[tuple[str, str]], out_path: str | Path, *, epochs: int = 3,
                      dim: int = 64, layers: int = 2, heads: int = 4, buckets: int = 8192, max_len: int = 128,
                      batch_size: int = 32, lr: float = 2e-3, seed: int = 0) -> dict[str, Any]:
    """Trains the tiny transformer classifier; same contract as `train_fasttext`."""
    import torch

    rows = list(examples)
    random.Random(seed).shuffle(rows)
    labels = sorted({lab for _, lab in rows})
    if len(labels) < 2:
        raise ValueError("a classifier needs examples of at least two labels")
    n_valid = max(1, len(rows) // 10)
    valid, train = rows[:n_valid], rows[n_valid:]
    torch.manual_seed(seed)
    # A model this small gains nothing from intra-op threads, and on a busy 2-core machine the
    # threads' spinning made training 4x slower; restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_transformer(train, valid, labels, out_path, epochs=epochs, batch_size=batch_size, lr=lr,
                                  cfg={"buckets": buckets, "dim": dim, "layers": layers, "heads": heads,
                                       "max_len": max_len})
    finally:
        torch.set_num_threads(threads)


def _train_transformer(train: list[tuple[str, str]], valid: list[tuple[str, str]], labels: list[str],
                       out_path: str | Path, *, epochs: int, batch_size: int, lr: float,
                       cfg: dict[str, int]) -> dict[str, Any]:
    import torch

    model = _torch_model(len(labels), **cfg)
    hasher = _Hasher(cfg["buckets"], cfg["max_len"])
    x_train, y_train = hasher([t for t, _ in train]), torch.tensor([labels.index(lab) for _, lab in train])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(train))
        for i in range(0, len(train), batch_size):
            idx = perm[i:i + batch_size]
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(hasher([t for t, _ in valid])).argmax(-1).tolist()
    acc = float(np.mean([labels[p] == lab for p, (_, lab) in zip(pred, valid)]))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        torch.save({"format": "herd-tiny-classifier-v1", "labels": labels, "config": cfg,
                    "state_dict": model.state_dict()}, tmp)
    return {"train": len(train), "valid": len(valid), "accuracy": round(acc, 4), "labels": labels,
            "parameters": sum(p.numel() for p in model.parameters())}


# ---- scoring step ----------------------------------------------------------------------------------


class _FastTextScorer:
    def __init__(self, path: Path) -> None:
        import fasttext

        self.model = fasttext.load_model(str(path))
        self.labels = [lab.removeprefix("__label__") for lab in self.model.get_labels()]

    def probs(self, texts: Sequence[str]) -> list[dict[str, float]]:
        out = []
        for t in texts:
            labs, ps = self.model.predict(fasttext_line(t), k=-1)
            out.append({lab.removeprefix("__label__"): float(p) for lab, p in zip(labs, ps)})
        return out


class _TransformerScorer:
    def __init__(self, path: Path) -> None:
        import torch

        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("format") != "herd-tiny-classifier-v1":
            raise ValueError(f"{path} is not a herd tiny classifier checkpoint")
        self.labels = ckpt["labels"]
        cfg = ckpt["config"]
        self.model = _torch_model(len(self.labels), **cfg)
        self.model.load_state_dict(ckpt["state_dict"])
        self.model.eval()
        self.hasher = _Hasher(cfg["buckets"], cfg["max_len"])

    def probs(self, texts: Sequence[str]) -> list[dict[str, float]]:
        import torch

        with torch.no_grad():
            p = torch.softmax(self.model(self.hasher(texts)), -1).tolist()
        return [dict(zip(self.labels, row)) for row in p]


def load_scorer(path: str | Path) -> Any:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"classifier model {p} not found; train it first (a [[train]] block in the "
                                "pipeline file, or `herd data train-classifier`)")
    return _TransformerScorer(p) if p.suffix == ".pt" else _FastTextScorer(p)


@dataclass
class Classify(Step):
    """Scores documents with a trained classifier (fastText `.bin` or tiny transformer `.pt`).

    Writes `metadata[field]`: the top label (`positive_label` unset: e.g. a domain), or the
    probability of `positive_label` (a quality score). With a score, `threshold` keeps docs at or
    above it, `pareto_alpha` samples instead (NeMo's alpha = 3); neither: annotate only.
    """

    type: ClassVar[str] = "classify"
    supports_where: ClassVar[bool] = True  # documents not matching `where` pass unscored
    name: str = "classify"
    model: str = ""
    field: str = "quality"
    positive_label: str | None = None
    threshold: float | None = None
    pareto_alpha: float | None = None
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError(f"classify step {self.name}: set model = path to a trained classifier")
        if (self.threshold is not None or self.pareto_alpha is not None) and self.positive_label is None:
            raise ValueError(f"classify step {self.name}: threshold/pareto_alpha need positive_label")
        self._scorer: Any = None

    def _decide(self, doc: Document, probs: dict[str, float], stats: StepStats) -> bool:
        if self.positive_label is None:
            label = max(probs, key=probs.__getitem__)
            doc.metadata[self.field] = label
            stats.counters[f"{self.field}_{label}"] += 1
            return True
        score = probs.get(self.positive_label, 0.0)
        doc.metadata[self.field] = round(score, 4)
        if self.threshold is not None:
            return score >= self.threshold
        if self.pareto_alpha is not None:
            import xxhash

            rng = np.random.default_rng([self.seed, xxhash.xxh64_intdigest(doc.id.encode())])
            return bool(rng.pareto(self.pareto_alpha) > 1.0 - score)
        return True

    def __call__(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        if self._scorer is None:
            self._scorer = load_scorer(self.model)
        batch: list[Document] = []

        def flush() -> Iterator[Document]:
            todo = [d for d in batch if self.where is None or matches(d, self.where)]
            probs = dict(zip(map(id, todo), self._scorer.probs([d.text for d in todo]))) if todo else {}
            for d in batch:
                if id(d) in probs and not self._decide(d, probs[id(d)], stats):
                    stats.drop(f"{self.field}_below_threshold" if self.threshold is not None
                               else f"{self.field}_not_sampled")
                    continue
                stats.docs_out += 1
                stats.chars_out += len(d.text)
                yield d
            batch.clear()

        for doc in docs:
            stats.docs_in += 1
            stats.chars_in += len(doc.text)
            batch.append(doc)
            if len(batch) >= self.batch_size:
                yield from flush()
        yield from flush()


STEPS = (Classify,)
