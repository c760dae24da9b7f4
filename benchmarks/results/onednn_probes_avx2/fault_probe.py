"""What the page faults of XLA's fresh buffers cost the ConvLSTM's forward at 256 px (RUN.md).

Each forward allocates its outputs and temporaries anew; glibc returns large freed blocks to the
kernel, so the next forward faults fresh zeroed pages in (about 65k 4 KiB pages per forward).
Here every allocation comes from one heap (one malloc arena, no mmap), and two arms alternate
in one process: "kept" leaves the freed pages with the process (no faults), "returned" gives
them back with malloc_trim(0) before the forward (faults as usual).

    python benchmarks/results/onednn_probes_avx2/fault_probe.py [ROUNDS]
"""

from __future__ import annotations

import ctypes
import pathlib
import resource
import sys
import time

LIBC = ctypes.CDLL(None)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
# Before JAX starts its threads: one arena, every block from the heap, nothing trimmed on free.
assert LIBC.mallopt(M_ARENA_MAX, 1) == 1 and LIBC.mallopt(M_MMAP_MAX, 0) == 1
assert LIBC.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))
from cac_jax.config_defaults import get_base_config  # noqa: E402
from cac_jax.models import build_model  # noqa: E402


def main(rounds: int = 10) -> None:
    config = get_base_config("calcium", "convlstm")
    config.model.conv_impl = "onednn"
    model = build_model(config)
    x = jax.random.uniform(jax.random.key(0), (16, 3, 256, 256, 1))
    variables = jax.jit(model.init)(jax.random.key(1), x[:1])
    forward = jax.jit(lambda v, x: model.apply(v, x)[0]).lower(variables, x).compile()
    for _ in range(2):
        forward(variables, x).block_until_ready()
    times = {"kept": [], "returned": []}
    faults = {"kept": [], "returned": []}
    for r in range(rounds):
        for arm in ("kept", "returned") if r % 2 else ("returned", "kept"):
            if arm == "returned":
                LIBC.malloc_trim(0)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            forward(variables, x).block_until_ready()
            times[arm].append(time.perf_counter() - start)
            faults[arm].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    ratio = np.array(times["returned"]) / np.array(times["kept"])
    for arm in times:
        print(f"{arm:9s} median {1e3 * np.median(times[arm]):.0f} ms, "
              f"{np.median(faults[arm]):.0f} page faults per forward")
    print(f"returned / kept per round: median {np.median(ratio):.3f} "
          f"(range {ratio.min():.3f}-{ratio.max():.3f}, {rounds} rounds)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
