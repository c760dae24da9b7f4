"""`python -m cac_jax.main --config configs/convlstm_calcium.py --workdir /tmp/convlstm_calcium`

ConvLSTM-attention calcium segmenter (the paper's model B: background, coronary, non-coronary calcium).
Tiny test variant: `--config configs/convlstm_calcium.py:local` (64 px, narrow widths).
"""

from cac_jax.config_defaults import get_base_config, parse_config_arg


def get_config(arg: str | None = None):
    """Return the experiment ConfigDict; arg "local" gives the tiny 64 px variant.

    None or "" give the full config; any other arg raises ValueError.
    """
    return get_base_config("calcium", "convlstm", local=parse_config_arg(arg))
