"""An `lm_eval` (EleutherAI's evaluation harness) model over a herd model and tokenizer.

lm-eval is optional (`pip install 'herd[lm-eval]'`) and heavy, so it is imported only when an
adapter is built. The request handling lives in `HerdRequests`, which needs nothing from lm-eval:
it reads only `request.args`, the one attribute lm-eval's `Instance` exposes to models. The
`lm_eval.api.model.LM` subclass is then a two-line mix-in made on first use. This keeps the logic
testable without lm-eval installed and the same whether or not it is.

Conventions follow lm-eval's reference HF model so scores are comparable:
* loglikelihood: context encoded with BOS, continuation without; whitespace at the end of the
  context is moved to the start of the continuation (a trailing space would otherwise become
  its own token, which models rarely see); an empty context is just BOS.
* loglikelihood_rolling: BOS-prefixed windows of the model's context length, each token
  predicted once (`herd.eval.scoring.rolling_windows`).
* generate_until: greedy; stops at EOS, at `max_gen_toks`, or at the first `until` string, which is
  cut off the returned text. Sampling settings other than greedy are refused, not ignored.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

from herd.eval.results import TaskResult
from herd.eval.scoring import rolling_loglikelihood, score_continuations
from herd.model.llama import Transformer


class AdapterTokenizer(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HerdRequests:
    """lm-eval's three request types answered by a herd model; each request needs only `.args`."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: AdapterTokenizer,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        max_gen_toks: int = 256,
    ):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = batch_size
        self.max_length = model.args.max_seq_len if max_length is None else max_length
        if not 1 <= self.max_length <= model.args.max_seq_len:
            raise ValueError(f"max_length must be in 1..{model.args.max_seq_len}, got {self.max_length}")
        self.max_gen_toks = max_gen_toks

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        ctx = self.tokenizer.encode(stripped, bos=True, eos=False)
        return ctx, self.tokenizer.encode(continuation, bos=False, eos=False)

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*r.args) for r in requests]
        scores = score_continuations(self.model, pairs, batch_size=self.batch_size, max_len=self.max_length)
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        docs = [self.tokenizer.encode(r.args[0], bos=False, eos=False) for r in requests]
        return rolling_loglikelihood(self.model, docs, prefix_token=self.tokenizer.bos_id,
                                     batch_size=self.batch_size, max_len=self.max_length)

    def _gen_settings(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], int]:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", [])
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = kwargs.pop("do_sample", False)
        temperature = kwargs.pop("temperature", 0.0)
        if do_sample or temperature:
            raise ValueError(f"only greedy generation is supported (got do_sample={do_sample}, temperature={temperature})")
        if kwargs:
            raise ValueError(f"unsupported generation arguments {sorted(kwargs)}; supported: until, max_gen_toks")
        return until, max_new

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        from herd.generate import GREEDY, generate

        out = []
        for r in requests:  # one at a time: `until` strings differ per request and are cheap to check
            context, gen_kwargs = r.args
            until, max_new = self._gen_settings(gen_kwargs)
            max_new = min(max_new, self.max_length - 1)
            prompt = self.tokenizer.encode(context, bos=True, eos=False)[-(self.max_length - max_new):]
            [res] = generate(self.model, [prompt], max_new_tokens=max_new, sampling=GREEDY,
                             stop_tokens=(self.tokenizer.eos_id,))
            text = self.tokenizer.decode(res.tokens)
            cuts = [text.index(s) for s in until if s and s in text]
            out.append(text[: min(cuts)] if cuts else text)
        return out


@functools.cache
def lm_eval_class() -> type:
    """The `lm_eval.api.model.LM` subclass (made once, on first use, so lm-eval stays optional)."""
    try:
        from lm_eval.api.model import LM
    except ImportError as e:
        raise ImportError(f"the lm-eval adapter needs EleutherAI's harness: pip install 'herd[lm-eval]' ({e})") from None

    class HerdLM(HerdRequests, LM):
        def __init__(self, model: Transformer, tokenizer: AdapterTokenizer, **kwargs: Any):
            LM.__init__(self)
            HerdRequests.__init__(self, model, tokenizer, **kwargs)

    return HerdLM


def herd_lm(model: Transformer, tokenizer: AdapterTokenizer, **kwargs: Any) -> Any:
    """An lm-eval model for `lm_eval.simple_evaluate(model=herd_lm(...), tasks=[...])`."""
    return lm_eval_class()(model, tokenizer, **kwargs)


def run_lm_eval(
    model: Transformer,
    tokenizer: AdapterTokenizer,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    include_path: str | None = None,
) -> list[TaskResult]:
    """Run lm-eval tasks; one `TaskResult` per task with lm-eval's numeric metrics under its names.

    include_path: a folder of task YAMLs of your own (lm-eval's TaskManager include_path), for
    tasks whose data is local.
    """
    lm = herd_lm(model, tokenizer, batch_size=batch_size)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                          log_samples=False)
    if out is None:
        raise ValueError("lm-eval returned no results (is this a non-zero distributed rank?)")
    counts = out.get("n-samples", {})
    return [
        TaskResult(task=task, num_examples=int(counts.get(task, {}).get("effective", 0)),
                   metrics={k: float(v) for k, v in metrics.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)},
                   config={"harness": "lm-eval", "num_fewshot": num_fewshot, "limit": limit})
        for task, metrics in out["results"].items()
    ]
