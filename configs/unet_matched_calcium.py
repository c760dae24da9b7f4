"""`python -m cac_jax.main --config configs/unet_matched_calcium.py --workdir /tmp/unet_matched_calcium`

Width-matched UNet for calcium segmentation: the UNet baseline with its base width chosen so its
parameter count is about the default ConvLSTM-attention model's (base 24: 4.37 M vs 4.35 M
parameters, benchmarks/results/bench_models.md), so the paper's comparison can be reported both
against the standard UNet (configs/unet_calcium.py) and at matched size.
Tiny test variant: `--config configs/unet_matched_calcium.py:local`.
"""

from cac_jax.config_defaults import get_base_config, parse_config_arg
from cac_jax.models.config import MATCHED_UNET_BASE_WIDTH


def get_config(arg: str | None = None):
    """Return the experiment ConfigDict; arg "local" gives the tiny 64 px variant.

    None or "" give the full config; any other arg raises ValueError.
    """
    local = parse_config_arg(arg)
    config = get_base_config("calcium", "unet", local=local)
    # The tiny variant is narrower than the tiny standard UNet, as at full size.
    config.model.unet.base_width = 4 if local else MATCHED_UNET_BASE_WIDTH
    return config
