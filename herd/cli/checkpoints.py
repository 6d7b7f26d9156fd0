"""`herd convert`, `quantize`, `export`: commands that write a checkpoint.

Each refuses an existing output before reading its input (`herd.io.refuse_existing`); the
library writers check again when they write, so this is about failing early, not about safety.
"""

from __future__ import annotations

from herd.cli.common import add_output_args
from herd.io import refuse_existing


def cmd_convert(opts) -> None:
    from herd.train.export import convert_checkpoint

    refuse_existing(opts.dst, overwrite=opts.overwrite)
    out = convert_checkpoint(opts.src, opts.dst, to=opts.to, qtype=opts.qtype, num_shards=opts.num_shards,
                             overwrite=opts.overwrite)
    print(f"wrote {opts.to if opts.to != 'gguf' else 'GGUF ' + opts.qtype} checkpoint to {out}")


def cmd_quantize(opts) -> None:
    from herd.quant import QuantConfig, quantize_checkpoint
    from herd.tokenizer.files import gguf_tokenizer_files

    refuse_existing(opts.out, overwrite=opts.overwrite)
    config = QuantConfig(opts.scheme, group_size=opts.group_size, activations=opts.activations, head=opts.head)
    # herd.quant may not import the tokenizer package, so a GGUF source's tokenizer files are made
    # here and handed over; a directory's are copied by quantize_checkpoint itself.
    extra = gguf_tokenizer_files(opts.path) if opts.path.endswith(".gguf") else None
    report = quantize_checkpoint(opts.path, opts.out, config, overwrite=opts.overwrite, extra_files=extra)
    print(f"quantized {len(report.modules)} linear layers to {report.scheme} (output head: {report.head}): "
          f"{report.bytes_before / 2**20:,.1f} MiB -> {report.bytes_after / 2**20:,.1f} MiB; wrote {opts.out}")


def cmd_export(opts) -> None:
    from herd.train import export_checkpoint

    refuse_existing(opts.out, overwrite=opts.overwrite)
    out = export_checkpoint(opts.checkpoint, opts.out, format=opts.format, tokenizer=opts.tokenizer,
                            overwrite=opts.overwrite)
    print(f"wrote {opts.format} checkpoint to {out}")


def _convert_args(p):
    p.add_argument("src", help="checkpoint directory (HF, Meta) or .gguf file")
    add_output_args(p, name="dst", help="directory to write (hf, meta) or .gguf file (gguf)")
    p.add_argument("--to", choices=("hf", "meta", "gguf"), required=True)
    p.add_argument("--qtype", choices=("F32", "F16", "Q8_0", "Q4_0"), default="F16", help="GGUF weight type")
    p.add_argument("--num-shards", type=int, default=1, help="Meta model-parallel files to split into")


def _quantize_args(p):
    p.add_argument("path", help="float checkpoint: HF or Meta directory, or .gguf file (its Q4_0/Q4_1 blocks are kept)")
    add_output_args(p, help="directory to write (quant_config.json + model.safetensors + tokenizer)")
    p.add_argument("--scheme", choices=("int8", "int4", "fp8"), required=True,
                   help="int8: per-channel; int4: asymmetric groups; fp8: the paper's FFN-only row-wise rule")
    p.add_argument("--group-size", type=int, default=32, help="int4 inputs per scale/min pair")
    p.add_argument("--activations", choices=("float", "int8"), default="float",
                   help="CPU decode with int8/int4 weights: float keeps activations exact; int8 quantizes them "
                        "per block of 32 for integer dot products (faster, a small bounded error)")
    p.add_argument("--head", choices=("int8", "same", "float"), help="output head: int8 (default for int8/int4), "
                   "same (the scheme's own format), float; fp8 never quantizes it")


def _export_args(p):
    p.add_argument("checkpoint", help="a run directory (its newest good checkpoint) or checkpoints/step-N")
    add_output_args(p, help="directory to write")
    p.add_argument("--format", choices=("hf", "meta"), default="hf", help="directory layout to write")
    p.add_argument("--tokenizer", help="tokenizer.model to copy beside the weights (default: the run's)")


COMMANDS = {
    "convert": (cmd_convert, "convert a checkpoint between HF, Meta and GGUF formats", _convert_args),
    "quantize": (cmd_quantize, "quantize a checkpoint to int8, int4 or FP8 (with scales, safetensors)",
                 _quantize_args),
    "export": (cmd_export, "export a training checkpoint as an HF or Meta directory", _export_args),
}
