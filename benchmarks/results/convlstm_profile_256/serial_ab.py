"""One-off probe (RUN.md): the ConvLSTM forward with the oneDNN convolutions run one at a time
(a process-wide mutex in the extension) against XLA's own concurrency, interleaved rounds.
Needs the extension built with serial_probe.diff applied (`git apply`, then
`python -m cac_jax.ops.build`).

    python benchmarks/results/convlstm_profile_256/serial_ab.py [SIZE]
"""

import ctypes
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))
from cac_jax.config_defaults import get_base_config  # noqa: E402
from cac_jax.models import build_model  # noqa: E402
from cac_jax.ops import onednn_conv  # noqa: E402

onednn_conv.load()
lib = ctypes.CDLL(str(onednn_conv.LIBRARY))
size = int(sys.argv[1]) if len(sys.argv) > 1 else 256
config = get_base_config("calcium", "convlstm")
config.model.conv_impl = "onednn"
model = build_model(config)
x = jax.random.uniform(jax.random.key(0), (16, 3, size, size, 1))
v = jax.jit(model.init)(jax.random.key(1), x[:1])
f = jax.jit(lambda v, x: model.apply(v, x)[0]).lower(v, x).compile()
outs = {}
for mode in (1, 0):
    lib.cac_onednn_set_serial(mode)
    outs[mode] = np.asarray(f(v, x))
print("max difference", float(np.abs(outs[1] - outs[0]).max()))
ts = {1: [], 0: []}
for r in range(9):
    for mode in ((1, 0) if r % 2 else (0, 1)):
        lib.cac_onednn_set_serial(mode)
        t = time.perf_counter()
        f(v, x).block_until_ready()
        ts[mode].append(time.perf_counter() - t)
m1, m0 = np.median(ts[1]), np.median(ts[0])
print(f"{size} px: one at a time {m1 * 1e3:.0f} ms, concurrent {m0 * 1e3:.0f} ms, "
      f"speed-up of one at a time {m0 / m1:.3f}")
