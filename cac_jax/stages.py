"""Stage stamps shared by the demo and the study (`cac_jax.demo`, `cac_jax.study`).

Each stage of a run stamps the settings it ran with in OUT/.stamps/STAGE.json; a stage whose stamp
equals what it would do now (config keys added since at their neutral value, and keys that only
choose how the same computation runs, count as absent) is reused instead of run again.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from data_pipeline.atomic import atomic_write_text


def _say(message: str) -> None:
    print(message, flush=True)


class _Stamps:
    """Per-stage settings stamps: a stage is reused when its stamp equals what it would do now."""

    def __init__(self, out: Path):
        self.folder = out / ".stamps"

    def fresh(self, stage: str, wanted: dict, *outputs: Path) -> bool:
        return self.same(stage, wanted) and all(path.exists() for path in outputs)

    def same(self, stage: str, wanted: dict) -> bool:
        """Whether the stage's stamp equals `wanted` (config keys added since at their neutral
        value, `ADDED_KEYS`, count as absent)."""
        stamp = self.folder / f"{stage}.json"
        return stamp.exists() and (_comparable(json.loads(stamp.read_text()))
                                   == _comparable(wanted))

    def continues(self, stage: str, wanted: dict, keys: Sequence[str]) -> bool:
        """Whether the stage's stamp differs from `wanted` only in `--config.` overrides of
        `keys`: settings a training run may be continued under (its length, its stop rule)."""
        stamp = self.folder / f"{stage}.json"
        if not stamp.exists():
            return False

        def without(stamp: dict) -> dict:
            stamp = dict(_comparable(stamp))
            stamp["overrides"] = [item for item in stamp.get("overrides", [])
                                  if item.partition("=")[0] not in keys]
            return stamp

        return without(json.loads(stamp.read_text())) == without(wanted)

    def mark(self, stage: str, wanted: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / f"{stage}.json", json.dumps(wanted, sort_keys=True))

    def clear(self, stage: str) -> None:
        (self.folder / f"{stage}.json").unlink(missing_ok=True)


def _stage(stamps: _Stamps, name: str, wanted: dict, outputs: Sequence[Path], fn) -> bool:
    """Runs `fn()` unless the stage is fresh; returns True when it ran."""
    if stamps.fresh(name, wanted, *outputs):
        _say(f"      reusing {name} ({', '.join(str(p) for p in outputs)})")
        return False
    stamps.clear(name)
    fn()
    stamps.mark(name, wanted)
    return True


def _evaluation(stamps: _Stamps | None, name: str, args: Sequence[str], target: Path, fn,
                report: bool = False) -> dict:
    """A `cac-jax evaluate ARGS --out TARGET [--report]` stage (`fn()` runs it): with `stamps`,
    reused when its arguments, its input files (`--pred`, `--pred2`, `--ref`, by content) and
    the evaluation code are unchanged and its outputs exist. Returns TARGET/metrics.json's
    content."""
    inputs = [Path(args[i + 1]) for i, arg in enumerate(args[:-1])
              if arg in ("--pred", "--pred2", "--ref")]
    if stamps is None or not all(path.is_file() for path in inputs):
        fn()  # (a missing input: the command itself says which, as it always does)
    else:
        wanted = {"args": list(args), "code": _evaluation_code_digest(), "inputs": {
            str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in inputs}}
        outputs = [target / "metrics.json", *([target / "report.html"] if report else [])]
        _stage(stamps, name, wanted, outputs, fn)
    return json.loads((target / "metrics.json").read_text())


@functools.cache
def _evaluation_code_digest() -> str:
    """A digest of the code `cac-jax evaluate` runs (its command, the evaluation package, the HTML
    report), so an evaluation made by other code is not reused. Read once per process."""
    root = Path(__file__).resolve().parent
    files = [root / "commands" / "evaluate.py", root / "html_report.py",
             *sorted((root / "evaluation").glob("*.py"))]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _config_path(relative: str) -> str:
    """The file `configs/NAME.py[:arg]` of the configs/ next to the package (a checkout's or the
    installed copy), whatever the working directory."""
    from cac_jax.config_defaults import CONFIG_DIR

    return str(CONFIG_DIR.parent / relative)


# Config keys that change how a model is computed, not what it computes (docs/onednn.md).
IMPLEMENTATION_KEYS = ("model.conv_impl",)


def _comparable(stamp):
    """A stamp with each `defaults` block's `ADDED_KEYS` that hold their neutral value removed, so
    that adding a key to the configs does not invalidate the runs stamped before it."""
    from cac_jax.config_defaults import ADDED_KEYS

    if not isinstance(stamp, dict):
        return stamp
    out = {k: _comparable(v) for k, v in stamp.items()}
    defaults = out.get("defaults")
    if isinstance(defaults, dict):
        defaults = json.loads(json.dumps(defaults))
        for key, neutral in ADDED_KEYS.items():
            *parents, leaf = key.split(".")
            node = defaults
            for part in parents:
                node = node.get(part, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict) and leaf in node and node[leaf] == neutral:
                del node[leaf]
        out["defaults"] = defaults
    return out


def _config_defaults(config: str) -> dict:
    """The config file's whole configuration before the demo's command-line overrides (JSON
    types), so that a changed default (a width, a loss weight, a schedule) retrains the models
    instead of reusing them. Keys that only choose how the same computation runs
    (`IMPLEMENTATION_KEYS`: which library runs the convolutions) are left out: a run made with
    one is reused, or continued, under another."""
    from cac_jax.config_defaults import load_config_file

    defaults = json.loads(load_config_file(_config_path(config)).to_json())
    for key in IMPLEMENTATION_KEYS:
        *parents, leaf = key.split(".")
        node = defaults
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return defaults
