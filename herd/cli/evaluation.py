"""`herd eval perplexity | mc | needle | lm-eval` and `herd scaling fit | sweep`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from herd.cli.common import (
    CHECKPOINT_HELP,
    TOKENIZER_HELP,
    add_checkpoint_args,
    add_device_args,
    float_list,
    int_list,
    load,
)


def cmd_eval_perplexity(opts) -> None:
    from herd.eval.perplexity import compare_schemes, held_out_wiki_text

    if opts.text:
        text, source = Path(opts.text).read_text(encoding="utf-8"), opts.text
    else:
        text, n_docs = held_out_wiki_text(opts.wiki, val_fraction=opts.val_fraction)
        source = f"wikipedia-{opts.wiki}, {n_docs} held-out articles (val_fraction {opts.val_fraction})"
    rows = compare_schemes(opts.path, text, schemes=opts.schemes, seq_len=opts.seq_len, stride=opts.stride,
                           max_tokens=opts.max_tokens, group_size=opts.group_size, tokenizer_path=opts.tokenizer)
    first = rows[0].result
    if opts.json:
        print(json.dumps({"text": source, "seq_len": opts.seq_len, "stride": opts.stride or opts.seq_len,
                          "rows": [{"scheme": r.scheme, **dataclasses.asdict(r.result),
                                    "delta_perplexity": r.delta_perplexity} for r in rows]}))
        return
    print(f"text: {source}; {first.num_tokens:,} tokens scored, {first.num_bytes:,} bytes; "
          f"seq_len {opts.seq_len}, stride {opts.stride or opts.seq_len}")
    print(f"{'scheme':<12}{'perplexity':>12}{'bits/byte':>11}{'change':>10}")
    for r in rows:
        change = "" if r.delta_perplexity is None else f"{100 * r.delta_perplexity:+.2f}%"
        print(f"{r.scheme:<12}{r.result.perplexity:>12.3f}{r.result.bits_per_byte:>11.4f}{change:>10}")


def _report_out(opts, report) -> None:
    print(report.table())
    if opts.out:
        print(f"results written to {report.save(opts.out)}")


def cmd_eval_mc(opts) -> None:
    from herd.eval.multiple_choice import evaluate_mc, load_mc_jsonl
    from herd.eval.results import EvalReport

    lm = load(opts)
    pool = load_mc_jsonl(opts.shots_file) if opts.shots_file else None
    tasks = []
    for path in opts.task:
        examples = load_mc_jsonl(path)[: opts.limit]
        res = evaluate_mc(lm.model, lm.tokenizer, examples, task=Path(path).stem, num_shots=opts.shots,
                          shots_pool=pool, seed=opts.seed, batch_size=opts.batch_size)
        tasks.append(res.to_task_result())
    _report_out(opts, EvalReport(model=str(opts.path), tasks=tasks))


def cmd_eval_needle(opts) -> None:
    from herd.eval.needle import evaluate_needle, plot_needle_heatmap
    from herd.eval.results import EvalReport

    lm = load(opts)
    res = evaluate_needle(lm.model, lm.tokenizer, lengths=opts.lengths, depths=opts.depths, trials=opts.trials,
                          method=opts.method, filler=opts.filler, seed=opts.seed, batch_size=opts.batch_size)
    print(f"needle retrieval accuracy ({opts.method}, {opts.trials} trials per cell, filler {opts.filler}):")
    print(res.table())
    print(f"mean accuracy {res.mean_accuracy:.3f}")
    if opts.heatmap:
        print(f"heatmap written to {plot_needle_heatmap(res, opts.heatmap)}")
    if opts.out:
        print(f"results written to {EvalReport(model=str(opts.path), tasks=[res.to_task_result()]).save(opts.out)}")


def cmd_eval_lm_eval(opts) -> None:
    from herd.eval.lm_eval_adapter import run_lm_eval
    from herd.eval.results import EvalReport

    lm = load(opts)
    tasks = run_lm_eval(lm.model, lm.tokenizer, opts.tasks.split(","), num_fewshot=opts.num_fewshot,
                        limit=opts.limit, batch_size=opts.batch_size, include_path=opts.include_path)
    _report_out(opts, EvalReport(model=str(opts.path), tasks=tasks))


def cmd_scaling_fit(opts) -> None:
    from herd.eval.results import atomic_write_text
    from herd.eval.scaling import fit_scaling, load_points, plot_isoflops, plot_two_step

    fit = fit_scaling(load_points(opts.points), chance=opts.chance)
    print(fit.table())
    print(fit.summary())
    pred = fit.predict(opts.predict) if opts.predict else None
    if pred is not None:
        line = f"prediction at C = {pred.budget:.3g}: N* = {pred.n_opt:,.0f} params on {pred.tokens:,.0f} tokens"
        if pred.loss is not None:
            line += f", loss {pred.loss:.4f}"
        if pred.task_acc is not None:
            line += f", task NLL {pred.task_nll:.4f}, accuracy {pred.task_acc:.3f}"
        print(line)
    if opts.plot_dir:
        print(f"plot written to {plot_isoflops(fit, Path(opts.plot_dir) / 'isoflops.png', predict=pred)}")
        if fit.acc_vs_nll is not None:
            print(f"plot written to {plot_two_step(fit, Path(opts.plot_dir) / 'two_step.png', predict=pred)}")
    if opts.out:
        data = {**fit.to_dict(), "prediction": None if pred is None else dataclasses.asdict(pred)}
        print(f"fit written to {atomic_write_text(opts.out, json.dumps(data, indent=2) + chr(10))}")


def cmd_scaling_sweep(opts) -> None:
    from herd.eval.scaling import (
        SweepTraining,
        model_ladder,
        plan_isoflop_sweep,
        run_scaling_sweep,
        trainer_train_fn,
    )

    settings = SweepTraining(train=tuple(opts.train), val=tuple(opts.val), tokenizer=opts.tokenizer or "",
                             seq_len=opts.seq_len, batch_tokens=opts.batch_tokens, lr=opts.lr, device=opts.device,
                             task=opts.task)
    if opts.aspect_ratio < 1:
        raise ValueError(f"--aspect-ratio must be >= 1, got {opts.aspect_ratio}")
    ladder = model_ladder(vocab_size=opts.vocab_size, max_seq_len=opts.seq_len, depths=opts.depths,
                          aspect_ratio=opts.aspect_ratio)
    plan = plan_isoflop_sweep(opts.budgets, ladder, points_per_budget=opts.points_per_budget)
    print(f"{len(plan)} runs over {len({r.budget for r in plan})} budgets -> {opts.out}/points.jsonl", flush=True)
    outcome = run_scaling_sweep(
        plan, ladder, trainer_train_fn(settings, log=lambda msg: None), out_dir=opts.out, chance=opts.chance,
        held_out_budget=opts.held_out,
        on_point=lambda p: print(f"  {p.name}: N {p.n_params:,}, {p.tokens:,} tokens, val loss {p.loss:.4f}",
                                 flush=True))
    print(outcome.fit.table())
    print(outcome.fit.summary())
    if outcome.held_out is not None:
        h = outcome.held_out
        print(f"held-out C = {h.prediction.budget:.3g}: predicted N* {h.prediction.n_opt:,.0f}, loss "
              f"{h.prediction.loss:.4f}; trained {h.run.name} (N {h.measured.n_params:,}): loss "
              f"{h.measured.loss:.4f}, error {h.loss_error:+.4f}")
    print(f"plot written to {outcome.plot}; fit written to {outcome.fit_json}")


# ---- arguments -----------------------------------------------------------------------------------


def _eval_perplexity_args(p):
    p.add_argument("path", help=CHECKPOINT_HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", metavar="FILE", help="UTF-8 text file to score")
    src.add_argument("--wiki", choices=("en", "fr", "es"), help="held-out Wikipedia lead paragraphs (embedded)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="the document split's held-out share")
    p.add_argument("--schemes", nargs="*", default=[], choices=("int8", "int4", "fp8"),
                   help="also score the model quantized with each scheme and report the change")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size for --schemes")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens")
    p.add_argument("--stride", type=int, help="window step (default: seq-len, disjoint windows)")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens of the text")
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _eval_model_args(p):
    add_checkpoint_args(p, context_help="set the context (RoPE table) to this many tokens")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass")
    p.add_argument("--out", help="write the results as JSON here")


def _eval_mc_args(p):
    _eval_model_args(p)
    p.add_argument("--task", action="append", required=True,
                   help='JSONL file, one {"question", "choices", "answer"} per line; repeat for several tasks')
    p.add_argument("--shots", type=int, default=0, help="few-shot examples before each question")
    p.add_argument("--shots-file", help="draw shots from this JSONL (default: the task itself, never the same example)")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples of each task")
    p.add_argument("--seed", type=int, default=0, help="which shots are drawn")


def _eval_needle_args(p):
    _eval_model_args(p)
    p.add_argument("--lengths", type=int_list, default="256,512,1024", help="context lengths in tokens, comma-separated")
    p.add_argument("--depths", type=float_list, default="0,0.25,0.5,0.75,1",
                   help="needle depths in [0, 1], comma-separated")
    p.add_argument("--trials", type=int, default=4, help="keys (and haystack windows) per cell")
    p.add_argument("--method", choices=("loglik", "generate"), default="loglik",
                   help="loglik: answer tokens are all argmax (one forward); generate: greedy decoding")
    p.add_argument("--filler", default="passkey", help="passkey, wikipedia, or a UTF-8 text file")
    p.add_argument("--heatmap", help="write the accuracy heatmap PNG here")
    p.add_argument("--seed", type=int, default=0, help="which keys and haystack windows are drawn")


def _eval_lm_eval_args(p):
    _eval_model_args(p)
    p.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated (the data must be available)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--limit", type=int, help="examples per task")
    p.add_argument("--include-path", help="a folder of your own lm-eval task YAMLs")


def _scaling_fit_args(p):
    p.add_argument("points", help="sweep results JSONL: name, budget, n_params, loss[, task_nll, task_acc] per line")
    p.add_argument("--predict", type=float, help="predict N*, tokens, loss (and task accuracy) at this budget")
    p.add_argument("--chance", type=float, help="task accuracy of random guessing (pins the sigmoid's floor)")
    p.add_argument("--plot-dir", help="write isoflops.png (and two_step.png) here")
    p.add_argument("--out", help="write the fitted constants and the prediction as JSON here")


def _scaling_sweep_args(p):
    p.add_argument("--train", action="append", required=True, help="token-shard directory to train on (repeatable)")
    p.add_argument("--val", action="append", required=True, help="held-out token-shard directory (repeatable)")
    p.add_argument("--tokenizer", help="the shards' tokenizer.model (needed with --task)")
    p.add_argument("--vocab-size", type=int, required=True, help="the shards' vocabulary size")
    p.add_argument("--budgets", type=float_list, required=True,
                   help="compute budgets in FLOPs, comma-separated, e.g. 1e12,3e12,1e13")
    p.add_argument("--depths", type=int_list, default="1,2,3,4,5,6,7,8",
                   help="model depths of the size ladder (width = aspect x depth)")
    p.add_argument("--aspect-ratio", type=int, default=32,
                   help="width per layer of the size rule (rounded to whole 16-wide heads); smaller reaches smaller N")
    p.add_argument("--points-per-budget", type=int, default=5, help="model sizes trained per budget")
    p.add_argument("--seq-len", type=int, default=128, help="training sequence length in tokens")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per optimizer step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of every run")
    add_device_args(p, dtype=False)
    p.add_argument("--task", help="multiple-choice JSONL scored after each run (two-step method)")
    p.add_argument("--chance", type=float, help="the task's chance accuracy")
    p.add_argument("--held-out", type=float, help="then predict this larger budget, train it, and report the error")
    p.add_argument("--out", required=True, help="sweep directory: points.jsonl (resumable), runs, isoflops.png")


COMMANDS = {
    "eval perplexity": (cmd_eval_perplexity, "perplexity and bits/byte on a text, per quantization scheme",
                        _eval_perplexity_args),
    "eval mc": (cmd_eval_mc, "multiple-choice accuracy (acc, acc_norm) on JSONL tasks", _eval_mc_args),
    "eval needle": (cmd_eval_needle, "needle-in-a-haystack accuracy by context length and depth", _eval_needle_args),
    "eval lm-eval": (cmd_eval_lm_eval, "run EleutherAI lm-eval tasks on a herd model", _eval_lm_eval_args),
    "scaling fit": (cmd_scaling_fit, "fit IsoFLOP minima, N*(C), the loss floor and the two-step method",
                    _scaling_fit_args),
    "scaling sweep": (cmd_scaling_sweep, "train an IsoFLOP sweep of small models, fit it, check a held-out budget",
                      _scaling_sweep_args),
}
