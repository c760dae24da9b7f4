"""`python -m cac_jax.main --config configs/demo_unet_heart.py --workdir /tmp/demo_unet_heart`

The demo's UNet heart model (`make demo`): configs/unet_heart.py width-matched to the demo's
half-width ConvLSTM (configs/demo_convlstm_heart.py: base width 12, about its parameter count).
The demo sets the dataset, image size, steps and time box on the command line
(`--config.KEY=VALUE`).
Tiny test variant: `--config configs/demo_unet_heart.py:local` (configs/unet_heart.py:local).
"""

from cac_jax.config_defaults import get_base_config, parse_config_arg
from cac_jax.models.config import HALF_WIDTH_MATCHED_UNET_BASE_WIDTH


def get_config(arg: str | None = None):
    """Return the experiment ConfigDict; arg "local" gives the tiny 64 px variant.

    None or "" give the full config; any other arg raises ValueError.
    """
    local = parse_config_arg(arg)
    config = get_base_config("heart", "unet", local=local)
    if not local:
        config.model.unet.base_width = HALF_WIDTH_MATCHED_UNET_BASE_WIDTH
    return config
