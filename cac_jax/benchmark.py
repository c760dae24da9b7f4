"""The paper's timing and memory study, and the JAX vs PyTorch comparison (`cac-jax bench`).

Protocol (paper, Methods "Timing"): N samples of 16 consecutive slices each; each model segments
every slice of a sample (one batch of 16 three-slice windows) and the wall time per sample is
recorded; the report gives median and IQR per model and the Wilcoxon rank-sum test between models
(`scipy.stats.ranksums`). The paper used N = 1024; the default here is small
(`DEFAULT_SAMPLES`) because UNet-64 at 512 px costs 1.5-2 s a slice on a 2-core CPU; N is stated
in every output. Samples are cut from a synthetic 512 px CAC study (`data_pipeline.phantom`) and
preprocessed by the same `data_pipeline.labels.model_inputs` that inference uses; that
preprocessing is timed separately, per study. Compilation (JAX `jit`, `torch.compile`) and the
first (warm-up) call are excluded from the per-sample times and reported on their own. Models are
built from the experiment configs (configs/*.py; `local=True` takes their tiny `:local`
variants), with untrained weights, and timed in interleaved rounds (sample i on every model, then
sample i + 1), so load from other processes hits all models alike.

Frameworks: "jax" (the Flax model under `jax.jit`) with its convolutions run by XLA ("jax_xla") and,
where the extension is built, by oneDNN through XLA FFI custom calls ("jax_onednn": the large 3x3
ones by Winograd's F(2x2, 3x3), as the models run on the CPU; "jax_onednn_direct": oneDNN's direct
algorithm only, PyTorch's kind of kernel; docs/onednn.md; `conv_impls` picks which), and "torch":
the PyTorch reference (`cac_jax.torch_ref`, the same function on the same weights) as eager NCHW
under `no_grad` ("torch_eager"), `inference_mode` + `channels_last` ("torch_channels_last"), and
that model under `torch.compile` ("torch_compile", where it compiles). Both use the same number of
threads (`threads` in the output). `results["jax"]` and `results["torch"]` are the fastest JAX and
PyTorch variants per model (the variant is named in the row).

Training step (`train_step=True`): the training loss of the model's config (focal loss with the
config's alpha and gamma, the ConvLSTM's temporal and spatial branch losses at
`train.aux_loss_weight`, the calcium task's candidate weighting: `cac_jax.steps.training_loss`;
PyTorch computes the same) and Adam (lr 1e-3), at `train_batch`. Memory: on
CPU, XLA's compiled memory analysis (JAX) and the resident-set growth while the step runs (both
frameworks); on a GPU the device's peak (`peak_bytes_in_use`; process-wide, so run one model per
process for exact per-model peaks, as benchmarks/gpu_check.sh does).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import platform
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipeline.constants import CALCIUM_THRESHOLD_HU
from data_pipeline.errors import InputError
from data_pipeline.labels import HU_WINDOW

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL_CONFIGS = {
    "convlstm": "convlstm_calcium.py",
    "unet64": "unet_calcium.py",
    "unet_matched": "unet_matched_calcium.py",
}
FRAMEWORKS = ("jax", "torch")
TORCH_VARIANTS = ("torch_eager", "torch_channels_last", "torch_compile")
# JAX variants: config.model.conv_impl of each (docs/onednn.md).
JAX_VARIANTS = {"jax_xla": "xla", "jax_onednn": "onednn", "jax_onednn_direct": "onednn_direct"}
DEFAULT_SAMPLES = 5
PAPER_SAMPLES = 1024
# Upper bounds of the settings (refused with one line above them). Samples are built one at a
# time (`StudySamples`), so N costs time, not memory; the bound keeps bench.json readable (every
# time is listed) at 100x the paper's N. Clinical CT slices are 512 px (a few 1024); the paper's
# samples are 16 slices. One sample at the largest size and slice count is 805 MB of inputs.
MAX_SAMPLES = 100 * PAPER_SAMPLES
MAX_SIZE = 1024
MAX_SLICES = 64
MAX_TRAIN_BATCH = 64
MATMUL_N = 2048


class BenchError(InputError):
    """A benchmark request that cannot run (unknown model, missing framework, bad size)."""


@dataclasses.dataclass
class BenchSettings:
    """What `run_bench` measures (the `cac-jax bench` options)."""

    models: tuple[str, ...] = tuple(MODEL_CONFIGS)
    frameworks: tuple[str, ...] = ("jax",)
    samples: int = DEFAULT_SAMPLES
    slices: int = 16
    size: int = 512
    train_step: bool = False
    train_batch: int = 2
    train_repeats: int = 3
    local: bool = False
    dtype: str = "float32"
    torch_compile: bool = True
    conv_impls: tuple[str, ...] = ("xla", "onednn")
    seed: int = 0

    def check(self) -> None:
        """Raise BenchError for settings that cannot run."""
        unknown = [m for m in self.models if m not in MODEL_CONFIGS]
        if unknown or not self.models:
            raise BenchError(None, f"unknown model(s) {unknown}: choose from {list(MODEL_CONFIGS)}")
        bad = [f for f in self.frameworks if f not in FRAMEWORKS]
        if bad or "jax" not in self.frameworks:
            raise BenchError(None, f"frameworks must include jax, from {list(FRAMEWORKS)}; got "
                                   f"{list(self.frameworks)}")
        if self.size < 16 or self.size % 16:
            raise BenchError(None, f"--size must be a positive multiple of 16, got {self.size}")
        for name in ("samples", "slices", "train_batch", "train_repeats"):
            if getattr(self, name) < 1:
                raise BenchError(None, f"--{name.replace('_', '-')} must be >= 1")
        for name, bound in (("samples", MAX_SAMPLES), ("size", MAX_SIZE),
                            ("slices", MAX_SLICES), ("train_batch", MAX_TRAIN_BATCH)):
            if getattr(self, name) > bound:
                raise BenchError(None, f"--{name.replace('_', '-')} must be at most {bound}, "
                                       f"got {getattr(self, name)}")
        if self.dtype not in ("float32", "bfloat16", "auto"):
            raise BenchError(None, f"--dtype must be float32, bfloat16 or auto, got {self.dtype}")
        bad = [c for c in self.conv_impls if c not in JAX_VARIANTS.values()]
        if bad or not self.conv_impls:
            raise BenchError(None, f"--conv-impls must name some of "
                                   f"{list(JAX_VARIANTS.values())}, got {list(self.conv_impls)}")
        if "torch" in self.frameworks and importlib.util.find_spec("torch") is None:
            raise BenchError(None, "--frameworks torch needs PyTorch: pip install -e .[torch]")


def jax_variants(settings: BenchSettings, log=print) -> dict[str, str]:
    """{variant: conv_impl} of the JAX variants to run (jax_onednn only where oneDNN loads)."""
    from cac_jax.ops import onednn_conv

    out = {}
    for variant, impl in JAX_VARIANTS.items():
        if impl not in settings.conv_impls:
            continue
        if impl != "xla" and onednn_conv.resolve_impl(impl) != impl:
            log(f"bench: {variant} left out (the oneDNN extension does not run here)")
            continue
        out[variant] = impl
    return out


def load_config(name: str, settings: BenchSettings, conv_impl: str = "xla"):
    """The experiment config of benchmark model `name` (configs/*.py), with the bench's dtype
    and convolution implementation."""
    from cac_jax.config_defaults import load_config_file  # imports JAX (the models' package)

    config = load_config_file(ROOT / "configs" / MODEL_CONFIGS[name],
                              "local" if settings.local else None)
    config.model.dtype = settings.dtype
    config.model.conv_impl = conv_impl
    config.data.image_size = settings.size
    return config


def threads() -> int:
    """CPU threads both frameworks use: the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info(frameworks: tuple[str, ...]) -> dict:
    """CPU model, cores, AVX-512, accelerator, threads and library versions."""
    import jax
    import psutil

    cpu_model, flags = platform.processor() or "unknown", set()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu_model in ("unknown", "x86_64", ""):
                cpu_model = value.strip()
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    devices = jax.devices()
    info = {
        "cpu_model": cpu_model,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "avx512": any(f.startswith("avx512") for f in flags) if flags else None,
        "avx512_flags": sorted(f for f in flags if f.startswith("avx512")),
        "memory_bytes": int(psutil.virtual_memory().total),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_backend": jax.default_backend(),
        "accelerator": None if devices[0].platform == "cpu" else
        f"{len(devices)} x {getattr(devices[0], 'device_kind', devices[0].platform)}",
        "threads": threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax": jax.__version__,
        "load_average_at_start": list(os.getloadavg()),
    }
    import flax

    info["flax"] = flax.__version__
    if "torch" in frameworks:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_mkldnn"] = bool(torch.backends.mkldnn.is_available())
        if torch.cuda.is_available():
            info["torch_accelerator"] = torch.cuda.get_device_name(0)
    return info


class StudySamples(Sequence):
    """The N benchmark samples of one synthetic study, each built when it is asked for.

    Sample i is `slices` consecutive model inputs (slices, 3, size, size, 1) float32 starting at
    a seeded random slice (wrapping only when the study is short). Only the study and the start
    slices are kept, so N costs no memory: at 512 px and 16 slices a sample is 50 MB, and the
    paper's N = 1024 built up front would be 51 GB.
    """

    def __init__(self, hu: np.ndarray, slices: int, count: int, seed: int):
        self.hu = hu
        self.slices = int(slices)
        nz = hu.shape[0]
        rng = np.random.default_rng(seed)
        self.firsts = rng.integers(0, max(nz - self.slices, 0) + 1, size=int(count))

    def __len__(self) -> int:
        return len(self.firsts)

    def __getitem__(self, index):
        from data_pipeline.labels import model_inputs

        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        first = int(self.firsts[index])
        centres = (first + np.arange(self.slices)) % self.hu.shape[0]
        return model_inputs(self.hu, centres)


def study_samples(settings: BenchSettings) -> tuple[StudySamples, dict]:
    """N samples of `slices` consecutive model inputs from a synthetic study (`StudySamples`,
    built one at a time), and the study's preprocessing time."""
    from data_pipeline.labels import model_inputs
    from data_pipeline.phantom import render_scan

    start = time.perf_counter()
    scan = render_scan(settings.seed, "cac", size=settings.size)
    render_s = time.perf_counter() - start
    hu = scan.volume.hu
    per_study = []
    for _ in range(3):
        start = time.perf_counter()
        model_inputs(hu)
        per_study.append(time.perf_counter() - start)
    nz = hu.shape[0]
    prep = {
        "what": "data_pipeline.labels.model_inputs on a whole study (3-slice windows, HU window)",
        "study_shape_zyx": list(hu.shape),
        "per_study_s": float(np.median(per_study)),
        "per_slice_s": float(np.median(per_study)) / nz,
        "synthetic_study_render_s": render_s,
    }
    return StudySamples(hu, settings.slices, settings.samples, settings.seed), prep


# ----------------------------------------------------------------------------------------- JAX

class JaxModel:
    """A model's jitted forward pass (compiled once for the sample shape) and its weights."""

    def __init__(self, name: str, settings: BenchSettings, conv_impl: str = "xla"):
        import jax
        import jax.numpy as jnp

        from cac_jax.models import build_model, count_params

        self.name, self.config = name, load_config(name, settings, conv_impl)
        self.model = build_model(self.config)
        shape = (settings.slices, 3, settings.size, settings.size, 1)
        # rbg keys: XLA:CPU compiles threefry-based init several times more slowly.
        self.variables = jax.jit(self.model.init)(jax.random.key(settings.seed, impl="rbg"),
                                                  jnp.zeros((1, *shape[1:]), jnp.float32))
        self.params = count_params(self.variables["params"])
        forward = jax.jit(lambda v, x: self.model.apply(v, x)[0])
        start = time.perf_counter()
        self.forward = forward.lower(self.variables, jax.ShapeDtypeStruct(shape, jnp.float32)
                                     ).compile()
        self.compile_s = time.perf_counter() - start

    def __call__(self, x: np.ndarray) -> None:
        import jax

        jax.block_until_ready(self.forward(self.variables, x))


def jax_train_step(jm: JaxModel, settings: BenchSettings, rss: RssSampler) -> dict:
    """Compile and time a training-loss + Adam step at `train_batch`; memory and forward time
    too."""
    import jax
    import jax.numpy as jnp
    import optax

    from cac_jax.steps import training_loss

    model, batch, size, config = jm.model, settings.train_batch, settings.size, jm.config
    tx = optax.adam(1e-3)

    def loss_fn(params, x, labels):
        logits, aux = model.apply({"params": params}, x)
        return training_loss(config, logits, aux, labels, jnp.ones(labels.shape, jnp.float32), x)

    def step(params, opt_state, x, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    x = jax.random.uniform(jax.random.key(1), (batch, 3, size, size, 1))
    labels = jax.random.randint(jax.random.key(2), (batch, size, size), 0,
                                int(jm.config.model.num_classes))
    params = jax.tree_util.tree_map(jnp.copy, jm.variables["params"])
    opt_state = tx.init(params)
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, x, labels).compile()
    compile_s = time.perf_counter() - start
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0]).lower(params, x).compile()
    memory = compiled.memory_analysis()
    analysis = {
        "temp": int(memory.temp_size_in_bytes), "argument": int(memory.argument_size_in_bytes),
        "output": int(memory.output_size_in_bytes),
        "alias": int(getattr(memory, "alias_size_in_bytes", 0)),
    }
    analysis["total"] = (analysis["temp"] + analysis["argument"] + analysis["output"]
                         - analysis["alias"])
    params, opt_state, loss = compiled(params, opt_state, x, labels)  # warm-up
    jax.block_until_ready(loss)
    step_times, forward_times = [], []
    with rss.track() as tracked:
        for _ in range(settings.train_repeats):
            start = time.perf_counter()
            params, opt_state, loss = compiled(params, opt_state, x, labels)
            jax.block_until_ready(loss)
            step_times.append(time.perf_counter() - start)
    jax.block_until_ready(forward(params, x))  # warm-up
    for _ in range(settings.train_repeats):
        start = time.perf_counter()
        jax.block_until_ready(forward(params, x))
        forward_times.append(time.perf_counter() - start)
    out = {
        "batch": batch, "step_s": float(np.median(step_times)), "step_s_all": step_times,
        "forward_s": float(np.median(forward_times)), "compile_s": compile_s,
        "loss_finite": bool(np.isfinite(float(loss))), "xla_memory_analysis": analysis,
        **tracked,
    }
    out["step_over_forward"] = out["step_s"] / out["forward_s"]
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        out["device_peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
        out["peak_memory_bytes"] = out["device_peak_bytes_in_use"]
        out["peak_memory_source"] = "device peak_bytes_in_use (process-wide)"
    else:
        out["peak_memory_bytes"] = analysis["total"]
        out["peak_memory_source"] = "XLA memory analysis of the compiled step"
    return out


# --------------------------------------------------------------------------------------- torch

class TorchModel:
    """The PyTorch twin of a JaxModel (same weights) in one of the TORCH_VARIANTS."""

    def __init__(self, jm: JaxModel, variant: str, settings: BenchSettings):
        import torch

        from cac_jax.torch_ref import from_flax

        self.variant, self.settings = variant, settings
        self.num_classes = int(jm.config.model.num_classes)
        self.config = jm.config
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.channels_last = variant in ("torch_channels_last", "torch_compile")
        model = from_flax(jm.config, jm.variables["params"]).eval().to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.eager_model = model
        self.model = torch.compile(model) if variant == "torch_compile" else model
        self.compile_s = 0.0  # torch.compile compiles lazily: its cost shows in the warm-up

    def _input(self, x: np.ndarray):
        import torch

        xt = torch.from_numpy(np.ascontiguousarray(x[..., 0])).to(self.device)
        return xt.contiguous(memory_format=torch.channels_last) if self.channels_last else xt

    def _autocast(self):
        import contextlib

        import torch

        if self.settings.dtype == "bfloat16" or (self.settings.dtype == "auto"
                                                 and self.device.type == "cuda"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __call__(self, x: np.ndarray) -> None:
        import torch

        guard = torch.no_grad() if self.variant == "torch_eager" else torch.inference_mode()
        with guard, self._autocast():
            self.model(self._input(x))
        self._sync()

    def train_step(self, settings: BenchSettings, rss: RssSampler) -> dict:
        """Focal loss + Adam step at `train_batch` (eager; torch.compile is not timed here)."""
        import torch
        import torch.nn.functional as F

        model = self.eager_model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(1)
        b, size = settings.train_batch, settings.size
        x = self._input(torch.rand((b, 3, size, size, 1), generator=gen).numpy())
        labels = torch.randint(0, self.num_classes, (b, size, size), generator=gen).to(self.device)

        # The training loss of `cac_jax.steps.training_loss`, as JAX times it.
        train = self.config.train
        alpha = torch.tensor([float(a) for a in train.focal_alpha], device=self.device)
        gamma, aux_weight = float(train.focal_gamma), float(train.aux_loss_weight)
        weight = torch.ones((b, size, size), device=self.device)
        factor = float(train.get("non_candidate_weight", 1.0))
        if self.config.task == "calcium" and factor != 1.0:
            low, high = HU_WINDOW
            centre = x[:, 1]  # (b, H, W): the centre slice of the 3-slice input
            candidate = centre >= (CALCIUM_THRESHOLD_HU - low) / (high - low)
            weight = torch.where(candidate, 1.0, factor)

        def focal(logits):
            log_pt = F.log_softmax(logits.float(), dim=1).gather(1, labels[:, None])[:, 0]
            per_pixel = -torch.pow(-torch.expm1(log_pt), gamma) * log_pt * alpha[labels]
            return torch.sum(per_pixel * weight) / weight.sum().clamp_min(1e-12)

        def one_step():
            opt.zero_grad(set_to_none=True)
            with self._autocast():
                logits, aux = model(x)
            loss = focal(logits)
            for branch in ("temporal", "spatial"):
                if branch in aux:
                    loss = loss + aux_weight * focal(aux[branch])
            loss.backward()
            opt.step()
            self._sync()
            return float(loss.detach())

        one_step()  # warm-up (allocator, oneDNN primitives)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        with rss.track() as tracked:
            for _ in range(settings.train_repeats):
                start = time.perf_counter()
                loss = one_step()
                times.append(time.perf_counter() - start)
        forward_times = []
        with torch.no_grad():
            for _ in range(settings.train_repeats + 1):  # the first is a warm-up
                start = time.perf_counter()
                with self._autocast():
                    model(x)
                self._sync()
                forward_times.append(time.perf_counter() - start)
        forward_times = forward_times[1:]
        model.eval()
        out = {"batch": b, "step_s": float(np.median(times)), "step_s_all": times,
               "forward_s": float(np.median(forward_times)), "loss_finite": bool(np.isfinite(loss)),
               **tracked}
        out["step_over_forward"] = out["step_s"] / out["forward_s"]
        if self.device.type == "cuda":
            out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
            out["peak_memory_source"] = "torch.cuda.max_memory_allocated"
        else:
            out["peak_memory_bytes"] = tracked["rss_increase_bytes"]
            out["peak_memory_source"] = "resident-set growth during the step"
        return out


class RssSampler:
    """Samples this process's resident set size in a thread while a block runs."""

    def __init__(self, interval_s: float = 0.002):
        import psutil

        self.proc, self.interval_s = psutil.Process(), interval_s

    def track(self):
        """Context manager yielding a dict filled on exit: rss_before, rss_peak, rss_increase."""
        import contextlib

        @contextlib.contextmanager
        def tracker():
            result: dict = {}
            before = self.proc.memory_info().rss
            peak, done = [before], threading.Event()

            def sample():
                while not done.is_set():
                    peak[0] = max(peak[0], self.proc.memory_info().rss)
                    time.sleep(self.interval_s)

            thread = threading.Thread(target=sample, daemon=True)
            thread.start()
            try:
                yield result
            finally:
                done.set()
                thread.join()
                peak[0] = max(peak[0], self.proc.memory_info().rss)
                result.update(rss_before_bytes=int(before), rss_peak_bytes=int(peak[0]),
                              rss_increase_bytes=int(peak[0] - before))

        return tracker()


# ------------------------------------------------------------------------------------- the run

def _summary(times: list[float]) -> dict:
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    return {"median_s": float(med), "iqr_s": float(q3 - q1), "q1_s": float(q1), "q3_s": float(q3),
            "n": len(times), "times_s": [float(t) for t in times]}


def matmul_peak_gflops(n: int = MATMUL_N, repeats: int = 5) -> float:
    """float32 (n x n) matmul throughput under JAX (GFLOP/s), the machine's reference peak."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda m: m @ m).lower(a).compile()
    jax.block_until_ready(f(a))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(a))
        times.append(time.perf_counter() - start)
    return 2 * n**3 / float(np.median(times)) / 1e9


def run_bench(settings: BenchSettings, log=print) -> dict:
    """Run the study; returns the bench.json dict (see the module docstring)."""
    settings.check()
    from scipy import stats

    want_torch = "torch" in settings.frameworks
    if want_torch:
        import torch

        torch.set_num_threads(threads())  # the same threads as XLA:CPU's pool
    result: dict[str, Any] = {
        "settings": dataclasses.asdict(settings),
        "protocol": (f"{settings.samples} samples of {settings.slices} consecutive slices at "
                     f"{settings.size} px (the paper: {PAPER_SAMPLES} samples of 16 slices); "
                     "time per sample; compilation and warm-up excluded (reported separately)"),
        "machine": machine_info(settings.frameworks),
    }
    log(f"bench: {result['protocol']}")
    samples, result["preprocessing"] = study_samples(settings)
    log(f"bench: preprocessing {result['preprocessing']['per_study_s']:.3f} s per study")
    # A smaller matmul for the tiny :local runs (tests): well below peak, but seconds faster.
    result["matmul_n"] = matmul_n = 256 if settings.local else MATMUL_N
    result["matmul_peak_gflops_before"] = matmul_peak_gflops(matmul_n)

    runners: dict[str, dict[str, Any]] = {}
    warmup: dict[str, dict[str, dict]] = {}
    errors: dict[str, dict[str, str]] = {}
    jax_models = {}  # the first JAX variant's models: their weights are every variant's
    variants_jax = jax_variants(settings, log)
    for variant, impl in variants_jax.items():
        runners[variant], warmup[variant] = {}, {}
        for name in settings.models:
            log(f"bench: [{variant}] {name}: build and compile")
            jm = JaxModel(name, settings, impl)
            start = time.perf_counter()
            jm(samples[0])
            warmup[variant][name] = {"compile_s": jm.compile_s,
                                     "warmup_s": time.perf_counter() - start}
            runners[variant][name] = jm
            jax_models.setdefault(name, jm)
    if want_torch:
        variants = [v for v in TORCH_VARIANTS if settings.torch_compile or v != "torch_compile"]
        for variant in variants:
            runners[variant], warmup[variant] = {}, {}
            for name in settings.models:
                log(f"bench: [{variant}] {name}: build and warm up")
                try:
                    tm = TorchModel(jax_models[name], variant, settings)
                    start = time.perf_counter()
                    tm(samples[0])
                    warmup[variant][name] = {"compile_s": tm.compile_s,
                                             "warmup_s": time.perf_counter() - start}
                    runners[variant][name] = tm
                except Exception as err:  # torch.compile needs a working C++ toolchain
                    errors.setdefault(variant, {})[name] = f"{type(err).__name__}: {err}"[:500]
                    log(f"bench: [{variant}] {name} failed, left out: {errors[variant][name]}")

    times = {fw: {name: [] for name in r} for fw, r in runners.items()}
    for i, x in enumerate(samples):
        log(f"bench: sample {i + 1}/{len(samples)}")
        for fw, models in runners.items():
            for name, runner in models.items():
                start = time.perf_counter()
                runner(x)
                times[fw][name].append(time.perf_counter() - start)
    result["matmul_peak_gflops_after"] = matmul_peak_gflops(matmul_n)

    results = {fw: {name: {**_summary(t), "per_slice_median_s": float(np.median(t)) /
                           settings.slices, **warmup[fw][name]}
                    for name, t in models.items()} for fw, models in times.items()}
    results["jax"] = best_variant(results, "jax_", settings.models)
    if want_torch:
        results["torch"] = best_variant(results, "torch_", settings.models)
    result["results"] = results
    result["compile_errors"] = errors
    for models in results.values():
        for name, r in models.items():
            r["params"] = jax_models[name].params
    result["wilcoxon_p"] = {
        fw: {f"{a}_vs_{b}": float(stats.ranksums(times_of(results, fw, a),
                                                 times_of(results, fw, b)).pvalue)
             for i, a in enumerate(models) for b in list(models)[i + 1:]}
        for fw, models in results.items() if len(models) > 1
    }
    result["ratios"] = ratios(results)

    if settings.train_step:
        rss = RssSampler()
        train: dict[str, dict] = {}
        for variant in variants_jax:
            train[variant] = {}
            for name in settings.models:
                log(f"bench: [{variant}] {name}: training step")
                train[variant][name] = jax_train_step(runners[variant][name], settings, rss)
        train["jax"] = best_variant(train, "jax_", settings.models, "step_s")
        if want_torch:
            for variant in ("torch_eager", "torch_channels_last"):
                train[variant] = {}
                for name in settings.models:
                    log(f"bench: [{variant}] {name}: training step")
                    tm = TorchModel(jax_models[name], variant, settings)
                    train[variant][name] = tm.train_step(settings, rss)
            train["torch"] = {}
            for name in settings.models:
                variant = min(("torch_eager", "torch_channels_last"),
                              key=lambda v, n=name: train[v][n]["step_s"])
                train["torch"][name] = {**train[variant][name], "variant": variant}
        result["train_step"] = train
        result["train_ratios"] = {
            name: {f"{v}_step_speedup_vs_best_torch": train["torch"][name]["step_s"]
                   / train[v][name]["step_s"] for v in ("jax", *variants_jax)}
            for name in settings.models if "torch" in train}
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    return result


def best_variant(results: dict, prefix: str, models, key: str = "median_s") -> dict:
    """{model: the row of the fastest variant named `prefix`*, with "variant" added}."""
    best = {}
    for name in models:
        candidates = [(results[v][name][key], v) for v in results
                      if v.startswith(prefix) and name in results[v]]
        if candidates:
            _, variant = min(candidates)
            best[name] = {**results[variant][name], "variant": variant}
    return best


def times_of(results: dict, fw: str, name: str) -> list[float]:
    """The per-sample times of `name` under framework key `fw`."""
    return results[fw][name]["times_s"]


def ratios(results: dict) -> dict:
    """ConvLSTM / UNet time ratios within each framework; JAX speed-up over the best PyTorch."""
    out: dict[str, Any] = {}
    for fw, models in results.items():
        if "convlstm" in models:
            for other in ("unet64", "unet_matched"):
                if other in models:
                    out.setdefault(fw, {})[f"{other}_over_convlstm_time"] = (
                        models[other]["median_s"] / models["convlstm"]["median_s"])
    if "torch" in results:
        out["jax_speedup_vs_best_torch"] = {
            name: results["torch"][name]["median_s"] / results["jax"][name]["median_s"]
            for name in results["torch"]}
        out["jax_speedup_vs_torch_variant"] = {
            v: {name: results[v][name]["median_s"] / results["jax"][name]["median_s"]
                for name in results[v]}
            for v in results if v.startswith("torch_")}
        out["jax_variant_speedup_vs_best_torch"] = {
            v: {name: results["torch"][name]["median_s"] / results[v][name]["median_s"]
                for name in results[v] if name in results["torch"]}
            for v in results if v.startswith("jax_")}
    if "jax_xla" in results and "jax_onednn" in results:
        out["onednn_speedup_vs_xla"] = {
            name: results["jax_xla"][name]["median_s"] / results["jax_onednn"][name]["median_s"]
            for name in results["jax_onednn"] if name in results["jax_xla"]}
    return out





def write_outputs(res: dict, out_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """bench.json, bench.md and bench.png in `out_dir` (`cac_jax.benchmark_report`)."""
    from cac_jax.benchmark_report import write_outputs as write

    return write(res, out_dir)
