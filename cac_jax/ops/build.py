"""Build the oneDNN convolution extension: `python -m cac_jax.ops.build` (run by `make setup`).

Configures and builds `cac_jax/ops/csrc` with CMake against the XLA FFI headers jaxlib ships
(`jax.ffi.include_dir()`) and the oneDNN headers and library of the PyPI packages
`onednn-cpu-gomp` / `onednn-devel-cpu-gomp` (installed under the environment's include/ and lib/).
The library lands in `cac_jax/ops/_build/`. A failed build is not an error for set-up: it prints one
line and exits 0, and the models then use XLA's convolutions (docs/onednn.md).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
BUILD_DIR = Path(__file__).resolve().parent / "_build"
LIBRARY_NAME = "libcac_onednn_conv.so"


def dnnl_dirs() -> tuple[Path, Path]:
    """(include dir, library dir) of the oneDNN the environment's PyPI packages installed."""
    prefix = Path(sys.prefix)
    include, lib = prefix / "include", prefix / "lib"
    if not (include / "oneapi" / "dnnl" / "dnnl.hpp").is_file():
        raise FileNotFoundError(f"{include / 'oneapi/dnnl/dnnl.hpp'}: missing "
                                "(pip install onednn-devel-cpu-gomp)")
    if not (lib / "libdnnl.so").exists():
        raise FileNotFoundError(f"{lib / 'libdnnl.so'}: missing (pip install onednn-cpu-gomp)")
    return include, lib


def build(verbose: bool = False) -> Path:
    """Build the extension into BUILD_DIR and return the library's path (raises on failure)."""
    import jax.ffi

    include, lib = dnnl_dirs()
    cmake = shutil.which("cmake")
    if cmake is None:
        raise FileNotFoundError("cmake: not found on PATH")
    out = None if verbose else subprocess.PIPE
    with tempfile.TemporaryDirectory(prefix="cac_onednn_build_") as tmp:
        steps = [
            [cmake, "-S", str(SOURCE_DIR), "-B", tmp, "-DCMAKE_BUILD_TYPE=Release",
             f"-DXLA_FFI_INCLUDE_DIR={jax.ffi.include_dir()}", f"-DDNNL_INCLUDE_DIR={include}",
             f"-DDNNL_LIBRARY_DIR={lib}"],
            [cmake, "--build", tmp, "--parallel"],
        ]
        for step in steps:
            proc = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, text=True)
            if proc.returncode:
                lines = (proc.stdout or "").strip().splitlines()
                # The first compiler/CMake error leads (the notice prints the first line only).
                first = next((line.strip() for line in lines if "error" in line.lower()), "")
                raise RuntimeError(f"{' '.join(step[:2])} failed: {first}\n"
                                   + "\n".join(lines[-20:]))
        BUILD_DIR.mkdir(exist_ok=True)
        target = BUILD_DIR / LIBRARY_NAME
        partial = target.with_suffix(".so.partial")
        shutil.copyfile(Path(tmp) / LIBRARY_NAME, partial)
        partial.replace(target)  # atomic: a reader never sees half a library
    return target


def main(argv: list[str] | None = None) -> int:
    """Build; on failure print one line (the models fall back to XLA) unless --strict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strict", action="store_true", help="exit 1 when the build fails")
    parser.add_argument("--verbose", action="store_true", help="show CMake's output")
    args = parser.parse_args(argv)
    try:
        path = build(args.verbose)
    except (OSError, RuntimeError, ImportError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"oneDNN convolution extension not built ({first}); the models will use XLA's "
              "convolutions (docs/onednn.md)", file=sys.stderr)
        if args.verbose:
            print(err, file=sys.stderr)
        return 1 if args.strict else 0
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
