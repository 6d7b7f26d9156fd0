"""Generation with images for Llama 3.2 Vision, on the same loop as the text models.

`ImageConditioned` binds one batch's images to an `Mllama`: it encodes them once (the cross-attention
keys and values every step reuses) and holds each row's cross-attention mask for every position
the row can reach, then presents the `Transformer` surface the loop in `generate.py` uses (`args`,
`hidden`, `output`, `tok_embeddings`). Nothing in the loop knows about images, so sampling, stop
tokens, logprobs and the static KV cache behave exactly as for text.

Which tokens see which image follows the preprocessing's rule (`vision_preprocess.cross_attention_mask`);
generated tokens see what the prompt's last token saw, as transformers' generate does.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from herd.generate.generate import GenerationResult, generate
from herd.model.mllama import IMAGE_TOKEN_ID, N_LEARNABLE_TOKENS, Mllama
from herd.model.mllama_io import is_mllama_dir, load_mllama
from herd.model.vision_preprocess import ImageBatch, cross_attention_mask, preprocess_images
from herd.tokenizer import Message, TokenizerLike, chat_format_for, load_tokenizer
from herd.tokenizer.chat import IMAGE


class ImageConditioned:
    """An `Mllama` with one batch's images attached, usable wherever a text `Transformer` is decoded.

    `args.vocab_size` counts the 8 extra token ids (so prompts may hold `<|image|>`); the output
    head still scores the base vocabulary, so no extra id is ever sampled.
    """

    def __init__(self, model: Mllama, prompts: Sequence[Sequence[int]], images: ImageBatch, *, max_len: int,
                 image_token: int | None = None):
        if len(prompts) != images.pixel_values.shape[0]:
            raise ValueError(f"{len(prompts)} prompts but images for {images.pixel_values.shape[0]}; pass one "
                             "(possibly empty) list of images per prompt to preprocess_images")
        t = model.args.text
        # <|image|> is the first id past the base vocabulary (128256 = IMAGE_TOKEN_ID for the real models).
        image_token = t.vocab_size if image_token is None else image_token
        self.model = model
        self.args = dataclasses.replace(t, vocab_size=t.vocab_size + N_LEARNABLE_TOKENS)
        self.tok_embeddings = model.text_model.tok_embeddings
        self.output = model.text_model.output
        device = self.tok_embeddings.weight.device
        tiles = model.args.vision.max_num_tiles
        mask = cross_attention_mask(prompts, images.num_tiles, image_token=image_token, max_tiles=tiles,
                                    length=max_len)  # (B, max_len, M, T)
        for b, p in enumerate(prompts):
            mask[b, len(p):] = mask[b, len(p) - 1]  # generated tokens see what the prompt's end saw
        self.mask = mask.to(device)
        with torch.inference_mode():
            self.cross_kv = model.encode_images(images.pixel_values.to(device), images.aspect_ratio_ids.to(device),
                                                images.aspect_ratio_mask.to(device))

    def hidden(self, tokens: torch.Tensor, *, pos: int | torch.Tensor = 0, cache=None, **kwargs: Any) -> torch.Tensor:
        B, S = tokens.shape
        if isinstance(pos, int):
            rows = self.mask[:B, pos:pos + S]  # (B, S, M, T)
        else:
            where = pos.expand(B, S)
            rows = self.mask[torch.arange(B, device=pos.device).unsqueeze(1), where]  # (B, S, M, T)
        return self.model.hidden(tokens, cross_kv=self.cross_kv, cross_attention_mask=rows, pos=pos, cache=cache,
                                 **kwargs)


def generate_with_images(model: Mllama, prompts: Sequence[Sequence[int]], images: ImageBatch, *,
                         max_new_tokens: int, image_token: int | None = None,
                         **kwargs: Any) -> list[GenerationResult]:
    """`herd.generate.generate` for prompts holding `<|image|>` tokens and their preprocessed images.

    images: `vision_preprocess.preprocess_images(...)` of each prompt's images, in the order of the
    prompt's image tokens. Other keywords (sampling, stop_tokens, logprobs, ...) as in `generate`;
    `compile` is not supported here.
    """
    if kwargs.get("compile"):
        raise ValueError("compile=True is not supported with images; decode eagerly")
    if not prompts:
        raise ValueError("prompts is empty")
    max_len = min(max(len(p) for p in prompts) + max_new_tokens, model.args.text.max_seq_len)
    bound = ImageConditioned(model, prompts, images, max_len=max_len, image_token=image_token)
    return generate(bound, prompts, max_new_tokens=max_new_tokens, **kwargs)  # type: ignore[arg-type]


# ---- opening a vision checkpoint for the CLI -----------------------------------------------------


def with_image_token(prompt: Sequence[int], model: Mllama) -> list[int]:
    """A chat-format prompt with `<|image|>` at `model`'s own id.

    The chat format writes the released models' id, 128256 (their text vocabulary's size). A model
    with a smaller text vocabulary (`herd vision-adapter`'s) has its image token at its own
    vocabulary size, and 128256 is not an id it can embed."""
    image = model.args.text.vocab_size
    if image >= IMAGE_TOKEN_ID:  # the released vocabulary (or a larger one, where 128256 is text)
        return list(prompt)
    return [image if t == IMAGE_TOKEN_ID else t for t in prompt]


@dataclass
class LoadedVisionModel:
    """A Llama 3.2 Vision checkpoint opened for inference, with its tokenizer (as `LoadedModel` for text)."""

    model: Mllama
    tokenizer: TokenizerLike
    path: Path

    @property
    def stop_tokens(self) -> tuple[int, ...]:
        return tuple(self.tokenizer.stop_tokens)

    @property
    def chat(self):
        """The checkpoint's chat format (`ChatFormat` 3.1 for the Llama 3 vocabulary), as `LoadedModel.chat`."""
        return chat_format_for(self.path, self.tokenizer)

    def encode_prompt(self, text: str, n_images: int, *, chat: bool, system: str | None = None) -> list[int]:
        """`n_images` image tokens and the text: as one user turn in the chat format (`chat`), else as
        `<|image|>...<|begin_of_text|>text`, the released base models' prompt shape."""
        image = self.model.args.text.vocab_size
        if chat:
            if system:
                raise ValueError("a dialog with images takes no system message (the released chat template refuses "
                                 "one); drop --system")
            fmt = chat_format_for(self.path, self.tokenizer)
            dialog = [Message(role="user", content=[*[IMAGE] * n_images, text])]
            return with_image_token(fmt.encode_dialog_prompt(dialog).tokens, self.model)
        return [image] * n_images + self.tokenizer.encode(text, bos=self.tokenizer.add_bos, eos=False)

    def preprocess(self, files: Sequence[str | os.PathLike[str]]) -> ImageBatch:
        """Open image files (anything Pillow reads) and tile them for this model."""
        return self.tile(open_images(files))

    def tile(self, images: Sequence[Any]) -> ImageBatch:
        """Tile Pillow images (one prompt's, in order) for this model."""
        v = self.model.args.vision
        return preprocess_images([list(images)], tile_size=v.image_size, max_tiles=v.max_num_tiles)


def open_images(files: Sequence[str | os.PathLike[str]]) -> list[Any]:
    """Pillow images read fully from files, with errors that name the file."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except FileNotFoundError:
            raise FileNotFoundError(f"image {str(f)!r} does not exist") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {str(f)!r} ({e}); pass a PNG, JPEG or another format Pillow "
                             "opens") from None
    return images


def load_vision_for_inference(path: str | os.PathLike[str], *, tokenizer: str | os.PathLike[str] | None = None,
                              dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> LoadedVisionModel:
    """Open a Llama 3.2 Vision checkpoint (HF or Meta directory); fp32 on CPU unless `dtype` says otherwise."""
    path = Path(path).expanduser()
    if not is_mllama_dir(path):
        raise ValueError(f"{path} is not a Llama 3.2 Vision checkpoint (HF config.json with model_type 'mllama' or a "
                         "Meta params.json with vision_* fields); images need one")
    if dtype is None and torch.device(device).type == "cpu":
        dtype = torch.float32
    model = load_mllama(path, dtype=dtype, device=device).eval()
    tok = load_tokenizer(path, tokenizer, vocab_size=model.args.text.vocab_size)
    return LoadedVisionModel(model=model, tokenizer=tok, path=path)


# ---- multi-turn chat with images -----------------------------------------------------------------


class _TextOnly:
    """An `Mllama` with no image yet: the text model alone (cross layers skipped), as `generate` sees it."""

    def __init__(self, model: Mllama):
        t = model.args.text
        self.model, self.args = model, dataclasses.replace(t, vocab_size=t.vocab_size + N_LEARNABLE_TOKENS)
        self.tok_embeddings, self.output = model.text_model.tok_embeddings, model.text_model.output

    def hidden(self, tokens: torch.Tensor, *, pos: int | torch.Tensor = 0, cache=None, **kwargs: Any) -> torch.Tensor:
        return self.model.hidden(tokens, pos=pos, cache=cache, **kwargs)


class VisionChatSession:
    """`herd chat` on a Llama 3.2 Vision checkpoint: images join the next user turn (`attach`).

    As `ChatSession` does for text, every turn re-encodes the whole dialog, and here every image
    so far too (the encoder runs once per turn; the cross-attention keys/values are then reused by
    every decode step of the reply). A turn's images sit before its text, the released template's
    order; which tokens see which image follows the preprocessing's rule, so text before the first
    image sees none.
    """

    def __init__(self, lm: LoadedVisionModel, *, sampling: Any = None, max_new_tokens: int = 512):
        from herd.generate.sampling import SamplingParams

        self.lm = lm
        self.format = chat_format_for(lm.path, lm.tokenizer)
        self.sampling = sampling if sampling is not None else SamplingParams()
        self.max_new_tokens = max_new_tokens
        self.reset()

    def reset(self) -> None:
        self.history: list[Message] = []
        self.images: list[Any] = []  # every image of the history, in order
        self.pending: list[Any] = []  # attached, for the next user turn
        self.last_reply: Message | None = None

    def attach(self, files: Sequence[str | os.PathLike[str]]) -> int:
        """Read image files for the next user turn; returns how many are waiting."""
        self.pending += open_images(files)
        return len(self.pending)

    def send(self, text: str):
        """Add a user turn (with the attached images) and stream the reply as text pieces.

        The turn and its images join the history only when the reply is complete."""
        from herd.generate.generate import stream_text
        from herd.generate.session import stream_reply

        content = [*[IMAGE] * len(self.pending), text] if self.pending else text
        dialog = [*self.history, Message(role="user", content=content)]
        prompt = with_image_token(self.format.encode_dialog_prompt(dialog).tokens, self.lm.model)
        room = self.lm.model.args.text.max_seq_len - len(prompt)
        if room < 1:
            raise ValueError(f"the conversation is {len(prompt)} tokens, the model's limit is "
                             f"{self.lm.model.args.text.max_seq_len}; start over with /reset")
        images = self.images + self.pending
        new = min(self.max_new_tokens, room)
        bound: Any = (ImageConditioned(self.lm.model, [prompt], self.lm.tile(images), max_len=len(prompt) + new)
                      if images else _TextOnly(self.lm.model))
        events = stream_text(bound, self.lm.tokenizer, [prompt], max_new_tokens=new, sampling=self.sampling,
                             stop_tokens=self.lm.stop_tokens)
        reply = yield from stream_reply(events, self.format)
        self.history, self.images, self.pending = [*dialog, reply], images, []
        self.last_reply = reply
