"""The PyTorch reference (cac_jax.torch_ref) computes the Flax models' function on their weights.

Skipped when PyTorch is not installed (the optional extra: pip install -e .[torch]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed (pip install -e .[torch])")

from cac_jax.models import build_model, count_params  # noqa: E402
from cac_jax.models.config import model_config  # noqa: E402
from cac_jax.torch_ref import build_torch_model, from_flax  # noqa: E402
from cac_jax.torch_ref import count_params as torch_count_params  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Parity needs no speed; one thread avoids OpenMP barrier stalls on a loaded shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(arch: str, local: bool, base_width: int | None = None, bidirectional=False):
    cfg = model_config(arch, "calcium", local=local)
    cfg.dtype = "float32"
    if base_width is not None:
        cfg.unet.base_width = base_width
    cfg.convlstm.bidirectional = bidirectional
    return cfg


@pytest.mark.parametrize("arch,base_width", [("convlstm", None), ("unet", None), ("unet", 24)])
def test_full_size_parameter_counts_are_identical(arch, base_width):
    """Default (512 px) widths: the same number of parameters in both frameworks."""
    cfg = _config(arch, local=False, base_width=base_width)
    shapes = jax.eval_shape(build_model(cfg).init, jax.random.key(0),
                            jnp.zeros((1, 3, 64, 64, 1)))
    assert torch_count_params(build_torch_model(cfg)) == count_params(shapes["params"])


@pytest.mark.parametrize("arch,bidirectional", [("convlstm", False), ("convlstm", True),
                                                ("unet", False)])
def test_logits_agree_on_the_same_weights(arch, bidirectional):
    cfg = _config(arch, local=True, bidirectional=bidirectional)
    model = build_model(cfg)
    x = jax.random.uniform(jax.random.key(1), (2, 3, 64, 64, 1))
    # rbg keys: XLA:CPU compiles a threefry-based init many times more slowly.
    variables = jax.jit(model.init)(jax.random.key(2, impl="rbg"), x)
    # Non-trivial norm parameters and biases, so their mapping is exercised too.
    # (numpy draws: a jax.random call per leaf shape would compile one function each.)
    leaves, treedef = jax.tree_util.tree_flatten(variables["params"])
    rng = np.random.default_rng(3)
    leaves = [np.asarray(leaf) + np.float32(0.1) * rng.standard_normal(leaf.shape, np.float32)
              for leaf in leaves]
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    logits, aux = jax.jit(model.apply)({"params": params}, x)

    tmodel = from_flax(cfg, params).eval()
    assert torch_count_params(tmodel) == count_params(params)
    with torch.inference_mode():
        tlogits, taux = tmodel(torch.from_numpy(np.array(x[..., 0])))
    scale = float(np.abs(np.asarray(logits)).max())
    np.testing.assert_allclose(tlogits.permute(0, 2, 3, 1).numpy(), np.asarray(logits),
                               atol=2e-5 * max(scale, 1.0), rtol=1e-4)
    for name in aux:  # temporal, spatial, attention
        np.testing.assert_allclose(taux[name].permute(0, 2, 3, 1).numpy(), np.asarray(aux[name]),
                                   atol=2e-5 * max(scale, 1.0), rtol=1e-4)


def test_batchnorm_models_are_refused():
    cfg = _config("unet", local=True)
    cfg.norm = "batch"
    with pytest.raises(ValueError, match="GroupNorm"):
        build_torch_model(cfg)
