"""Post-training quantization applied from outside the model: int8, int4 and FP8 row-wise.

    report = quantize(model, QuantConfig("int8"))     # swaps nn.Linear modules in place
    save_quantized(model, "out"); model = load_quantized("out")
    apply_cpu_kernels(model)                          # fp32 decode through herd's GEMV kernel,
                                                      # int4 repacked for its decode kernels

Schemes and their trade-offs:

* int8: weight-only, symmetric, one fp32 scale per output channel (gpt-fast's and torchao's
  int8 weight-only): 8 bits per weight plus one fp32 scale per row; activations keep the
  model's dtype.
* int4: weight-only, group-wise and *asymmetric* (w = q * s + m with q in 0..15, one fp16
  scale and min per group, default 32 inputs): 5.0 bits per weight, llama.cpp's Q4_1 in
  another nibble order, so GGUF Q4_0 / Q4_1 blocks map onto it exactly (`gguf_blocks`). The
  min costs nothing per weight in the kernel (it multiplies the group sum of x). Group 64 (4.5
  bits, Q4_0's size) was the default until it was measured on a trained model: on SmolLM2's
  tied head, whose Q8_0 weights lie on no 4-bit grid, group 64 matched Q4_0's weight error
  (relative RMS 0.112 vs 0.111) but cost more perplexity when only the head was quantized
  (+9.2% vs +7.6%), group 32 +6.1%; on the whole model group 64 lost to Q4_0 (+40% vs +25%).
  That is the checkpoint format; for CPU decode `apply_cpu_kernels` adds an in-memory copy
  in tiles of 8 interleaved rows (herd/kernels/int4_tiles.h, llama.cpp's REPACK idea), which
  decode reads at memory speed where the row layout was compute-bound (2-3x per GEMV).
* fp8: exactly the Llama 3 paper's section 6.2 and Meta's reference: e4m3 weights with one
  scale per output row, activations quantized per token with the abs-max clamped to 1200, only
  the feed-forward w1/w3/w2 of blocks 1..n-2. `torch._scaled_mm` on GPUs with FP8 tensor
  cores; an exact emulation (same quantized operands, fp32 products) elsewhere.

int8 and int4 quantize every linear layer of the blocks, and the output head to int8 by
default (`QuantConfig.head`: "int8", "same" or "float"). The head decides every next token,
and no later layer averages its error away: SmolLM2-135M at int4 picks fp32's top-1 token on
held-out Wikipedia at 85% of positions with an int4 head and 98% with an int8 one (perplexity
+6.1% vs +0.25%), while int8 costs 1.6x int4's bytes on a layer that is 17% of the weights a
3.2-1B reads per token. llama.cpp's 4-bit mixes make the same choice: Q4_0, Q4_1 and Q4_K_M store
`output.weight` (or a tied `token_embd.weight`) as Q6_K, or Q8_0 when the row length is not a
multiple of 256 (llama-quant.cpp). A tied embedding stays float: herd unties it.
GGUF files' Q4_0 / Q4_1 blocks map onto int4 at group 32 without loss (`gguf_blocks`).
"""

from herd.quant.apply import (
    HEADS,
    SCHEMES,
    QuantConfig,
    QuantReport,
    Scheme,
    apply_cpu_kernels,
    modules_to_quantize,
    quantization_plan,
    quantize,
    quantize_linear,
)
from herd.quant.checkpoint import (
    is_quantized_checkpoint,
    load_quantized,
    quantize_checkpoint,
    read_quant_config,
    save_quantized,
)
from herd.quant.linear import (
    ACTIVATION_SCALE_UB,
    CpuKernelLinear,
    Fp8Linear,
    Int4Linear,
    Int8Linear,
    quantize_fp8_rows,
    quantize_int4,
    quantize_int8,
)

__all__ = [
    "ACTIVATION_SCALE_UB",
    "HEADS",
    "SCHEMES",
    "CpuKernelLinear",
    "Fp8Linear",
    "Int4Linear",
    "Int8Linear",
    "QuantConfig",
    "QuantReport",
    "Scheme",
    "apply_cpu_kernels",
    "is_quantized_checkpoint",
    "load_quantized",
    "modules_to_quantize",
    "quantization_plan",
    "quantize",
    "quantize_checkpoint",
    "quantize_fp8_rows",
    "quantize_int4",
    "quantize_int8",
    "quantize_linear",
    "read_quant_config",
    "save_quantized",
]
