"""Llama 3.2 Vision checkpoints: HF `MllamaForConditionalGeneration` safetensors and Meta's
consolidated layout, both directions, plus the config translations.

herd's names are Meta's (`text_model.*`, `vision_model.vision_encoder.*`,
`vision_model.vision_projection`, as in meta-llama/llama-models `models/llama3/multimodal/model.py`).
Where the tensors differ:
* HF: the self-attention wq/wk rows are permuted to rotate_half order (as for the text models;
  cross-attention has no RoPE and is not permuted); the 8 `learnable_embedding` rows are appended
  to `embed_tokens`; the patch conv is 4-D; layers are renumbered into one list of n + k.
* Meta: the tile / gated positional embeddings are a (T, T, ...) grid indexed by tile row and
  column, where herd (and HF) keep one table per aspect ratio id; aspect ratio (h, w) reads
  grid[:h, :w]. Grid -> tables is exact. Tables -> grid needs every table to agree on the cells it
  shares (true of any checkpoint that came from Meta's grid); otherwise `to_meta_state_dict`
  refuses rather than silently picking one. Grid cells no supported ratio reads are written as 0.

Not covered: the fused TransformerEngine-style names (`attention.wqkv.layer_norm_weight`,
`feed_forward.mlp.fc1`, `cross_attention_layers.N.attention.wkv`, ...) that HF's
`convert_mllama_weights_to_hf.py` reads from Meta's released consolidated.pth. They are
recognised and refused with a message, not converted.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from herd.io import atomic_dir
from herd.model.keymap import args_from_hf_config as text_args_from_hf_config
from herd.model.keymap import permute_from_hf, permute_to_hf
from herd.model.formats import _read_safetensors
from herd.model.mllama import N_LEARNABLE_TOKENS, Mllama, MllamaArgs
from herd.model.vision import VisionArgs

_TEXT = "model.language_model."
_VIS = "model.vision_model."
_ENC = "vision_model.vision_encoder."

_SELF_HF = {  # herd suffix under text_model.layers.N -> HF suffix under layers.M
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_CROSS_HF = {
    "attention.wq.weight": "cross_attn.q_proj.weight", "attention.wk.weight": "cross_attn.k_proj.weight",
    "attention.wv.weight": "cross_attn.v_proj.weight", "attention.wo.weight": "cross_attn.o_proj.weight",
    "attention.q_norm.weight": "cross_attn.q_norm.weight", "attention.k_norm.weight": "cross_attn.k_norm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight", "gate_attn": "cross_attn_attn_gate",
    "gate_ffwd": "cross_attn_mlp_gate",
}
_BLOCK_HF = {
    "attn.wq.weight": "self_attn.q_proj.weight", "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight", "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
    "ln_1.weight": "input_layernorm.weight", "ln_1.bias": "input_layernorm.bias",
    "ln_2.weight": "post_attention_layernorm.weight", "ln_2.bias": "post_attention_layernorm.bias",
    "gate_attn": "gate_attn", "gate_ffn": "gate_ffn",
}
_ENC_HF = {
    "class_embedding": "class_embedding",
    "positional_embedding": "gated_positional_embedding.embedding",
    "gated_positional_embedding_gate": "gated_positional_embedding.gate",
    "gated_positional_embedding": "gated_positional_embedding.tile_embedding.weight",
    "pre_tile_pos_embed.embedding": "pre_tile_positional_embedding.embedding.weight",
    "pre_tile_pos_embed.gate": "pre_tile_positional_embedding.gate",
    "post_tile_pos_embed.embedding": "post_tile_positional_embedding.embedding.weight",
    "post_tile_pos_embed.gate": "post_tile_positional_embedding.gate",
    "ln_pre.weight": "layernorm_pre.weight", "ln_pre.bias": "layernorm_pre.bias",
    "ln_post.weight": "layernorm_post.weight", "ln_post.bias": "layernorm_post.bias",
    "conv1._linear.weight": "patch_embedding.weight",
}
_TILE_TABLES = ("gated_positional_embedding", "pre_tile_pos_embed.embedding", "post_tile_pos_embed.embedding")


# ---- HF <-> herd ---------------------------------------------------------------------------


def hf_key_map(args: MllamaArgs) -> dict[str, str]:
    """Every herd parameter name -> its HF MllamaForConditionalGeneration name."""
    t, v = args.text, args.vision
    out: dict[str, str] = {}
    sched = args.fusion_schedule
    hf_self = [i for i in range(t.n_layers + args.n_cross_layers) if i not in args.hf_cross_layers]
    for i in range(t.n_layers):
        for a, b in _SELF_HF.items():
            out[f"text_model.layers.{i}.{a}"] = f"{_TEXT}layers.{hf_self[i]}.{b}"
    for j in range(len(sched)):
        for a, b in _CROSS_HF.items():
            out[f"text_model.cross_attention_layers.{j}.{a}"] = f"{_TEXT}layers.{args.hf_cross_layers[j]}.{b}"
    out["text_model.norm.weight"] = f"{_TEXT}norm.weight"
    out["text_model.output.weight"] = "lm_head.weight"
    for a, b in _ENC_HF.items():
        out[_ENC + a] = _VIS + b
    for stack, n, gated in (("transformer", v.n_layers, False), ("global_transformer", v.n_global_layers, True)):
        for i in range(n):
            for a, b in _BLOCK_HF.items():
                if gated or not a.startswith("gate"):
                    out[f"{_ENC}{stack}.resblocks.{i}.{a}"] = f"{_VIS}{stack}.layers.{i}.{b}"
    out["vision_model.vision_projection.weight"] = "model.multi_modal_projector.weight"
    out["vision_model.vision_projection.bias"] = "model.multi_modal_projector.bias"
    return out


def to_hf_state_dict(sd: Mapping[str, torch.Tensor], args: MllamaArgs) -> dict[str, torch.Tensor]:
    t, v = args.text, args.vision
    names = hf_key_map(args)
    out: dict[str, torch.Tensor] = {}
    for key, w in sd.items():
        if key in ("text_model.tok_embeddings.weight", "text_model.learnable_embedding.weight"):
            continue
        if key not in names:
            raise KeyError(f"{key} has no HF name; is this a herd Mllama state dict?")
        if re.fullmatch(r"text_model\.layers\.\d+\.attention\.wq\.weight", key):
            w = permute_to_hf(w, t.n_heads)
        elif re.fullmatch(r"text_model\.layers\.\d+\.attention\.wk\.weight", key):
            w = permute_to_hf(w, t.n_kv_heads)
        elif key == _ENC + "conv1._linear.weight":
            w = w.reshape(v.width, v.in_channels, v.patch_size, v.patch_size)
        elif key == _ENC + "gated_positional_embedding":
            w = w.reshape(w.shape[0], -1)
        elif key.endswith("tile_pos_embed.embedding"):
            w = w.reshape(w.shape[0], -1)
        out[names[key]] = w
    out[_TEXT + "embed_tokens.weight"] = torch.cat(
        [sd["text_model.tok_embeddings.weight"], sd["text_model.learnable_embedding.weight"]], dim=0)
    return out


def from_hf_state_dict(sd: Mapping[str, torch.Tensor], args: MllamaArgs) -> dict[str, torch.Tensor]:
    t, v = args.text, args.vision
    back = {b: a for a, b in hf_key_map(args).items()}
    out: dict[str, torch.Tensor] = {}
    unknown = sorted(k for k in sd if k not in back and k != _TEXT + "embed_tokens.weight")
    if unknown:
        raise ValueError(f"HF Mllama checkpoint has {len(unknown)} keys herd does not map, e.g. {unknown[:3]}; "
                         "is it a MllamaForConditionalGeneration checkpoint with the config it came with?")
    T, n_ratios = v.max_num_tiles, len(v.aspect_ratios)
    for hf, w in sd.items():
        if hf == _TEXT + "embed_tokens.weight":
            out["text_model.tok_embeddings.weight"] = w[: t.vocab_size]
            out["text_model.learnable_embedding.weight"] = w[t.vocab_size:]
            continue
        key = back[hf]
        if re.fullmatch(r"text_model\.layers\.\d+\.attention\.wq\.weight", key):
            w = permute_from_hf(w, t.n_heads)
        elif re.fullmatch(r"text_model\.layers\.\d+\.attention\.wk\.weight", key):
            w = permute_from_hf(w, t.n_kv_heads)
        elif key == _ENC + "conv1._linear.weight":
            w = w.reshape(v.width, -1)
        elif key == _ENC + "gated_positional_embedding":
            w = w.reshape(n_ratios + 1, T, v.n_tokens, v.width)
        elif key.endswith("tile_pos_embed.embedding"):
            w = w.reshape(n_ratios + 1, T, 1, v.width)
        out[key] = w
    return out


# ---- Meta <-> herd -------------------------------------------------------------------------


def grid_to_tables(grid: torch.Tensor, ratios: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Meta's (T, T, n, W) grid -> herd's (len(ratios) + 1, T, n, W) tables; row 0 (padding) is 0."""
    T, _, n, W = grid.shape
    tables = grid.new_zeros(len(ratios) + 1, T, n, W)
    for i, (h, w) in enumerate(ratios):
        tables[i + 1, : h * w] = grid[:h, :w].reshape(h * w, n, W)
    return tables


def tables_to_grid(tables: torch.Tensor, ratios: tuple[tuple[int, int], ...], *, name: str) -> torch.Tensor:
    """Inverse of `grid_to_tables`; refuses tables that disagree on a shared grid cell."""
    _, T, n, W = tables.shape
    grid = tables.new_zeros(T, T, n, W)
    seen = torch.zeros(T, T, dtype=torch.bool)
    for i, (h, w) in enumerate(ratios):
        cells = tables[i + 1, : h * w].reshape(h, w, n, W)
        old = grid[:h, :w]
        clash = seen[:h, :w] & ~(old == cells).flatten(2).all(-1)
        if clash.any():
            r, c = (int(x) for x in clash.nonzero()[0])
            raise ValueError(
                f"{name}: aspect ratio {(h, w)} and an earlier ratio hold different embeddings for tile "
                f"({r}, {c}), so the tables cannot be written as Meta's (T, T, ...) grid (they did not come from "
                "one, e.g. after fine-tuning in HF's layout); save this model in HF format instead"
            )
        grid[:h, :w] = cells
        seen[:h, :w] = True
    return grid


def to_meta_state_dict(sd: Mapping[str, torch.Tensor], args: MllamaArgs) -> dict[str, torch.Tensor]:
    out = dict(sd)
    for name in _TILE_TABLES:
        out[_ENC + name] = tables_to_grid(sd[_ENC + name], args.vision.aspect_ratios, name=_ENC + name)
    return out


def from_meta_state_dict(sd: Mapping[str, torch.Tensor], args: MllamaArgs) -> dict[str, torch.Tensor]:
    fused = [k for k in sd if ".wqkv." in k or ".feed_forward.mlp." in k or ".attention.wkv" in k]
    if fused:
        raise ValueError(
            f"this consolidated checkpoint uses the fused TransformerEngine names ({fused[0]}, ...), which herd "
            "does not read; convert it with transformers' convert_mllama_weights_to_hf.py and load the HF directory"
        )
    out = {k: w for k, w in sd.items() if k != "text_model.rope.freqs"}
    for name in _TILE_TABLES:
        if _ENC + name in out:
            out[_ENC + name] = grid_to_tables(out[_ENC + name], args.vision.aspect_ratios)
    return out


# ---- configs -------------------------------------------------------------------------------


def args_from_hf_config(config: Mapping[str, Any]) -> MllamaArgs:
    """MllamaArgs for an HF mllama config.json dict; the text part goes through the Llama reader."""
    if config.get("model_type") != "mllama":
        raise ValueError(f"HF config has model_type {config.get('model_type')!r}; Llama 3.2 Vision is 'mllama'")
    tc, vc = dict(config.get("text_config") or {}), dict(config.get("vision_config") or {})
    if not tc or not vc:
        raise ValueError("an mllama config.json needs text_config and vision_config")
    cross = [int(i) for i in tc.get("cross_attention_layers", [])]
    n_total = int(tc["num_hidden_layers"])
    text = {**tc, "model_type": "llama", "num_hidden_layers": n_total - len(cross)}
    text.pop("cross_attention_layers", None)
    args = MllamaArgs(
        text=text_args_from_hf_config(text),
        vision=VisionArgs(
            width=int(vc.get("hidden_size", 1280)), n_layers=int(vc.get("num_hidden_layers", 32)),
            n_global_layers=int(vc.get("num_global_layers", 8)),
            n_heads=int(vc.get("attention_heads", vc.get("num_attention_heads", 16))),
            mlp_dim=int(vc.get("intermediate_size", 5120)), image_size=int(vc.get("image_size", 448)),
            patch_size=int(vc.get("patch_size", 14)), in_channels=int(vc.get("num_channels", 3)),
            max_num_tiles=int(vc.get("max_num_tiles", 4)), norm_eps=float(vc.get("norm_eps", 1e-5)),
            intermediate_layers=tuple(vc.get("intermediate_layers_indices", (3, 7, 15, 23, 30))),
            aspect_ratios=tuple(tuple(r) for r in vc["supported_aspect_ratios"]) if vc.get("supported_aspect_ratios")
            else None,
        ),
        n_cross_layers=len(cross),
    )
    if args.hf_cross_layers != cross:
        raise ValueError(f"cross_attention_layers {cross} are not Meta's uniform schedule {args.hf_cross_layers} "
                         f"for {n_total} layers; herd implements only that schedule")
    if vc.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"vision_config.hidden_act {vc['hidden_act']!r}: herd's encoder uses exact 'gelu'")
    out_dim = vc.get("vision_output_dim")
    if out_dim is not None and int(out_dim) != args.vision.output_dim:
        raise ValueError(f"vision_output_dim {out_dim} != width x (1 + intermediate layers) = {args.vision.output_dim}")
    return args


def hf_config_from_args(args: MllamaArgs, *, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """config.json that transformers loads as MllamaForConditionalGeneration."""
    from herd.model.keymap import hf_config_from_args as text_config
    t, v = args.text, args.vision
    text = text_config(t, dtype=dtype)
    for k in ("architectures", "model_type", "transformers_version", "tie_word_embeddings", "head_dim",
              "attention_bias", "mlp_bias", "pretraining_tp", "torch_dtype", "attention_dropout"):
        text.pop(k, None)
    text.update(model_type="mllama_text_model", num_hidden_layers=t.n_layers + args.n_cross_layers,
                cross_attention_layers=args.hf_cross_layers, pad_token_id=128004 if t.vocab_size == 128256 else None,
                dropout=0, hidden_act="silu")
    vision = {
        "model_type": "mllama_vision_model", "hidden_size": v.width, "hidden_act": "gelu",
        "num_hidden_layers": v.n_layers, "num_global_layers": v.n_global_layers, "attention_heads": v.n_heads,
        "num_attention_heads": v.n_heads, "num_channels": v.in_channels, "intermediate_size": v.mlp_dim,
        "vision_output_dim": v.output_dim, "image_size": v.image_size, "patch_size": v.patch_size,
        "norm_eps": v.norm_eps, "max_num_tiles": v.max_num_tiles,
        "intermediate_layers_indices": list(v.intermediate_layers),
        "supported_aspect_ratios": [list(r) for r in v.aspect_ratios],
    }
    return {"architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama",
            "image_token_index": t.vocab_size, "text_config": text, "vision_config": vision,
            "torch_dtype": str(dtype).removeprefix("torch."), "transformers_version": "4.46.0"}


def meta_params_from_args(args: MllamaArgs) -> dict[str, Any]:
    from herd.model.keymap import meta_params_from_args as text_params
    params = text_params(args.text)
    params.update(vision_chunk_size=args.vision.image_size, vision_max_num_chunks=args.vision.max_num_tiles,
                  vision_num_cross_attention_layers=args.n_cross_layers)
    if args.vision != VisionArgs(image_size=args.vision.image_size, max_num_tiles=args.vision.max_num_tiles):
        # Meta's params.json has no vision fields beyond these; herd keeps the rest beside them.
        params["herd"]["vision"] = {**args.vision.__dict__}
    return params


def args_from_meta_params(params: Mapping[str, Any]) -> MllamaArgs:
    from herd.model.keymap import args_from_meta_params as text_args
    params = dict(params.get("model", params))
    chunk = int(params.pop("vision_chunk_size", -1))
    tiles = int(params.pop("vision_max_num_chunks", 4))
    n_cross = int(params.pop("vision_num_cross_attention_layers", -1))
    if chunk <= 0 or n_cross <= 0:
        raise ValueError("params.json has no vision_chunk_size / vision_num_cross_attention_layers: it is a text "
                         "model; load it with herd.model.formats.load_model")
    herd = dict(params.get("herd") or {})
    vision = herd.pop("vision", None)
    params["herd"] = herd
    if vision is not None:
        vargs = VisionArgs(**vision)
    else:
        vargs = VisionArgs(image_size=chunk, max_num_tiles=tiles)
    return MllamaArgs(text=text_args(params), vision=vargs, n_cross_layers=n_cross)


# ---- directories ---------------------------------------------------------------------------


def is_mllama_dir(path: str | os.PathLike) -> bool:
    """True for an HF config.json with model_type mllama or a params.json with vision fields."""
    root = Path(path)
    for name, test in (("config.json", lambda d: d.get("model_type") == "mllama"),
                       ("params.json", lambda d: d.get("model", d).get("vision_chunk_size", -1) > 0)):
        f = root / name
        if f.is_file():
            try:
                if test(json.loads(f.read_text())):
                    return True
            except (json.JSONDecodeError, AttributeError):
                return False
    return False


def read_mllama_args(path: str | os.PathLike) -> tuple[str, MllamaArgs, list[Path]]:
    """(format "hf" or "meta", args, weight files) of a vision checkpoint directory, from its config only."""
    root = Path(path)
    if (root / "config.json").is_file():
        try:
            args = args_from_hf_config(json.loads((root / "config.json").read_text()))
        except ValueError as e:
            raise ValueError(f"{root / 'config.json'}: {e}") from e
        return "hf", args, sorted(root.glob("model*.safetensors"))
    if (root / "params.json").is_file():
        return "meta", args_from_meta_params(json.loads((root / "params.json").read_text())), \
            sorted(root.glob("consolidated.*.pth"))
    raise FileNotFoundError(f"{root} has neither config.json (HF) nor params.json (Meta)")


def load_mllama(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu") -> Mllama:
    """Load an HF (config.json + model*.safetensors) or Meta (params.json + consolidated.00.pth) directory."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a checkpoint directory")
    if (root / "config.json").is_file():
        config = json.loads((root / "config.json").read_text())
        try:
            args = args_from_hf_config(config)
        except ValueError as e:
            raise ValueError(f"{root / 'config.json'}: {e}") from e
        files = sorted(root.glob("model*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{root} has config.json but no model*.safetensors")
        raw = _read_safetensors(files)  # mapped, not read into memory
        sd = from_hf_state_dict(raw, args)
    elif (root / "params.json").is_file():
        args = args_from_meta_params(json.loads((root / "params.json").read_text()))
        shards = sorted(root.glob("consolidated.*.pth"))
        if len(shards) != 1:
            raise ValueError(f"{root}: herd reads one-file Meta vision checkpoints (consolidated.00.pth); found "
                             f"{len(shards)} shards")
        sd = from_meta_state_dict(torch.load(shards[0], map_location="cpu", weights_only=True, mmap=True), args)
    else:
        raise FileNotFoundError(f"{root} has neither config.json (HF) nor params.json (Meta)")
    return _materialize(args, sd, dtype=dtype, device=device)


def _materialize(args: MllamaArgs, sd: dict[str, torch.Tensor], *, dtype: torch.dtype | None,
                 device: torch.device | str) -> Mllama:
    """Assign the (mapped) tensors into a model built on the meta device: no second copy of the weights."""
    dtype = dtype or sd["text_model.tok_embeddings.weight"].dtype
    with torch.device("meta"):
        model = Mllama(args)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    t = model.text_model
    t.freqs_cis = t._rope_table(torch.device(device))  # the RoPE table was built on the meta device
    return model


def save_mllama(model: Mllama, path: str | os.PathLike, *, format: str = "hf", overwrite: bool = False) -> Path:
    """Write an HF or Meta (single-file) checkpoint directory, atomically."""
    if format not in ("hf", "meta"):
        raise ValueError(f"format must be 'hf' or 'meta', got {format!r}")
    args = model.args
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    dtype = sd["text_model.tok_embeddings.weight"].dtype

    def write(tmp: Path) -> None:
        if format == "hf":
            (tmp / "config.json").write_text(json.dumps(hf_config_from_args(args, dtype=dtype), indent=2) + "\n")
            tensors = {k: v.contiguous() for k, v in to_hf_state_dict(sd, args).items()}
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            (tmp / "params.json").write_text(json.dumps(meta_params_from_args(args), indent=2) + "\n")
            torch.save(to_meta_state_dict(sd, args), tmp / "consolidated.00.pth")

    return atomic_dir(path, write, overwrite=overwrite)


__all__ = ["N_LEARNABLE_TOKENS", "from_hf_state_dict", "from_meta_state_dict", "hf_config_from_args", "load_mllama",
           "save_mllama", "to_hf_state_dict", "to_meta_state_dict"]
