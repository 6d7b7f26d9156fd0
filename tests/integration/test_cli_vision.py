"""`herd generate --image` on a tiny Llama 3.2 Vision checkpoint with the real Llama 3 vocabulary."""

import pytest
import torch

Image = pytest.importorskip("PIL.Image")

from herd.cli import main  # noqa: E402
from herd.generate import SamplingParams  # noqa: E402
from herd.generate.vision import generate_with_images, load_vision_for_inference  # noqa: E402
from herd.model.args import ModelArgs  # noqa: E402
from herd.model.mllama import IMAGE_TOKEN_ID, MllamaArgs, build_mllama  # noqa: E402
from herd.model.mllama_io import save_mllama  # noqa: E402
from herd.model.vision import VisionArgs  # noqa: E402


@pytest.fixture(scope="module")
def vis(tmp_path_factory):
    args = MllamaArgs(text=ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                                     max_seq_len=128),
                      vision=VisionArgs(width=16, n_layers=2, n_global_layers=1, n_heads=2, mlp_dim=32, image_size=28,
                                        patch_size=14, max_num_tiles=2, intermediate_layers=(1,)),
                      n_cross_layers=1)
    model = build_mllama(args, seed=4).eval()
    with torch.no_grad():  # open the gates so the image reaches the text
        for name, p in model.named_parameters():
            if name.endswith(("gate", "gate_attn", "gate_ffwd")):
                p.fill_(0.7)
    root = tmp_path_factory.mktemp("cli-vision")
    path = save_mllama(model, root / "hf")
    picture = root / "pic.png"
    gen = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(30, 50, 3, generator=gen) * 255).to(torch.uint8).numpy()).save(picture)
    return path, picture


def test_generate_with_an_image_prints_the_librarys_greedy_text(vis, capsys):
    path, picture = vis
    code = main(["generate", str(path), "--image", str(picture), "--prompt", "Describe it:", "--max-new-tokens", "4",
                 "--temperature", "0"])
    assert code in (0, None)
    out = capsys.readouterr().out
    lm = load_vision_for_inference(path)
    prompt = lm.encode_prompt("Describe it:", 1, chat=False)
    assert prompt[:2] == [IMAGE_TOKEN_ID, 128000]  # <|image|><|begin_of_text|>...
    [r] = generate_with_images(lm.model, [prompt], lm.preprocess([picture]), max_new_tokens=4,
                               sampling=SamplingParams(temperature=0), stop_tokens=lm.stop_tokens)
    assert out == "Describe it:" + lm.tokenizer.decode(r.tokens) + "\n"


def test_chat_prompt_puts_the_image_in_the_user_turn(vis):
    path, _ = vis
    lm = load_vision_for_inference(path)
    tokens = lm.encode_prompt("What is this?", 2, chat=True)
    assert tokens.count(IMAGE_TOKEN_ID) == 2
    first = tokens.index(IMAGE_TOKEN_ID)
    assert tokens[first + 1] == IMAGE_TOKEN_ID  # the two images sit together, before the text
    text = lm.tokenizer.decode([t for t in tokens if t != IMAGE_TOKEN_ID])  # the text vocabulary has no <|image|>
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("extra, message", [
    (["--image", "missing.png"], "does not exist"),
    (["--image", "PIC", "--prompt", "b"], "one --prompt"),
    (["--image", "PIC", "--json-schema", "s.json"], "--json-schema does not go with --image"),
    (["--image", "PIC", "--chat", "--system", "be brief"], "no system message"),
])
def test_errors_exit_2_with_a_message(vis, capsys, extra, message):
    path, picture = vis
    extra = [str(picture) if e == "PIC" else e for e in extra]
    code = main(["generate", str(path), "--prompt", "a", "--max-new-tokens", "2", *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_a_text_checkpoint_is_refused_for_images(tmp_path, vis, capsys):
    import herd
    from herd.model import build_model

    _, picture = vis
    text = build_model(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=128256, multiple_of=32, max_seq_len=64))
    herd.save_model(text, tmp_path / "text")
    assert main(["generate", str(tmp_path / "text"), "--image", str(picture), "--prompt", "a"]) == 2
    assert "not a Llama 3.2 Vision checkpoint" in capsys.readouterr().err


def test_info_describes_a_vision_checkpoint(vis, capsys):
    path, _ = vis
    assert main(["info", str(path)]) in (0, None)
    out = capsys.readouterr().out
    assert "2 self + 1 cross (before self layers 1)" in out
    assert "<|image|> = 128256" in out and "28 px, patch 14, up to 2 (3 aspect ratios), 5 tokens each" in out
    lm = load_vision_for_inference(path)
    n = sum(p.numel() for p in lm.model.parameters())
    assert f"{n:,}" in out


def _replies(out: str) -> list[str]:
    # input()'s "you> " prompt lands on stdout too: each reply is what follows "llama> " on its line
    return [line.split("llama> ", 1)[1] for line in out.splitlines() if "llama> " in line]


def test_chat_with_images_equals_the_librarys_greedy_replies(vis, capsys, monkeypatch, tmp_path):
    """Turn 1 with --image, turn 2 with /image: each reply is generate_with_images on the whole dialog so far."""
    import io

    from herd.generate.vision import open_images
    from herd.tokenizer import Message, chat_format_for
    from herd.tokenizer.chat import IMAGE

    path, picture = vis
    second = tmp_path / "second.png"
    gen = torch.Generator().manual_seed(1)
    Image.fromarray((torch.rand(60, 20, 3, generator=gen) * 255).to(torch.uint8).numpy()).save(second)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"What is this?\n/image {second}\nAnd this one?\n"))
    code = main(["chat", str(path), "--image", str(picture), "--max-new-tokens", "4", "--temperature", "0"])
    assert code in (0, None)
    got = _replies(capsys.readouterr().out)
    assert len(got) == 2

    lm = load_vision_for_inference(path)
    fmt = chat_format_for(lm.path, lm.tokenizer)
    dialog = [Message("user", [IMAGE, "What is this?"])]
    want = []
    for turn, files in ((None, [picture]), ("And this one?", [picture, second])):
        if turn is not None:
            dialog.append(Message("user", [IMAGE, turn]))
        prompt = fmt.encode_dialog_prompt(dialog).tokens
        [r] = generate_with_images(lm.model, [prompt], lm.tile(open_images(files)), max_new_tokens=4,
                                   sampling=SamplingParams(temperature=0), stop_tokens=lm.stop_tokens)
        want.append(lm.tokenizer.decode(r.tokens))
        stop = [r.stop_token] if r.stop_token is not None else []
        dialog.insert(len(dialog), fmt.decode_assistant_message(r.tokens + stop))
    assert got == want


def test_chat_without_images_on_a_vision_checkpoint_is_the_text_model(vis, capsys, monkeypatch):
    """No image yet: the cross layers are skipped; checked against a plain greedy loop over full forwards."""
    import io

    from herd.tokenizer import Message, chat_format_for

    path, _ = vis
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n"))
    assert main(["chat", str(path), "--max-new-tokens", "3", "--temperature", "0"]) in (0, None)
    [got] = _replies(capsys.readouterr().out)
    lm = load_vision_for_inference(path)
    tokens = chat_format_for(lm.path, lm.tokenizer).encode_dialog_prompt([Message("user", "Hello there")]).tokens
    new = []
    with torch.no_grad():
        for _ in range(3):
            nxt = int(lm.model(torch.tensor([tokens + new]))[0, -1].argmax())
            if nxt in lm.stop_tokens:
                break
            new.append(nxt)
    assert got == lm.tokenizer.decode(new)


def test_chat_errors(vis, capsys, monkeypatch):
    import io

    path, picture = vis
    assert main(["chat", str(path), "--system", "be brief"]) == 2
    assert "no system message" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("/image missing.png\n/image\n"))
    assert main(["chat", str(path), "--max-new-tokens", "2"]) in (0, None)
    err = capsys.readouterr().err
    assert "does not exist" in err and "/image needs a file" in err


def test_a_small_vocabulary_model_gets_its_own_image_id_in_chat(tmp_path, capsys, monkeypatch):
    """`herd vision-adapter`'s models have <|image|> at their text vocabulary's size (512 here): the
    chat format's 128256 is moved there, in `encode_prompt` and in `herd chat --image` (before, the
    prompt held an id the model cannot embed)."""
    import base64
    import io

    from herd.tokenizer import Message, chat_format_for
    from herd.tokenizer.chat import IMAGE

    from tests.helpers import tiny_vision_model

    path = save_mllama(tiny_vision_model(seed=6, vocab_size=512, amplify=1.0), tmp_path / "hf")
    (path / "tokenizer.model").write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    picture = tmp_path / "pic.png"
    gen = torch.Generator().manual_seed(2)
    Image.fromarray((torch.rand(30, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()).save(picture)

    lm = load_vision_for_inference(path)
    tokens = lm.encode_prompt("hi", 1, chat=True)
    assert 512 in tokens and IMAGE_TOKEN_ID not in tokens

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    code = main(["chat", str(path), "--image", str(picture), "--max-new-tokens", "4", "--temperature", "0"])
    assert code in (0, None)
    [got] = _replies(capsys.readouterr().out)
    prompt = chat_format_for(lm.path, lm.tokenizer).encode_dialog_prompt([Message("user", [IMAGE, "hi"])]).tokens
    prompt = [512 if t == IMAGE_TOKEN_ID else t for t in prompt]
    [r] = generate_with_images(lm.model, [prompt], lm.preprocess([picture]), max_new_tokens=4,
                               sampling=SamplingParams(temperature=0), stop_tokens=lm.stop_tokens)
    assert got == lm.tokenizer.decode(r.tokens)
