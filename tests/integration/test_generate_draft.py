"""`herd generate --draft`: speculative decoding from the command line, checked against the library."""

import pytest

import herd
from herd.cli import main
from herd.generate import GREEDY, generate
from herd.model import ModelArgs, build_model
from herd.tokenizer import Tokenizer, llama3_tokenizer_path
from tests.helpers import target_and_draft

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32, max_seq_len=256,
                 rope_scaling=dict(factor=8.0, original_max_seq_len=64))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A target, and a one-layer draft that shares its embeddings (so it agrees part of the time)."""
    root = tmp_path_factory.mktemp("draft")
    target, draft = target_and_draft(ARGS)
    herd.save_model(target, root / "target", format="hf")
    herd.save_model(draft, root / "draft", format="hf")
    other = build_model(ARGS.replace(vocab_size=128300), seed=5).eval()
    herd.save_model(other, root / "other-vocab", format="hf")
    return root, target


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(llama3_tokenizer_path())


def _run(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_greedy_with_a_draft_prints_the_models_own_greedy_text(ckpts, tok, capsys):
    root, target = ckpts
    prompt = "Llamas live in"
    code, out, err = _run(capsys, root / "target", "--draft", root / "draft", "--draft-k", 3, "--prompt", prompt,
                          "--temperature", 0, "--max-new-tokens", 12, "--ignore-eos")
    assert code == 0, err
    [want] = generate(target, [tok.encode(prompt, bos=True, eos=False)], max_new_tokens=12, sampling=GREEDY)
    assert out == prompt + tok.decode(want.tokens) + "\n"
    assert "[12 tokens, finish: length]" in err
    assert "draft tokens accepted" in err and "k=3" in err


def test_a_draft_equal_to_the_model_is_always_accepted(ckpts, capsys):
    root, _ = ckpts
    code, _, err = _run(capsys, root / "target", "--draft", root / "target", "--prompt", "a", "--prompt", "b c",
                        "--temperature", 0, "--max-new-tokens", 9, "--ignore-eos")
    assert code == 0, err
    # Two rows, 8 tokens after the first: rounds of k = 4 and k = 3 (capped by the length), 14 drafts, all kept.
    assert "[speculative: 14/14 draft tokens accepted (100.0%), k=4, 6 target forwards for 18 tokens]" in err


def test_seeded_sampling_repeats(ckpts, capsys):
    root, _ = ckpts
    argv = (root / "target", "--draft", root / "draft", "--prompt", "Once upon", "--temperature", 1.0,
            "--max-new-tokens", 6, "--seed", 7, "--ignore-eos")
    first, second = _run(capsys, *argv), _run(capsys, *argv)
    assert first[0] == 0 and first[1:] == second[1:]
    assert "[6 tokens, finish: length]" in first[2]


@pytest.mark.parametrize("extra,message", [
    (("--draft-k", "0"), "--draft-k must be at least 1"),
    (("--json-schema", "schema.json"), "does not support --json-schema"),
    (("--logprobs",), "does not support --logprobs"),
    (("--tp", "2"), "does not support --tp"),
    (("--input", "in.jsonl", "--output", "out.jsonl"), "--draft is for --prompt runs"),
])
def test_unsupported_combinations_are_refused(ckpts, capsys, extra, message):
    root, _ = ckpts
    code, _, err = _run(capsys, root / "target", "--draft", root / "draft", "--prompt", "x", *extra)
    assert code == 2 and message in err, err
    assert "Traceback" not in err


def test_draft_k_needs_a_draft(ckpts, capsys):
    root, _ = ckpts
    code, _, err = _run(capsys, root / "target", "--draft-k", 2, "--prompt", "x")
    assert code == 2 and "needs --draft PATH" in err


def test_a_draft_with_another_vocabulary_is_refused(ckpts, capsys):
    root, _ = ckpts
    code, _, err = _run(capsys, root / "target", "--draft", root / "other-vocab", "--prompt", "x",
                        "--max-new-tokens", 2)
    assert code == 2 and "vocabulary has 128300 entries but the model's has 128256" in err, err
