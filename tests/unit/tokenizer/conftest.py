import pytest

from herd.tokenizer import Tokenizer, llama3_tokenizer_path


@pytest.fixture(scope="session")
def llama3() -> Tokenizer:
    # Loading parses 128,000 ranks (~0.4 s); share one instance across the tokenizer tests.
    return Tokenizer.from_file(llama3_tokenizer_path())


# A small multilingual corpus for the vocabularies trained here (a fraction of a second each).
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "Le cœur a ses raisons que la raison ne connaît point. Où est l'hôpital ?",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein. Straße und Größe.",
    "我们在北京吃了烤鸭。東京は日本の首都です。",
    "def square(x):\n    return x ** 2  # 1234567890\n\tprint(square(12))",
    "Emoji 😀👍🏽 and llamas 🦙, numbers 3.14159 and 2024-06-01.",
    "I'll say it's fine, we've seen they're here and she'd agree.",
] * 20

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The same format with the assistant's text marked, as HF's return_assistant_tokens_mask needs.
CHATML_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def chatml_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json (600 tokens, ChatML specials) in an HF checkpoint layout."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    directory = tmp_path_factory.mktemp("chatml")
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": CHATML,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """A SentencePiece BPE model trained as Llama's was (byte fallback, digits split, dummy prefix)."""
    import sentencepiece as spm

    path = tmp_path_factory.mktemp("spm") / "tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(path), vocab_size=500, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, character_coverage=0.98,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    return path.with_suffix(".model")


@pytest.fixture(scope="session")
def chatml() -> str:
    return CHATML


@pytest.fixture(scope="session")
def chatml_generation() -> str:
    return CHATML_GENERATION


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return CORPUS
