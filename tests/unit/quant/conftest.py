"""The real SmolLM2 model in herd's names, shared by the quantization tests that need it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smol_float(smollm2_hf):
    """(ModelArgs, herd state dict) of transformers' fp32 reading of the SmolLM2 GGUF."""
    from herd.model.keymap import args_from_hf_config, from_hf_state_dict

    args = args_from_hf_config(smollm2_hf.model.config.to_dict())
    return args, from_hf_state_dict(smollm2_hf.model.state_dict(), args)
