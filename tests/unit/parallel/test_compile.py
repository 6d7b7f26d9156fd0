"""torch.compile per block (the third step of the documented order) changes no numbers.

Compiling four tiny blocks takes ~30-60 s on two cores, so this is the one compile test.
"""

import pytest
import torch

from herd.model import ModelArgs
from herd.model.llama import Transformer, build_model
from herd.parallel import ParallelConfig, parallelize

ARGS = ModelArgs.from_name("debug", n_layers=2)


def _grads(config: ParallelConfig, state, inputs, targets):
    with torch.device("meta"):
        model = Transformer(ARGS)
    pm = parallelize(model, config, None)
    pm.load_full_state_dict(state, device="cpu")
    losses = [float(pm.forward_backward(inputs, targets).loss) for _ in range(2)]  # 2nd call: no recompile
    clean = lambda n: n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")  # noqa: E731
    return pm, losses, {clean(n): p.grad for n, p in pm.named_parameters()}


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    state = build_model(ARGS, seed=0).state_dict()
    g = torch.Generator().manual_seed(0)
    inputs, targets = torch.randint(0, 256, (2, 32), generator=g), torch.randint(0, 256, (2, 32), generator=g)
    _, eager_losses, eager = _grads(ParallelConfig(ac="selective"), state, inputs, targets)
    pm, losses, compiled = _grads(ParallelConfig(ac="selective", compile=True), state, inputs, targets)
    assert set(pm.module.state_dict()) == set(state)  # in-place compile adds no `_orig_mod` to names
    assert losses == pytest.approx(eager_losses, abs=1e-5)
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=0, atol=1e-5)
