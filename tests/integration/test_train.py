"""`herd train` end to end on the debug model over real token shards (written with ShardWriter and
read by PackedLoader): the loss falls, stages chain through their checkpoints, annealing averages
checkpoints, and exports load in herd and in transformers with the same logits."""

import base64
import json
import random

import pytest
import torch

import herd
from herd.cli import main
from herd.data.shards import ShardWriter
from herd.model import ModelArgs, build_model
from herd.train import Trainer
from herd.train.checkpoint import load_model_weights
from herd.train.config import config_from_dict

WORDS = ("the llama eats grass and hay in the high mountains while the alpaca sleeps near a cold river "
         "every morning a herd walks slowly to the green valley").split()
BOS, EOS = 256, 257  # a byte-level vocabulary: ids 0..255 are bytes, then the 256 special tokens


def english(rng, n_sentences):
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."
                    for _ in range(n_sentences))


def write_shards(path, *, docs, seed):
    rng = random.Random(seed)
    with ShardWriter(path, vocab_size=512, bos=BOS, eos=EOS) as w:
        for _ in range(docs):
            w.add([BOS, *english(rng, rng.randint(1, 4)).encode(), EOS])
    return str(path)


def write_byte_tokenizer(path):
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are tiny: on a shared 2-core machine, two OpenMP threads spend most of a step
    # waiting at barriers for a core (10-30x slower than one thread when the machine is busy).
    # The thread count does not change what is tested.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"train": write_shards(root / "train", docs=400, seed=0),
            "hq": write_shards(root / "hq", docs=100, seed=1),
            "val": write_shards(root / "val", docs=40, seed=2),
            "tokenizer": write_byte_tokenizer(root / "tokenizer.model")}


def run_config(data, out, **over):
    cfg = {
        "job": {"out_dir": str(out), "device": "cpu"},
        "model": {"preset": "debug", "vocab_size": 512},
        "data": {"train": [data["train"]], "val": [data["val"]], "tokenizer": data["tokenizer"]},
        "train": {"micro_batch_tokens": 512},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 5, "min_lr": 3e-4},
        "checkpoint": {"every": 10, "keep_last": 2},
        "metrics": {"log_every": 10, "val_batches": 2, "tensorboard": False, "plot": False, "progress": False},
        "stages": [{"name": "pretrain", "steps": 40, "ramp": [[0, 1024, 64], [20_000, 2048, 128]]}],
    }
    for section, values in over.items():
        cfg[section] = values if section == "stages" else {**cfg[section], **values}
    return config_from_dict(cfg)


@pytest.fixture(scope="module")
def staged_run(data, tmp_path_factory):
    """pretrain -> context extension (longer rows, new RoPE base) -> annealing on another mix."""
    out = tmp_path_factory.mktemp("staged")
    cfg = run_config(data, out, metrics={"tensorboard": True, "plot": True}, stages=[
        {"name": "pretrain", "steps": 40, "ramp": [[0, 1024, 64], [20_000, 2048, 128]]},
        {"name": "context", "steps": 6, "ramp": [[0, 2048, 256]], "rope_theta": 1e6},
        {"name": "anneal", "steps": 6, "ramp": [[0, 1024, 128]], "lr": "linear_to_zero",
         "train": [data["hq"], data["train"]], "weights": [0.5, 0.5], "checkpoint_every": 2, "average_last": 3},
    ])
    trainer = Trainer(cfg)
    starts = {}
    original_step = trainer.train_step

    def spy(batches):  # the weights each stage's first step starts from
        span = trainer.schedule.stage_at(trainer.step)
        if trainer.step == span.start:
            starts[span.name] = ({k: v.clone() for k, v in trainer.model.state_dict().items()},
                                 trainer.model.args)
        return original_step(batches)

    trainer.train_step = spy
    result = trainer.fit()
    return cfg, out, result, starts


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_loss_decreases(staged_run):
    _, out, result, _ = staged_run
    train = losses(out)
    assert len(train) == 52
    assert sum(train[:3]) / 3 > 5.5  # about ln(512) at initialisation
    assert sum(train[37:40]) / 3 < 3.0
    pre, ctx, ann = result.stages
    assert pre.val_loss < 3.0 and ann.val_loss <= pre.val_loss + 0.05


def test_each_stage_starts_from_the_previous_final_checkpoint(staged_run):
    cfg, out, result, starts = staged_run
    pre, ctx, ann = result.stages
    for stage, prev in (("context", pre), ("anneal", ctx)):
        model = build_model(cfg.model.args(), init=False)
        load_model_weights(prev.checkpoint, model)
        weights, _ = starts[stage]
        for k, v in model.state_dict().items():
            assert torch.equal(weights[k], v), (stage, k)
    # context extension rebuilt RoPE with the new base, and annealing kept it
    assert starts["pretrain"][1].rope_theta == 500000.0
    assert starts["context"][1].rope_theta == 1e6 and starts["anneal"][1].rope_theta == 1e6
    meta = json.loads((out / "checkpoints" / "step-00000046" / "COMPLETE").read_text())
    assert meta["stage"] == "context" and meta["stage_final"] and meta["model_args"]["rope_theta"] == 1e6


def test_annealing_averages_its_last_checkpoints(staged_run):
    _, out, result, _ = staged_run
    ann = result.stages[2]
    assert ann.averaged == str(out / "anneal-averaged")
    avg = herd.load_model(ann.averaged)
    ckpts = [out / "checkpoints" / f"step-000000{s}" for s in (48, 50, 52)]
    models = []
    for c in ckpts:
        m = build_model(avg.args, init=False)
        load_model_weights(c, m)
        models.append(m.state_dict())
    for k, v in avg.state_dict().items():
        torch.testing.assert_close(v, torch.stack([m[k] for m in models]).mean(0), rtol=0, atol=1e-6)
    assert (out / "anneal-averaged" / "original" / "tokenizer.model").is_file()
    assert ann.averaged_val_loss is not None


def test_sinks_are_written(staged_run):
    _, out, result, _ = staged_run
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.loss_plot == str(out / "loss.png")
    assert any((out / "tensorboard").iterdir())
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in recs if r.get("step") == 1 and "loss" in r)
    assert step["lr"] == pytest.approx(3e-3 / 5) and step["grad_norm"] > 0 and 0 < step["mfu"] < 1
    assert [r["val_loss"] for r in recs if "val_loss" in r]


def test_periodic_checkpoints_are_pruned_but_stage_ends_kept(staged_run):
    _, out, _, _ = staged_run
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    # pretrain every 10 (10, 20, 30 pruned), anneal every 2: the newest 2 periodic ones + the 3 stage ends
    assert names == ["step-00000040", "step-00000046", "step-00000048", "step-00000050", "step-00000052"]


def test_export_hf_matches_transformers_and_meta_loads(staged_run, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    cfg, out, _, _ = staged_run
    assert main(["export", str(out), str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert main(["export", str(out / "checkpoints" / "step-00000040"), str(tmp_path / "meta"), "--format", "meta"]) == 0
    ours = build_model(ModelArgs(**json.loads((out / "checkpoints" / "step-00000052" / "COMPLETE").read_text())
                                 ["model_args"]), init=False).eval()
    load_model_weights(out / "checkpoints" / "step-00000052", ours)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    tokens = torch.tensor([[BOS, *b"the llama eats grass"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-5, atol=1e-5)
    # HF keeps the tiktoken file in original/ (a root tokenizer.model reads as SentencePiece elsewhere).
    assert (tmp_path / "hf" / "original" / "tokenizer.model").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    assert (tmp_path / "meta" / "tokenizer.model").is_file()
    meta_model = herd.load_model(tmp_path / "meta")
    pre = build_model(meta_model.args, init=False)
    load_model_weights(out / "checkpoints" / "step-00000040", pre)
    assert all(torch.equal(a, b) for a, b in zip(meta_model.state_dict().values(), pre.state_dict().values()))
    # herd generate finds the tokenizer beside the weights
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "The llama", "--max-new-tokens", "12",
                 "--temperature", "0", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.startswith("The llama")


def test_cli_train_with_overrides_and_rerun_is_a_no_op(data, tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(f"""
[job]
out_dir = "{tmp_path / 'run'}"
device = "cpu"
[model]
vocab_size = 512
[data]
train = ["{data['train']}"]
[metrics]
tensorboard = false
plot = false
progress = false
[[stages]]
name = "pretrain"
steps = 100
ramp = [[0, 512, 64]]
""")
    assert main(["train", str(toml), "--stages.pretrain.steps", "4", "--checkpoint.every", "2"]) == 0
    out = capsys.readouterr().out
    assert "pretrain: 4 steps" in out and "step-00000004" in out
    assert main(["train", str(toml), "--stages.pretrain.steps", "4", "--checkpoint.every", "2"]) == 0
    assert "pretrain: 4 steps, 0 tokens" in capsys.readouterr().out  # already done: nothing retrained
    assert main(["train", str(toml), "--optim.lrr", "1"]) == 2
    assert "unknown key 'lrr'; valid keys: lr, betas" in capsys.readouterr().err


def test_resuming_with_another_model_shape_is_refused(data, tmp_path):
    Trainer(run_config(data, tmp_path, stages=[{"name": "p", "steps": 2, "ramp": [[0, 512, 64]]}])).fit()
    with pytest.raises(ValueError, match="another shape"):
        Trainer(run_config(data, tmp_path, model={"dim": 128},
                           stages=[{"name": "p", "steps": 4, "ramp": [[0, 512, 64]]}])).fit()
