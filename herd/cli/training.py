"""`herd train`, `plan`, `demo` and the post-training stages (`sft`, `rm`, `rs`, `dpo`, `distill`, `prune`,
`vision-adapter`)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from herd.cli.common import list_config_keys, print_config


def cmd_train(opts) -> None:
    from herd.parallel.launch import is_rank0, pop_max_restarts, pop_nproc
    from herd.train import Trainer, load_config
    from herd.train.elastic import account_for, restarts_for, supervise, under_torchrun
    from herd.train.faultinject import hooks_from_env
    from herd.train.goodput import process_start_time

    since = process_start_time()
    nproc, overrides = pop_nproc(opts.overrides)
    max_restarts, overrides = pop_max_restarts(overrides)
    if print_config(overrides, lambda rest: load_config(opts.config, rest)):
        return
    cfg = load_config(opts.config, overrides)  # a config error stops here, before any process starts
    restarts = restarts_for(nproc, max_restarts)
    if nproc > 1 or restarts > 0:
        # The same command under torchrun's elastic agent: one code path for both spellings, and a
        # failed process brings the group back from the last checkpoint up to `restarts` times.
        run = supervise(opts.config, overrides, out_dir=cfg.job.out_dir, nproc=nproc, max_restarts=restarts,
                        since=since)
        print(run.account.line(), "->", run.summary)
        if run.stopped:
            print(f"herd train: stopped for good: {run.stopped}", file=sys.stderr, flush=True)
        if run.returncode:
            raise SystemExit(run.returncode)
        return
    from herd.train.anomaly import AnomalyStop
    from herd.train.checkpoint import CheckpointVerifyError
    from herd.train.sdc import SDC_EXIT_CODE, SilentDataCorruption, record_event, write_stop

    try:
        result = Trainer(cfg, step_hooks=hooks_from_env()).fit()
    except (SilentDataCorruption, CheckpointVerifyError) as e:  # hardware, not usage: no traceback, own code
        if is_rank0():  # every rank raised the same message
            print(f"herd train: {e}", file=sys.stderr, flush=True)
            persistent = record_event(cfg.job.out_dir, e) if isinstance(e, SilentDataCorruption) else None
            if persistent:  # the same step and ranks again after a restart: no more restarts
                write_stop(cfg.job.out_dir, persistent)
                print(f"herd train: stopped for good: {persistent}", file=sys.stderr, flush=True)
        raise SystemExit(SDC_EXIT_CODE) from None
    except AnomalyStop as e:  # the run cannot recover by itself: a clear end, the message says what to do
        if is_rank0():  # every rank raised the same message
            print(f"herd train: stopped: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if not is_rank0():
        return
    for s in result.stages:
        line = f"{s.name}: {s.steps} steps, {s.tokens:,} tokens in {s.seconds:.1f} s -> {s.checkpoint}"
        if s.val_loss is not None:
            line += f" (val loss {s.val_loss:.4f})"
        if s.averaged:
            line += f"; averaged model {s.averaged}"
        print(line)
    if result.anomalies:
        print("anomalies: " + ", ".join(f"{n} {kind}" for kind, n in sorted(result.anomalies.items()))
              + " (records in metrics.jsonl)")
    print(f"done: {result.steps} steps, {result.tokens_seen:,} tokens"
          + (f"; loss plot {result.loss_plot}" if result.loss_plot else ""))
    if not under_torchrun():  # a worker's supervisor accounts for the whole job, restarts included
        run = account_for(cfg.job.out_dir, since=since)
        print(run.account.line(), "->", run.summary)


def cmd_plan(opts) -> None:
    from herd.model import ModelArgs
    from herd.parallel.mfu import estimate_mfu, format_estimate, format_paper_table, paper_comparison
    from herd.parallel.plan import Layout, format_plan, parse_count, plan

    assumptions = _assumptions(opts)
    if opts.paper:
        set_flags = [f"--{name.replace('_', '-')}" for name, default in _PLAN_LAYOUT_DEFAULTS.items()
                     if getattr(opts, name) != default]
        if set_flags:
            raise ValueError(f"--paper plans the paper's own Table 4 layouts; leave out {', '.join(set_flags)} "
                             "(the assumption flags, such as --peak-tflops or --net-gbs, still apply)")
        rows = paper_comparison(assumptions)
        if opts.json:
            print(json.dumps([{"paper": asdict(row), "layout": asdict(layout), "estimate": e.to_dict()}
                              for row, layout, e in rows], indent=2))
            return
        print(format_paper_table(rows))
        return
    if opts.model is None:
        raise ValueError("herd plan needs --model (e.g. --model llama3.1-405b), or --paper for the paper's layouts")
    if opts.inference:
        given = [f"--{n.replace('_', '-')}" for n in _ASSUMPTION_FLAGS if getattr(opts, n) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} shape the training MFU estimate; a serving plan (--inference) "
                             "has none, leave them out")
        _plan_inference(opts)
        return
    missing = [f for f, v in (("--gpus", opts.gpus), ("--seq", opts.seq), ("--gbs-tokens", opts.gbs_tokens)) if v is None]
    if missing:
        raise ValueError(f"a training plan needs {', '.join(missing)}; or pass --inference for a serving plan")
    if opts.mfu is not None and not 0 < opts.mfu <= 1:
        raise ValueError(f"--mfu is a fraction in (0, 1], got {opts.mfu}; e.g. --mfu 0.4")
    layout = Layout(gpus=opts.gpus, tp=opts.tp, cp=opts.cp, pp=opts.pp, seq_len=opts.seq,
                    global_batch_tokens=parse_count(opts.gbs_tokens), micro_batch=opts.micro_batch, ac=opts.ac,
                    pp_schedule=opts.pp_schedule, pp_stages_per_rank=opts.pp_stages_per_rank,
                    loss_chunks=opts.loss_chunks)
    args = ModelArgs.from_name(opts.model)
    p = plan(args, layout, model=opts.model)
    estimate = estimate_mfu(args, layout, assumptions)
    if opts.json:
        print(json.dumps(p.to_dict() | {"mfu_estimate": estimate.to_dict()}, indent=2))
        return
    print(format_plan(p, mfu=opts.mfu, peak_flops=assumptions.peak_tflops * 1e12, gpu_memory_gib=opts.gpu_memory_gib))
    print(format_estimate(estimate))


def _assumptions(opts):
    from herd.parallel.mfu import Assumptions

    return Assumptions(**{n: getattr(opts, n) for n in _ASSUMPTION_FLAGS if getattr(opts, n) is not None})


def _plan_inference(opts) -> None:
    from herd.model import ModelArgs
    from herd.parallel.inference_plan import InferenceLayout, format_inference_plan, inference_plan

    if opts.cp != 1:
        raise ValueError("--cp is a training layout; an inference plan has --tp and --pp")
    if opts.gpus is not None and opts.gpus != opts.tp * opts.pp:
        raise ValueError(f"--gpus {opts.gpus} != tp {opts.tp} x pp {opts.pp}: one inference replica uses exactly "
                         "tp x pp GPUs (leave --gpus out)")
    layout = InferenceLayout(tp=opts.tp, pp=opts.pp, context=opts.context, batch=opts.batch, weights=opts.weights,
                             kv=opts.kv)
    p = inference_plan(ModelArgs.from_name(opts.model), layout, model=opts.model)
    if opts.json:
        print(json.dumps(p.to_dict(), indent=2))
        return
    print(format_inference_plan(p, gpu_memory_gib=opts.gpu_memory_gib))


def cmd_demo(opts) -> None:
    from herd.demo import run_demo

    run_demo(out_dir=Path(opts.out), quick=opts.quick)


def cmd_vision_adapter(opts) -> None:
    from herd.posttrain.vision_adapter import AdapterConfig, run_adapter_training

    cfg = AdapterConfig(seed=opts.seed)
    for flag, value in (("caption_steps", opts.caption_steps), ("qa_steps", opts.qa_steps),
                        ("train_pictures", opts.train_pictures), ("eval_pictures", opts.eval_pictures)):
        if value is not None and value < (0 if flag.endswith("steps") else 1):
            raise ValueError(f"--{flag.replace('_', '-')} must be >= {0 if flag.endswith('steps') else 1}, got {value}")
    if opts.caption_steps is not None:
        cfg.caption.steps = opts.caption_steps
    if opts.qa_steps is not None:
        cfg.qa.steps = opts.qa_steps
    cfg.train_pictures = opts.train_pictures or cfg.train_pictures
    cfg.eval_pictures = opts.eval_pictures or cfg.eval_pictures
    run_adapter_training(opts.text_model, opts.out, cfg, overwrite=opts.overwrite,
                         log=lambda m: print(m, flush=True))


def _vision_adapter_args(p):
    # Defaults live in herd.posttrain.vision_adapter.AdapterConfig (not imported here: `herd --help` stays torch-free).
    p.add_argument("--text-model", required=True, help="a trained herd text checkpoint directory (with its tokenizer)")
    p.add_argument("--out", required=True, help="output directory: model/ (Llama 3.2 Vision HF checkpoint) + report.json")
    p.add_argument("--caption-steps", type=int, help="stage 1 steps on captions (default 300)")
    p.add_argument("--qa-steps", type=int, help="stage 2 steps on question/answer pairs, the captions mixed in (default 200)")
    p.add_argument("--train-pictures", type=int, help="drawn training pictures (default 512)")
    p.add_argument("--eval-pictures", type=int, help="drawn held-out pictures (default 48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _posttrain(opts, config_cls: str, run: str):
    import importlib

    from herd.posttrain import config as pt_config

    cls = getattr(pt_config, config_cls)
    if print_config(opts.overrides, lambda rest: pt_config.load_config(cls, opts.config, rest)):
        return None
    cfg = pt_config.load_config(cls, opts.config, opts.overrides)
    module, _, fn = run.rpartition(".")
    return getattr(importlib.import_module(f"herd.posttrain.{module}"), fn)(cfg)


def _print_report(report: dict) -> None:
    for key, value in report.items():
        print(f"{key:>28}  {value:.4f}" if isinstance(value, float) else f"{key:>28}  {value}")


def cmd_sft(opts) -> None:
    result = _posttrain(opts, "SFTConfig", "sft.run_sft")
    if result is None:  # --print-config
        return
    _print_report({"steps": result.fit.steps, "final loss": result.fit.losses[-1], "val loss": result.val_loss,
                   "tokens/s": result.fit.tokens_per_s, "train dialogs": result.train_examples,
                   "packed rows": result.packed_rows, "output": result.output})


def _report_command(config_cls: str, run: str):
    """A stage whose result is already a flat report dict: run it and print the dict."""
    def command(opts) -> None:
        report = _posttrain(opts, config_cls, run)
        if report is not None:  # None: --print-config
            _print_report(report)
    return command


# ---- arguments -----------------------------------------------------------------------------------


def _train_args(p):
    p.add_argument("config", help="run config TOML (see configs/debug.toml)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--section.key VALUE",
                   help="override config values, e.g. --optim.lr 3e-4 --stages.pretrain.steps 200; "
                   "--nproc N runs N local processes under torchrun (with --parallel.tp 2 ...); "
                   "--max-restarts K restarts the job from its last checkpoint after a process fails, up to K "
                   "times (default 3 with --nproc > 1, none for one process; K > 0 runs one process under "
                   "torchrun's agent too); "
                   "--print-config prints the resolved config and exits")

    def config_class():
        from herd.train.config import Config

        return Config

    list_config_keys(p, config_class)


# Flags --paper does not use (it brings its own layouts and shows no memory): any of these
# changed is an error there rather than silently ignored.
_PLAN_LAYOUT_DEFAULTS = {"model": None, "gpus": None, "tp": 1, "cp": 1, "pp": 1, "seq": None, "gbs_tokens": None,
                         "micro_batch": 1, "pp_schedule": "1F1B", "pp_stages_per_rank": 0, "ac": "none",
                         "loss_chunks": 1, "mfu": None, "gpu_memory_gib": 74.5, "inference": False,
                         "context": 8192, "batch": 1, "weights": "bf16", "kv": "bf16"}
_ASSUMPTION_FLAGS = ("peak_tflops", "gemm_efficiency", "attention_efficiency", "hbm_tbs", "nvlink_gbs", "net_gbs",
                     "link_efficiency", "gpus_per_node", "tp_overlap")


def _plan_args(p):
    d = _PLAN_LAYOUT_DEFAULTS
    p.add_argument("--model", help="model preset, e.g. llama3.1-405b (needed, except with --paper)")
    p.add_argument("--gpus", type=int, help="GPUs in all; data parallel is what tp x cp x pp leaves (training)")
    p.add_argument("--tp", type=int, default=d["tp"], help="tensor-parallel degree")
    p.add_argument("--cp", type=int, default=d["cp"], help="context-parallel degree")
    p.add_argument("--pp", type=int, default=d["pp"], help="pipeline-parallel degree")
    p.add_argument("--seq", type=int, help="sequence length in tokens (training)")
    p.add_argument("--gbs-tokens", help="global batch in tokens; K/M/G are powers of 1024 (16M) (training)")
    p.add_argument("--micro-batch", type=int, default=d["micro_batch"], help="sequences per pipeline microbatch")
    p.add_argument("--pp-schedule", default=d["pp_schedule"], help="GPipe, 1F1B, Interleaved1F1B, "
                   "InterleavedZeroBubble, ZBVZeroBubble")
    p.add_argument("--pp-stages-per-rank", type=int, default=d["pp_stages_per_rank"],
                   help="virtual stages per pipeline rank for the interleaved schedules (0: the schedule's default)")
    p.add_argument("--ac", default=d["ac"], choices=("none", "selective", "full"),
                   help="activation checkpointing for FLOPs and traffic (memory is shown for all three)")
    p.add_argument("--loss-chunks", type=int, default=d["loss_chunks"],
                   help="train.loss_chunks: the output head in this many slices (logits memory / N)")
    p.add_argument("--mfu", type=float, help="also show the step time at this MFU (the estimate is always shown)")
    p.add_argument("--gpu-memory-gib", type=float, default=d["gpu_memory_gib"], help="usable GPU memory (80 GB H100: 74.5 GiB)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--paper", action="store_true",
                   help="estimate the Llama 3 paper's three Table 4 layouts (405B) beside the MFU it reports")
    # Defaults live in herd.parallel.mfu.Assumptions (imported only when a plan runs: it pulls in
    # torch); the plan prints the values it used.
    est = p.add_argument_group("MFU estimate assumptions (defaults: an H100 SXM cluster like the paper's; "
                               "the plan prints the values it used)")
    for flag, kind, text in (
        ("--peak-tflops", float, "per-GPU peak TFLOP/s (H100 SXM dense bf16: 989)"),
        ("--gemm-efficiency", float, "fraction of the peak GEMMs reach"),
        ("--attention-efficiency", float, "fraction of the peak causal flash attention reaches, forward and backward"),
        ("--hbm-tbs", float, "HBM bandwidth in TB/s, for the memory-bound kernels"),
        ("--nvlink-gbs", float, "NVLink bandwidth inside a node, GB/s per GPU and direction"),
        ("--net-gbs", float, "network bandwidth between nodes, GB/s per GPU and direction (400 Gb/s = 50)"),
        ("--link-efficiency", float, "fraction of the nominal link bandwidth collectives reach"),
        ("--gpus-per-node", int, "GPUs sharing one NVLink domain"),
        ("--tp-overlap", float, "fraction of tensor-parallel traffic hidden behind compute (herd hides none)"),
    ):
        est.add_argument(flag, type=kind, help=text)
    inf = p.add_argument_group("inference (--inference): weights and KV cache per GPU of one tp x pp replica")
    inf.add_argument("--inference", action="store_true", help="size a serving layout instead of a training one")
    inf.add_argument("--context", type=int, default=d["context"], help="tokens of context per sequence in the KV cache")
    inf.add_argument("--batch", type=int, default=d["batch"], help="sequences decoded together")
    inf.add_argument("--weights", default=d["weights"], choices=("bf16", "fp16", "fp8", "fp8-ffn", "int8", "int4"),
                     help="weight format; fp8-ffn is the paper's (FFN of the inner layers in FP8, the rest BF16)")
    inf.add_argument("--kv", default=d["kv"], choices=("bf16", "fp16", "fp8", "fp32"), help="KV cache format")


def _demo_args(p):
    p.add_argument("--out", default="runs/demo", help="where the demo writes its files")
    p.add_argument("--quick", action="store_true",
                   help="every stage at a fraction of its size (about a minute): checks the chain, not the model")


def _posttrain_args(config_cls: str):
    def add(p):
        p.add_argument("config", help="TOML config (see configs/posttrain_*.toml)")
        p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--section.key VALUE",
                       help="override config values, e.g. --optim.lr 1e-4 --lora.rank 8; --print-config prints "
                       "the resolved config and exits")

        def config_class():
            from herd.posttrain import config as pt_config

            return getattr(pt_config, config_cls)

        list_config_keys(p, config_class)
    return add


COMMANDS = {
    "plan": (cmd_plan, "size a parallel training layout (memory per GPU, step FLOPs, traffic, estimated MFU) or, "
             "with --inference, a serving one (weights and KV cache per GPU)", _plan_args),
    "train": (cmd_train, "pretrain from a TOML config: stages, checkpoints, resume", _train_args),
    "sft": (cmd_sft, "supervised finetuning on chat JSONL (assistant tokens only; full, LoRA or QLoRA)",
            _posttrain_args("SFTConfig")),
    "rm": (_report_command("RewardConfig", "reward.run_reward"),
           "train a reward model on preference JSONL (Bradley-Terry, edited > chosen > rejected)",
           _posttrain_args("RewardConfig")),
    "rs": (_report_command("RejectionConfig", "rejection.run_rejection"),
           "rejection sampling: K samples per prompt, keep the reward model's best",
           _posttrain_args("RejectionConfig")),
    "dpo": (_report_command("DPOConfig", "dpo.run_dpo"),
            "DPO on preference JSONL (beta, NLL term, formatting tokens masked)",
            _posttrain_args("DPOConfig")),
    "distill": (_report_command("DistillConfig", "distill.run_distill"),
                "logit distillation from a teacher (forward KL at a temperature + CE)",
                _posttrain_args("DistillConfig")),
    "prune": (_report_command("PruneConfig", "prune.run_prune"),
              "structured width/depth pruning by activation importance, then distillation",
              _posttrain_args("PruneConfig")),
    "vision-adapter": (cmd_vision_adapter, "train a Llama 3.2 Vision adapter on drawn pictures with the text model "
                       "frozen (captions, then QA; accuracy before/after)", _vision_adapter_args),
    "demo": (cmd_demo, "the end-to-end demo on embedded data", _demo_args),
}
