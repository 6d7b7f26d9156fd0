"""Language identification with models that ship inside installable packages, or a local fastText
model (Llama 3 used fastText's 176-language `lid.176.bin`).

Trade-off: `lid.176.bin` and GlotLID can only be downloaded from a model hub, which herd never
does at run time, so the default backend is CLD2 (pycld2: tables compiled into the wheel, ~80
languages, ~2,800 docs/s per core in the research note, reliable on one-sentence inputs);
py3langid (97 languages, model in the wheel, ~150 docs/s) is the second offline choice, and
`backend = "fasttext"` with `model_path` runs a user's `lid.176.bin` exactly as the paper did.
Scores are not comparable across backends: fastText and py3langid give a probability, CLD2
the percentage of the text's bytes in the top language, so `min_score` is per backend.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from herd.data.document import Document
from herd.data.steps.base import Step, StepStats

# CLD2 rejects some control characters as "invalid UTF-8"; they carry no language anyway.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass
class LangId(Step):
    """Sets `metadata["language"]` (ISO 639-1 where the backend has one) and
    `metadata["language_score"]`; keeps only `languages` (all when unset) scoring >= `min_score`.
    With `where` (e.g. {source = ["web", "wiki"]}) other documents pass unlabelled and unfiltered:
    a prose language model has nothing to say about code."""

    type: ClassVar[str] = "langid"
    supports_where: ClassVar[bool] = True
    name: str = "langid"
    backend: str = "cld2"
    model_path: str | None = None      # fastText model (e.g. lid.176.bin) for backend = "fasttext"
    languages: list[str] | None = None
    min_score: float = 0.0             # FineWeb/datatrove use 0.65 with fastText
    max_chars: int = 10_000            # a page's head decides its language; keeps long pages cheap

    def __post_init__(self) -> None:
        if self.backend not in ("cld2", "py3langid", "fasttext"):
            raise ValueError(f"langid: unknown backend {self.backend!r}; use cld2, py3langid or fasttext")
        if self.backend == "fasttext" and not self.model_path:
            raise ValueError("langid: backend 'fasttext' needs model_path (e.g. a local lid.176.bin); "
                             "herd does not download models")
        self._model: Any = None

    def _load(self) -> Any:
        if self.backend == "py3langid":
            import py3langid.langid as L

            return L.LanguageIdentifier.from_modelpath(L.MODEL_DIR / L.MODEL_FILE, norm_probs=True)
        if self.backend == "fasttext":
            import fasttext

            path = Path(self.model_path).expanduser()  # type: ignore[arg-type]
            if not path.is_file():
                raise FileNotFoundError(f"langid: fastText model {path} not found")
            return fasttext.load_model(str(path))
        import pycld2

        return pycld2

    def predict(self, text: str) -> tuple[str, float]:
        """(language code, score) of the text; ("un", 0.0) when the backend cannot tell."""
        if self._model is None:
            self._model = self._load()
        text = text[: self.max_chars]
        if self.backend == "cld2":
            try:
                reliable, _, details = self._model.detect(_CONTROL.sub(" ", text))
            except self._model.error:
                return "un", 0.0
            name, code, percent, _ = details[0]
            return (code if code != "un" else "un"), (percent / 100.0 if reliable else 0.0)
        if self.backend == "py3langid":
            code, prob = self._model.classify(text)
            return code, float(prob)
        labels, probs = self._model.predict(text.replace("\n", " "), k=1)
        return labels[0].removeprefix("__label__"), float(probs[0])

    def __call__(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        keep = set(self.languages) if self.languages else None
        for doc in docs:
            if self._bypass(doc, stats):
                yield doc
                continue
            stats.docs_in += 1
            stats.chars_in += len(doc.text)
            lang, score = self.predict(doc.text)
            doc.metadata["language"], doc.metadata["language_score"] = lang, round(score, 4)
            stats.counters[f"lang_{lang}"] += 1
            if keep is not None and lang not in keep:
                stats.drop("language_not_kept")
                continue
            if score < self.min_score:
                stats.drop("language_low_score")
                continue
            stats.docs_out += 1
            stats.chars_out += len(doc.text)
            yield doc


STEPS = (LangId,)
