"""image_url data URLs: decoded exactly, and every way a client can get one wrong is a clear error."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from herd.serve.images import ImageError, decode_data_url

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def _url(img: Image.Image, fmt: str = "PNG", mime: str = "image/png") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def _picture(h=12, w=20, mode="RGB"):
    rng = np.random.default_rng(0)
    shape = (h, w, len(mode)) if len(mode) > 1 else (h, w)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_a_png_data_url_decodes_to_the_same_pixels(mode):
    img = _picture(mode=mode)
    got = decode_data_url(_url(img))
    assert got.size == img.size and got.mode == img.mode
    assert np.array_equal(np.asarray(got), np.asarray(img))


def test_jpeg_and_media_type_parameters():
    img = _picture()
    got = decode_data_url(_url(img, "JPEG", "image/jpeg;charset=binary"))
    assert got.size == img.size and got.format == "JPEG"


@pytest.mark.parametrize("url, message", [
    ("https://example.com/cat.png", "does not fetch"),
    ("file:///etc/passwd", "does not fetch"),
    ("cat.png", "must be a data URL"),
    ("data:text/plain;base64,aGVsbG8=", "not an image"),
    ("data:image/png,rawbytes", "base64-encoded"),
    ("data:image/png;base64,@@@@", "malformed"),
    ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), "readable image"),
])
def test_bad_urls_name_the_problem(url, message):
    with pytest.raises(ImageError, match=message):
        decode_data_url(url)


def test_limits_hold_before_decoding():
    big = _picture(h=40, w=40)
    with pytest.raises(ImageError, match="40 x 40 pixels, more than 1,000"):
        decode_data_url(_url(big), max_pixels=1000)
    with pytest.raises(ImageError, match="larger than 100 bytes"):
        decode_data_url(_url(big), max_bytes=100)


def test_a_truncated_image_is_damaged_not_a_crash():
    buf = io.BytesIO()
    _picture(h=64, w=64).save(buf, format="PNG")
    cut = buf.getvalue()[: len(buf.getvalue()) // 2]
    with pytest.raises(ImageError, match="damaged"):
        decode_data_url("data:image/png;base64," + base64.b64encode(cut).decode())
    with pytest.raises(ImageError, match="must be a string"):
        decode_data_url(None)


def test_image_parts_become_image_slots_where_the_client_put_them():
    from herd.serve.protocol import APIError, parse_chat_request
    from herd.tokenizer.chat import IMAGE

    a, b = "data:image/png;base64,AAAA", "data:image/png;base64,BBBB"
    body = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": a}},
                                     {"type": "text", "text": "and"},
                                     {"type": "image_url", "image_url": {"url": b, "detail": "low"}}]},
        {"role": "assistant", "content": "Two pictures."},
        {"role": "user", "content": [{"type": "text", "text": "Thanks"}]}]}
    req = parse_chat_request(body, max_n=1)
    assert req.messages[0].content == ["Compare", IMAGE, "and", IMAGE]
    assert req.images == [a, b]  # decoded later, by the server, in this order
    assert req.messages[2].content == "Thanks"  # text-only parts stay a string
    body["messages"][1]["content"] = [{"type": "image_url", "image_url": {"url": a}}]
    with pytest.raises(APIError, match="only user messages may hold images"):
        parse_chat_request(body, max_n=1)
