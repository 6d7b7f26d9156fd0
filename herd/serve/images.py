"""Images in OpenAI requests: `image_url` content parts holding data URLs, decoded with Pillow.

The server never fetches a URL: a request that names an http(s) or file URL is refused (400)
with a message saying to send the bytes as a data URL, because a fetch would let any client make
the server reach any address it can (and wait on it). What a client can make the server spend is
bounded before decoding: the encoded size, then the pixel count from the image header (Pillow's
own decompression-bomb check is a warning at 89 MP; here it is an error at `max_pixels`), and
the file is fully decoded and verified before it reaches the model.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # encoded, per image
MAX_IMAGE_PIXELS = 40_000_000  # width x height, per image (e.g. 8000 x 5000)
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.ASCII)


class ImageError(ValueError):
    """A client's image is refused; the message says why and what to send instead."""


def decode_data_url(url: str, *, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS):
    """The Pillow image (RGB or with alpha, fully loaded) a `data:image/...;base64,` URL holds."""
    from PIL import Image

    if not isinstance(url, str):
        raise ImageError(f"image_url.url must be a string, got {type(url).__name__}")
    if re.match(r"(?i)(https?|ftp|file):", url):
        raise ImageError("herd serve does not fetch image URLs; send the image itself as a data URL "
                         "(data:image/png;base64,...)")
    match = _DATA_URL.match(url)
    if not match:
        raise ImageError("image_url.url must be a data URL: data:image/png;base64,... (or image/jpeg, ...)")
    mime = (match.group("mime") or "").lower()
    if not mime.startswith("image/"):
        raise ImageError(f"the data URL holds {mime or 'no media type'}, not an image; use data:image/png;base64,...")
    if not match.group("b64"):
        raise ImageError("the data URL must be base64-encoded (data:image/png;base64,...)")
    payload = url[match.end():]
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise ImageError(f"the image is larger than {max_bytes:,} bytes; send a smaller one")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"the data URL's base64 is malformed: {e}") from None
    try:
        img = Image.open(io.BytesIO(raw), formats=FORMATS)
    except Image.DecompressionBombError:
        raise ImageError(f"the image has more than {max_pixels:,} pixels; send a smaller one") from None
    except Exception:  # noqa: BLE001 - Pillow raises several types for unreadable data
        raise ImageError(f"the data URL does not hold a readable image ({', '.join(FORMATS)})") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(f"the image is empty ({width} x {height} pixels)")
    if width * height > max_pixels:
        raise ImageError(f"the image is {width} x {height} pixels, more than {max_pixels:,}; send a smaller one")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data
        raise ImageError(f"the image data is damaged: {e}") from None
    return img


def split_image_parts(content: list, where: str) -> tuple[list, list[str]]:
    """OpenAI content parts -> the chat format's content (text pieces and `IMAGE` slots, in the
    client's order, which is where the `<|image|>` tokens go, as Meta's and HF's templates place
    them) and the image URLs in that order (decoded later, by `decode_data_url`)."""
    from herd.tokenizer.chat import IMAGE

    parts: list = []
    urls: list[str] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str):
                raise ImageError(f"{where}: content[{i}] must be {{'type': 'image_url', 'image_url': {{'url': "
                                 "'data:image/png;base64,...'}}")
            parts.append(IMAGE)
            urls.append(url)
        else:
            raise ImageError(f"{where}: content[{i}] must be a text part ({{'type': 'text', 'text': ...}}) or an "
                             "image part ({'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,...'}})")
    return parts, urls
