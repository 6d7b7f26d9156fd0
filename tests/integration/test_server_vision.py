"""`herd serve` on a tiny Llama 3.2 Vision checkpoint: the `openai` client sends images as data URLs
(plain and streamed) and gets the library's own greedy reply for that dialog; every way to get an
image request wrong is a clear 400."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

from herd.cli import main  # noqa: E402
from herd.generate import GREEDY, generate  # noqa: E402
from herd.generate.vision import _TextOnly, generate_with_images, load_vision_for_inference  # noqa: E402
from herd.model.mllama_io import save_mllama  # noqa: E402
from herd.serve.server import ServerThread, build_app  # noqa: E402
from herd.serve.vision import VisionEngine  # noqa: E402
from herd.tokenizer import Message  # noqa: E402
from herd.tokenizer.chat import IMAGE  # noqa: E402
from tests.helpers import herd_serve_process, real_vocab_model, served, tiny_vision_model  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_mllama(tiny_vision_model(seed=4), tmp_path_factory.mktemp("serve-vision") / "hf")


@pytest.fixture(scope="module")
def lm(checkpoint):
    return load_vision_for_inference(checkpoint)


@pytest.fixture(scope="module")
def client(lm):
    engine = VisionEngine(lm.model, max_batch=3, max_seq_len=96, max_images=2, block_size=8,
                          token_bytes=lm.tokenizer.decode_single_token_bytes)
    engine.start()
    with ServerThread(build_app(engine, lm.tokenizer, model_name="tiny-vision", chat=lm.chat)) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120), srv.url
    engine.stop()


def _picture(seed: int, h: int = 30, w: int = 50):
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy())


def _data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_part(img) -> dict:
    return {"type": "image_url", "image_url": {"url": _data_url(img)}}


def _want(lm, content, images, max_tokens=6) -> str:
    """The library's greedy reply to one user turn (the chat format places <|image|> where the part was)."""
    prompt = lm.chat.encode_dialog_prompt([Message(role="user", content=content)]).tokens
    kw = dict(max_new_tokens=max_tokens, sampling=GREEDY, stop_tokens=lm.stop_tokens)
    [r] = (generate_with_images(lm.model, [prompt], lm.tile(images), **kw) if images
           else generate(_TextOnly(lm.model), [prompt], **kw))
    return lm.tokenizer.decode(r.tokens)


def test_an_image_question_gets_the_librarys_greedy_reply(lm, client):
    c, _ = client
    pic = _picture(0)
    content = [_image_part(pic), {"type": "text", "text": "What is in this picture?"}]
    r = c.chat.completions.create(model="tiny-vision", messages=[{"role": "user", "content": content}],
                                  max_tokens=6, temperature=0)
    want = _want(lm, [IMAGE, "What is in this picture?"], [pic])
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(lm.chat.encode_dialog_prompt(
        [Message(role="user", content=[IMAGE, "What is in this picture?"])]).tokens)
    # Streamed, with text before the image and two images: the same reply as the library's.
    content = [{"type": "text", "text": "Compare"}, _image_part(pic), {"type": "text", "text": "and"},
               _image_part(_picture(1, 50, 20))]
    stream = c.chat.completions.create(model="tiny-vision", messages=[{"role": "user", "content": content}],
                                       max_tokens=6, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == _want(lm, ["Compare", IMAGE, "and", IMAGE], [pic, _picture(1, 50, 20)])
    # Another picture, the same words: another reply (the image reaches the model).
    other = c.chat.completions.create(model="tiny-vision", messages=[{"role": "user", "content": [
        _image_part(_picture(2)), {"type": "text", "text": "What is in this picture?"}]}], max_tokens=6,
        temperature=0, logprobs=True)
    assert other.choices[0].message.content == _want(lm, [IMAGE, "What is in this picture?"], [_picture(2)])
    assert other.choices[0].message.content != want


def test_a_text_only_request_on_the_vision_model(lm, client):
    c, _ = client
    r = c.chat.completions.create(model="tiny-vision", messages=[{"role": "user", "content": "Hello there"}],
                                  max_tokens=6, temperature=0)
    assert r.choices[0].message.content == _want(lm, "Hello there", [])
    assert r.choices[0].message.content  # a reply, not an empty match


@pytest.mark.parametrize("part, message", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "send the image itself as a data URL"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "base64 is malformed"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}},
     "does not hold a readable image"),
    ({"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGVsbG8="}}, "not an image"),
    ({"type": "image_url", "image_url": "data:image/png;base64,AAAA"}, "must be {'type': 'image_url'"),
    ({"type": "input_audio", "input_audio": {}}, "must be a text part"),
])
def test_bad_images_are_400s_that_say_what_to_send(client, part, message):
    _, url = client
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}], "max_tokens": 2}
    if part["type"] == "input_audio":
        body["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": _data_url(_picture(3))}})
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


def test_too_many_images_and_images_outside_user_turns(client):
    c, _ = client
    three = [_image_part(_picture(i, 20, 20)) for i in range(3)]
    with pytest.raises(openai.BadRequestError, match="at most 2 per request"):
        c.chat.completions.create(model="tiny-vision", messages=[{"role": "user", "content": three}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="only user messages may hold images"):
        c.chat.completions.create(model="tiny-vision", max_tokens=2, messages=[
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": three[:1]},
            {"role": "user", "content": "and?"}])
    with pytest.raises(openai.BadRequestError, match="no system message"):
        c.chat.completions.create(model="tiny-vision", max_tokens=2, messages=[
            {"role": "system", "content": "be brief"}, {"role": "user", "content": three[:1]}])


def test_a_text_model_refuses_images(lm):
    with served(real_vocab_model(seed=1, context=64), lm.tokenizer, max_batch=1, max_seq_len=64) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={"max_tokens": 2, "messages": [
            {"role": "user", "content": [_image_part(_picture(4)), {"type": "text", "text": "hi"}]}]})
    assert r.status_code == 400 and "this model has no vision encoder" in r.json()["error"]["message"]


def test_herd_serve_command_with_a_vision_checkpoint(lm, checkpoint):
    assert main(["serve", str(checkpoint), "--lora", "a=b"]) == 2  # refused before anything loads
    assert main(["serve", str(checkpoint), "--max-images", "0"]) == 2
    with herd_serve_process([str(checkpoint), "--max-batch", "2", "--max-seq-len", "96",
                             "--model-name", "tiny-vision"]) as (url, proc):
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        pic = _picture(5)
        r = c.chat.completions.create(model="tiny-vision", max_tokens=5, temperature=0, messages=[
            {"role": "user", "content": [_image_part(pic), {"type": "text", "text": "Describe it."}]}])
        assert r.choices[0].message.content == _want(lm, [IMAGE, "Describe it."], [pic], max_tokens=5)
    assert proc.returncode == 0 and "Llama 3.2 Vision, image_url parts" in proc.output


def test_a_small_vocabulary_model_gets_its_own_image_id(tmp_path):
    """`herd vision-adapter`'s models have <|image|> at their vocabulary size (512 here), not 128256:
    the server moves the chat format's image token there."""
    model = tiny_vision_model(seed=6, vocab_size=512, amplify=1.0)
    path = save_mllama(model, tmp_path / "hf")
    (path / "tokenizer.model").write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    small = load_vision_for_inference(path)
    engine = VisionEngine(small.model, max_batch=1, max_seq_len=96, token_bytes=small.tokenizer.decode_single_token_bytes)
    engine.start()
    pic = _picture(7)
    try:
        with ServerThread(build_app(engine, small.tokenizer, model_name="small", chat=small.chat)) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
            r = c.chat.completions.create(model="small", max_tokens=4, temperature=0, messages=[
                {"role": "user", "content": [_image_part(pic), {"type": "text", "text": "hi"}]}])
    finally:
        engine.stop()
    prompt = small.chat.encode_dialog_prompt([Message(role="user", content=[IMAGE, "hi"])]).tokens
    prompt = [512 if t == 128256 else t for t in prompt]
    [want] = generate_with_images(small.model, [prompt], small.tile([pic]), max_new_tokens=4, sampling=GREEDY,
                                  stop_tokens=small.stop_tokens)
    special = set(small.tokenizer.special_tokens.values())  # left out of the text, as vLLM does
    assert r.choices[0].message.content == small.tokenizer.decode([t for t in want.tokens if t not in special])
    assert r.usage.completion_tokens == len(want.tokens)
    assert r.usage.prompt_tokens == len(prompt) and 512 in prompt
