"""The long-context stage of the demo: what a context-extension stage bought and what it cost.

The paper (section 3.4.2) calls an extension stage successful when short-context quality is
recovered and needle-in-a-haystack retrieval works at the new length. This stage measures
exactly those two things on the model before and after extension: needle accuracy by context
length and depth (one figure, two heatmaps) and validation loss at the short length.

Design trade-off: this function evaluates; it does not train. The two models come from the
trainer's stage checkpoints (pretrain, then a stage with a longer `max_seq_len` and a new RoPE
base), so the demo shows the trainer's real extension stage rather than a second, demo-only
one. Both models must be loaded with a RoPE table long enough for the longest needle prompt
(`load_model(path, max_seq_len=...)`): the table is a pure function of the arguments, so that
measures the pretrained model at positions it never trained on, which is the point.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from herd.eval.needle import (
    Method,
    NeedleResult,
    NeedleTemplate,
    NeedleTokenizer,
    evaluate_needle,
    plot_needle_heatmaps,
)
from herd.eval.results import EvalReport, TaskResult, format_table
from herd.model.llama import Transformer


@dataclass
class LongContextDemoResult:
    short_len: int
    needle_before: NeedleResult
    needle_after: NeedleResult
    val_loss_before: float  # mean NLL per token (nats) at short_len
    val_loss_after: float
    heatmap: Path
    report: Path

    def table(self) -> str:
        rows = [("val loss @ " + f"{self.short_len:,}", f"{self.val_loss_before:.4f}", f"{self.val_loss_after:.4f}")]
        for n in self.needle_before.lengths:
            rows.append((f"needle acc @ {n:,}", f"{self.needle_before.accuracy_at_length(n):.2f}",
                         f"{self.needle_after.accuracy_at_length(n):.2f}"))
        return format_table(("", "before", "after"), rows)


def short_context_loss(model: Transformer, val_tokens: Sequence[int], *, seq_len: int) -> float:
    """Mean NLL per token over `val_tokens`, windows of `seq_len` tokens (herd.eval.perplexity)."""
    from herd.eval.perplexity import perplexity

    # Disjoint windows, as the trainer's validation loss reads its rows.
    return perplexity(model, list(val_tokens), seq_len=seq_len, stride=seq_len).nll


def run_long_context_demo(
    before: Transformer,
    after: Transformer,
    tokenizer: NeedleTokenizer,
    *,
    out_dir: str | os.PathLike[str],
    val_tokens: Sequence[int],
    short_len: int,
    lengths: Sequence[int],
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 4,
    method: Method = "loglik",
    filler: str | os.PathLike[str] = "passkey",
    template: NeedleTemplate = NeedleTemplate(),
    batch_size: int = 4,
    echo: Callable[[str], None] = print,
) -> LongContextDemoResult:
    """Needle accuracy at `lengths` and validation loss at `short_len`, before and after extension.

    Writes `needle.png` (both heatmaps) and `long_context.json` (an `EvalReport`) under `out_dir`.
    """
    out = Path(out_dir)
    runs = {}
    for label, model in (("before", before), ("after", after)):
        needle = evaluate_needle(model, tokenizer, lengths=lengths, depths=depths, trials=trials, method=method,
                                 filler=filler, template=template, batch_size=batch_size)
        loss = short_context_loss(model, val_tokens, seq_len=short_len)
        runs[label] = (needle, loss)
        echo(f"{label} extension: needle accuracy {needle.mean_accuracy:.2f}, val loss @ {short_len} {loss:.4f}")
    (nb, lb), (na, la) = runs["before"], runs["after"]
    heatmap = plot_needle_heatmaps({f"before extension (mean {nb.mean_accuracy:.2f})": nb,
                                    f"after extension (mean {na.mean_accuracy:.2f})": na}, out / "needle.png")
    tasks = []
    for label, (needle, loss) in runs.items():
        tasks.append(needle.to_task_result(f"needle/{label}"))
        tasks.append(TaskResult(task=f"val_loss/{label}", metrics={"nll": loss}, num_examples=len(val_tokens),
                                config={"seq_len": short_len}))
    report = EvalReport(model="long-context demo", tasks=tasks,
                        extra={"context_lengths": list(lengths), "short_len": short_len}).save(out / "long_context.json")
    result = LongContextDemoResult(short_len=short_len, needle_before=nb, needle_after=na, val_loss_before=lb,
                                   val_loss_after=la, heatmap=heatmap, report=report)
    echo(result.table())
    return result



