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
