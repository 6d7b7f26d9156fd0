"""FP8 training through torchao's `Float8Linear` (tensor-wise or row-wise scaling).

Linear layers compute their matmuls in float8 with dynamic scales; weights, gradients and
the optimizer stay in high precision. Tensor-wise scaling (one scale per tensor) is the
fastest and lets FSDP gather weights in float8; row-wise scaling (one per row) is more
accurate under outliers, which is why the paper's FP8 inference uses row-wise scales.

The output head stays in high precision (its logits feed the loss directly), and layers
whose sizes are not multiples of 16 cannot use the FP8 matmul kernels. Conversion runs on the
meta-device model before any other parallelism is applied. `emulate=True` computes the
same float8 rounding with high-precision matmuls, for CPUs and GPUs older than SM 8.9.
"""

from __future__ import annotations

import dataclasses

from torch import nn

FLOAT8_RECIPES = ("none", "tensorwise", "rowwise")


def _float8_ok(module: nn.Module, fqn: str) -> bool:
    if not isinstance(module, nn.Linear):
        return False
    if fqn == "output" or fqn.endswith(".output"):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def apply_float8(model: nn.Module, *, recipe: str, emulate: bool = False) -> int:
    """Swap eligible `nn.Linear`s for torchao `Float8Linear`s in place; return how many."""
    if recipe not in FLOAT8_RECIPES:
        raise ValueError(f"unknown float8 recipe {recipe!r}; use one of {', '.join(FLOAT8_RECIPES)}")
    if recipe == "none":
        return 0
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ValueError("float8 training needs torchao: pip install 'herd[parallel]'") from e

    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        config = dataclasses.replace(config, emulate=True)
    eligible = [fqn for fqn, m in model.named_modules() if _float8_ok(m, fqn)]
    convert_to_float8_training(model, config=config, module_filter_fn=_float8_ok)
    return len(eligible)
