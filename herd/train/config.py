"""Training configuration: one small dataclass per concern, loaded from TOML, overridable from the CLI.

A run is described by a TOML file whose top-level tables are the sections below (`[job]`,
`[model]`, `[data]`, `[train]`, `[optim]`, `[schedule]`, `[checkpoint]`, `[metrics]`, `[sdc]`,
`[watchdog]`, `[anomaly]`) plus a
list of `[[stages]]`. `herd train FILE --optim.lr 3e-4 --stages.anneal.steps 50` overrides
single values; a value is parsed to the declared type of its field.

The loader itself (TOML -> typed dataclasses, overrides, TOML out, the `--help` listing) is
`herd.config`, shared with post-training and the data pipeline; this module holds training's
sections and the cross-field rules between them. The loader's names are re-exported here, so
`from herd.train.config import build, to_toml` keeps working.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from herd import config as _loader
# The shared loader's names stay importable from here, where they lived before herd.config.
from herd.config import build, config_to_dict, parse_overrides, read_toml, set_field, to_toml  # noqa: F401
from herd.model.args import PRESETS, ModelArgs, RopeScaling
from herd.parallel import ParallelConfig


@dataclass
class JobConfig:
    out_dir: str = "runs/train"  # checkpoints, metrics.jsonl, TensorBoard events, loss plot
    seed: int = 0  # model init, data order
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...


@dataclass
class ModelConfig:
    """A named preset (or "" for ModelArgs' defaults) with any field overridden."""

    preset: str = "debug"
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    vocab_size: int | None = None
    multiple_of: int | None = None
    ffn_dim_multiplier: float | None = None
    norm_eps: float | None = None
    rope_theta: float | None = None
    max_seq_len: int | None = None
    tie_embeddings: bool | None = None

    def args(self) -> ModelArgs:
        if self.preset and self.preset not in PRESETS:
            raise ValueError(f"model.preset: unknown preset {self.preset!r}; valid: {', '.join(sorted(PRESETS))} "
                             "(or \"\" for a shape given field by field)")
        base = PRESETS[self.preset] if self.preset else ModelArgs()
        changes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.name != "preset" and getattr(self, f.name) is not None}
        try:
            return base.replace(**changes)
        except ValueError as e:
            raise ValueError(f"[model]: {e}") from None


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # token-shard directories (herd data tokenize)
    weights: list[float] = field(default_factory=list)  # sampling weight per source; [] = loader default
    val: list[str] = field(default_factory=list)  # held-out shard directories for validation loss
    tokenizer: str = ""  # tokenizer.model the shards were made with; copied beside the checkpoints


@dataclass
class TrainConfig:
    """How one optimizer step consumes its batch."""

    micro_batch_tokens: int = 0  # tokens per forward/backward (at least one row); gradients accumulate. 0 = whole batch
    loss_chunks: int = 1  # >1: compute the output head + loss in this many chunks, recomputed in backward
    document_mask: bool = True  # attention never crosses a document boundary inside a packed row


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matmul weights only (not norms, not embeddings)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping


@dataclass
class ScheduleConfig:
    warmup_steps: int = 0  # linear from lr/warmup_steps to lr
    decay_steps: int = 0  # cosine from lr to min_lr over this many steps after warmup; 0 = to the end of the cosine stages
    min_lr: float = 0.0  # the floor the cosine reaches and then holds


@dataclass
class StageConfig:
    """One phase of training; stages run in order, each from the previous one's final checkpoint."""

    name: str = ""
    steps: int = 0
    # Rows (tokens_seen, batch_tokens, seq_len): from `tokens_seen` (counted over the whole run)
    # on, a step takes `batch_tokens` tokens in rows of `seq_len`. The first row must start at 0.
    ramp: list[list[int]] = field(default_factory=list)
    lr: Literal["cosine", "linear_to_zero"] = "cosine"  # linear_to_zero: from the cosine value at the stage start
    train: list[str] = field(default_factory=list)  # data mix for this stage; [] = [data].train
    weights: list[float] = field(default_factory=list)
    max_seq_len: int | None = None  # the model's RoPE table length from this stage on
    rope_theta: float | None = None  # a new RoPE base from this stage on
    rope_scaling_factor: float | None = None  # Llama 3.1 frequency scaling, relative to the previous max_seq_len
    checkpoint_every: int | None = None  # this stage's checkpoint interval; None = checkpoint.every
    average_last: int = 0  # at the end: average the weights of this stage's last N checkpoints into a model


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints; stage ends are always checkpointed
    keep_last: int = 3  # periodic checkpoints kept; each stage's final checkpoint is kept as well
    async_save: bool = False  # periodic checkpoints: copy the state at the step, write it in a background thread


@dataclass
class MetricsConfig:
    log_every: int = 10  # console line every N steps (the progress bar updates every step)
    val_every: int = 0  # validation loss every N steps; 0 = only at stage ends
    val_batches: int = 4
    val_batch_size: int = 8
    val_seq_len: int = 0  # 0 = the sequence length of the first stage's first ramp row
    tensorboard: bool = True
    plot: bool = True  # loss.png beside the checkpoints
    progress: bool = True  # tqdm progress bar


@dataclass
class SDCConfig:
    """Silent-data-corruption checks (herd.train.sdc); each period is in steps, 0 = off."""

    replica_check_every: int = 0  # compare checksums of replicated parameters + optimizer state across ranks
    recompute_every: int = 0  # recompute one micro-batch's gradient twice and compare the two bitwise
    verify_checkpoints: bool = True  # re-read every checkpoint from disk after its write and check its CRC-32s

    def validate(self) -> None:
        for key in ("replica_check_every", "recompute_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"sdc.{key} must be >= 0 (steps between checks; 0 = off), got {getattr(self, key)}")


@dataclass
class WatchdogConfig:
    """Hang and straggler detection (herd.train.watchdog)."""

    collective_timeout_s: float = 0.0  # no progress for this long ends the job with a report; 0 = off
    straggler_every: int = 0  # steps between gathers of every rank's step times to rank 0; 0 = off
    straggler_factor: float = 1.5  # a rank busier than the (low) median times this is named a straggler

    def validate(self) -> None:
        if self.collective_timeout_s < 0:
            raise ValueError(f"watchdog.collective_timeout_s must be >= 0 (0 = off), got {self.collective_timeout_s}")
        if self.straggler_every < 0:
            raise ValueError(f"watchdog.straggler_every must be >= 0 (0 = off), got {self.straggler_every}")
        if not self.straggler_factor > 1:
            raise ValueError(f"watchdog.straggler_factor must be > 1 (e.g. 1.5: 50% slower than the median), "
                             f"got {self.straggler_factor}")


@dataclass
class AnomalyConfig:
    """What a step does when its loss or gradients go wrong (herd.train.anomaly)."""

    enabled: bool = True  # skip the update (every rank agrees) on a non-finite loss or gradient norm or a spike
    spike_threshold: float = 6.0  # robust sigmas (1.4826 x MAD) above the window's median loss; 0 = no spike check
    spike_ratio: float = 1.1  # ... and at least this multiple of the median (a flat curve has a tiny MAD)
    window: int = 50  # good steps the median and MAD are taken over
    warmup: int = 20  # good steps in a stage before the spike check starts (the statistic restarts per stage)
    max_consecutive: int = 3  # this many anomalous steps in a row: roll back to the last checkpoint; 0 = never
    max_rollbacks: int = 3  # rollbacks to the same checkpoint before the run stops with an error
    retry_nonfinite: int = 1  # recompute a non-finite step this many times before skipping it; 0 = skip at once


@dataclass
class Config:
    job: JobConfig = field(default_factory=JobConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    stages: list[StageConfig] = field(default_factory=list)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # herd.parallel: degrees, AC, compile, FP8
    sdc: SDCConfig = field(default_factory=SDCConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)

    def stage_args(self, index: int) -> ModelArgs:
        """Model hyperparameters in force during stage `index` (RoPE changes accumulate)."""
        args = self.model.args()
        for stage in self.stages[: index + 1]:
            changes: dict[str, Any] = {}
            if stage.rope_theta is not None:
                changes["rope_theta"] = stage.rope_theta
            if stage.rope_scaling_factor is not None:
                changes["rope_scaling"] = RopeScaling(factor=stage.rope_scaling_factor,
                                                      original_max_seq_len=args.max_seq_len)
            if stage.max_seq_len is not None:
                changes["max_seq_len"] = stage.max_seq_len
            args = args.replace(**changes)
        return args

    def validate(self) -> Config:
        """Cross-field rules; raises ValueError naming the key. Returns self."""
        if not self.stages:
            raise ValueError("no [[stages]] in the config; add at least one, e.g.\n"
                             "[[stages]]\nname = \"pretrain\"\nsteps = 100\nramp = [[0, 8192, 256]]")
        _positive(self.checkpoint.every, "checkpoint.every")
        _positive(self.checkpoint.keep_last, "checkpoint.keep_last")
        _positive(self.metrics.log_every, "metrics.log_every")
        _positive(self.train.loss_chunks, "train.loss_chunks")
        if self.train.micro_batch_tokens < 0:
            raise ValueError(f"train.micro_batch_tokens must be >= 0 (0 = the whole batch in one forward), got "
                             f"{self.train.micro_batch_tokens}")
        _positive(self.metrics.val_batches, "metrics.val_batches")
        _positive(self.metrics.val_batch_size, "metrics.val_batch_size")
        for key in ("val_every", "val_seq_len"):
            if getattr(self.metrics, key) < 0:
                raise ValueError(f"metrics.{key} must be >= 0 (0 = the default), got {getattr(self.metrics, key)}")
        if self.optim.lr <= 0 or self.schedule.min_lr < 0 or self.schedule.min_lr > self.optim.lr:
            raise ValueError(f"need 0 <= schedule.min_lr <= optim.lr and optim.lr > 0, got min_lr "
                             f"{self.schedule.min_lr} and lr {self.optim.lr}")
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.optim.betas}")
        for key in ("warmup_steps", "decay_steps"):
            if getattr(self.schedule, key) < 0:
                raise ValueError(f"schedule.{key} must be >= 0")
        if not self.data.train and not all(s.train for s in self.stages):
            raise ValueError("data.train is empty: list the token-shard directories to train on, "
                             "e.g. train = [\"runs/demo/shards/train\"]")
        _check_weights(self.data.train, self.data.weights, "data")
        names = [s.name for s in self.stages]
        start = 0
        for i, stage in enumerate(self.stages):
            key = f"stages.{stage.name or i}"
            if not stage.name:
                raise ValueError(f"stages.{i}.name is empty; give every stage a name")
            if names.count(stage.name) > 1:
                raise ValueError(f"{key}: stage names must be unique, got {names}")
            _positive(stage.steps, f"{key}.steps")
            _positive(self.checkpoint_every(i), f"{key}.checkpoint_every")
            _check_weights(stage.train, stage.weights, key)
            args = self.stage_args(i)
            _check_ramp(stage.ramp, key, max_seq_len=args.max_seq_len,
                        micro_batch_tokens=self.train.micro_batch_tokens)
            if stage.average_last < 0 or stage.average_last > self.checkpoint.keep_last + 1:
                raise ValueError(f"{key}.average_last ({stage.average_last}) must be between 0 and "
                                 f"checkpoint.keep_last + 1 ({self.checkpoint.keep_last + 1}), since only those "
                                 "checkpoints are kept")
            every = self.checkpoint_every(i)
            saved = len(range((start // every + 1) * every, start + stage.steps, every)) + 1  # + the final one
            if stage.average_last > saved:
                raise ValueError(f"{key}.average_last is {stage.average_last} but the stage writes only {saved} "
                                 f"checkpoint(s) every {every} steps; set {key}.checkpoint_every lower")
            start += stage.steps
        self.parallel.validate()  # --parallel.* overrides bypass the dataclass's own check
        self.sdc.validate()
        self.watchdog.validate()
        _check_anomaly(self.anomaly)
        val_seq = self.val_seq_len
        if val_seq > self.model.args().max_seq_len:
            raise ValueError(f"metrics.val_seq_len ({val_seq}) exceeds model.max_seq_len")
        return self

    def checkpoint_every(self, index: int) -> int:
        every = self.stages[index].checkpoint_every
        return self.checkpoint.every if every is None else every

    @property
    def val_seq_len(self) -> int:
        return self.metrics.val_seq_len or self.stages[0].ramp[0][2]


def _positive(value: int, key: str) -> None:
    if value <= 0:
        raise ValueError(f"{key} must be a positive integer, got {value}")


def _check_anomaly(a: AnomalyConfig) -> None:
    if a.spike_threshold < 0:
        raise ValueError(f"anomaly.spike_threshold must be >= 0 (0 turns the loss-spike check off), got "
                         f"{a.spike_threshold}")
    if a.spike_ratio < 1:
        raise ValueError(f"anomaly.spike_ratio must be >= 1 (a spike is at least the median loss), got {a.spike_ratio}")
    _positive(a.window, "anomaly.window")
    if a.warmup < 0 or a.max_consecutive < 0:
        raise ValueError(f"anomaly.warmup and anomaly.max_consecutive must be >= 0, got {a.warmup} and "
                         f"{a.max_consecutive}")
    _positive(a.max_rollbacks, "anomaly.max_rollbacks")
    if a.retry_nonfinite < 0:
        raise ValueError(f"anomaly.retry_nonfinite must be >= 0 (recomputations of a non-finite step before it is "
                         f"skipped; 0 = skip at once), got {a.retry_nonfinite}")


def _check_weights(sources: list[str], weights: list[float], key: str) -> None:
    if weights and len(weights) != len(sources):
        raise ValueError(f"{key}.weights has {len(weights)} entries for {len(sources)} sources in {key}.train")
    if any(w < 0 for w in weights) or (weights and sum(weights) <= 0):
        raise ValueError(f"{key}.weights must be non-negative with a positive sum, got {weights}")


def _check_ramp(rows: list[list[int]], key: str, *, max_seq_len: int, micro_batch_tokens: int) -> None:
    if not rows:
        raise ValueError(f"{key}.ramp is empty; give at least one row [tokens_seen, batch_tokens, seq_len], "
                         "e.g. ramp = [[0, 8192, 256]]")
    prev = -1
    for row in rows:
        if len(row) != 3:
            raise ValueError(f"{key}.ramp rows are [tokens_seen, batch_tokens, seq_len], got {row}")
        seen, batch_tokens, seq_len = row
        if prev < 0 and seen != 0:
            raise ValueError(f"{key}.ramp must start with a row [0, batch_tokens, seq_len], got {row}")
        if seen <= prev:
            raise ValueError(f"{key}.ramp: tokens_seen must increase from row to row, got {rows}")
        prev = seen
        if seq_len <= 0 or batch_tokens <= 0 or batch_tokens % seq_len:
            raise ValueError(f"{key}.ramp row {row}: batch_tokens must be a positive multiple of seq_len")
        if seq_len > max_seq_len:
            raise ValueError(f"{key}.ramp row {row}: seq_len {seq_len} exceeds the model's max_seq_len "
                             f"{max_seq_len}; raise model.max_seq_len or set max_seq_len on the stage")
        rows = batch_tokens // seq_len
        if rows % micro_batch_rows(micro_batch_tokens, seq_len, rows):
            raise ValueError(
                f"{key}.ramp row {row}: the batch's {rows} rows of {seq_len} do not split into micro-batches of "
                f"{micro_batch_rows(micro_batch_tokens, seq_len, rows)} rows (train.micro_batch_tokens = "
                f"{micro_batch_tokens}); choose sizes that divide")


def micro_batch_rows(micro_batch_tokens: int, seq_len: int, rows: int) -> int:
    """Rows per forward/backward: as many as fit in micro_batch_tokens, at least one; 0 = the whole batch."""
    if micro_batch_tokens == 0:
        return rows
    return min(max(micro_batch_tokens // seq_len, 1), rows)


# ---- loading -------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML file (or start from the defaults with `path=None`), apply `--section.key value`
    overrides, validate. Every error is a ValueError naming the offending key."""
    cfg = build(Config, read_toml(path))
    for key, value in parse_overrides(overrides):
        apply_override(cfg, key, value)
    return cfg.validate()


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a TOML-shaped dict (tests and the demo build configs in Python)."""
    return build(Config, data).validate()


def apply_override(cfg: Config, key: str, text: str) -> None:
    """Set `section.key` (or `stages.NAME_OR_INDEX.key`) to `text` parsed as the field's type."""
    parts = key.split(".")
    section = parts[0]
    if section == "stages":
        if len(parts) != 3:
            raise ValueError(f"--{key}: stage overrides look like --stages.NAME.key (or --stages.0.key)")
        names = [s.name for s in cfg.stages]
        if parts[1] in names:
            target = cfg.stages[names.index(parts[1])]
        elif parts[1].isdigit() and int(parts[1]) < len(cfg.stages):
            target = cfg.stages[int(parts[1])]
        else:
            raise ValueError(f"--{key}: no stage {parts[1]!r}; stages are {names}")
        name = parts[2]
    else:
        sections = {f.name for f in dataclasses.fields(Config)} - {"stages"}
        if section not in sections or len(parts) != 2:
            raise ValueError(f"--{key}: unknown section {section!r}; valid sections: {', '.join(sorted(sections))}, "
                             "stages")
        target, name = getattr(cfg, section), parts[1]
    set_field(target, name, text, key)


def describe_sections(cls: type = Config) -> str:
    """Every section and key of `cls` (training's Config by default) for `--help`; see herd.config."""
    return _loader.describe_sections(cls)
