"""`python -m cac_jax.main --config configs/demo_convlstm_heart.py --workdir /tmp/demo_convlstm_heart`

The demo's ConvLSTM-attention heart model (`make demo`): configs/convlstm_heart.py at half its widths
(a quarter of the FLOPs and parameters), which fits the demo's time box on a 2-core CPU. The demo
sets the dataset, image size, steps and time box on the command line (`--config.KEY=VALUE`).
Tiny test variant: `--config configs/demo_convlstm_heart.py:local` (configs/convlstm_heart.py:local).
"""

from cac_jax.config_defaults import get_base_config, parse_config_arg
from cac_jax.models.config import HALF_WIDTH_CONVLSTM


def get_config(arg: str | None = None):
    """Return the experiment ConfigDict; arg "local" gives the tiny 64 px variant.

    None or "" give the full config; any other arg raises ValueError.
    """
    local = parse_config_arg(arg)
    config = get_base_config("heart", "convlstm", local=local)
    if not local:
        config.model.convlstm.update(HALF_WIDTH_CONVLSTM)
    return config
