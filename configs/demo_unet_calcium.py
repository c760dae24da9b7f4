"""`python -m cac_jax.main --config configs/demo_unet_calcium.py --workdir /tmp/demo_unet_calcium`

The demo's UNet calcium model (`make demo`): the UNet width-matched to the demo's half-width
ConvLSTM (configs/demo_convlstm_calcium.py: base width 12, about its parameter count), as
configs/unet_matched_calcium.py is to the full one. The demo sets the dataset, image size, steps
and time box on the command line (`--config.KEY=VALUE`).
Tiny test variant: `--config configs/demo_unet_calcium.py:local`
(configs/unet_matched_calcium.py:local).
"""

from cac_jax.config_defaults import get_base_config, parse_config_arg
from cac_jax.models.config import HALF_WIDTH_MATCHED_UNET_BASE_WIDTH


def get_config(arg: str | None = None):
    """Return the experiment ConfigDict; arg "local" gives the tiny 64 px variant.

    None or "" give the full config; any other arg raises ValueError.
    """
    local = parse_config_arg(arg)
    config = get_base_config("calcium", "unet", local=local)
    # The tiny variant is configs/unet_matched_calcium.py:local's (narrower than the tiny
    # standard UNet, as at full size).
    config.model.unet.base_width = 4 if local else HALF_WIDTH_MATCHED_UNET_BASE_WIDTH
    return config
