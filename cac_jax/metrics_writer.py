"""The training run's metrics log (docs/training.md, "The workdir"): `metrics.jsonl`, one JSON row
per logged step, and the same scalars as TensorBoard events, written by process 0. A resumed run
drops the rows and events logged after the checkpoint it resumes from."""

from __future__ import annotations

import json
import math
import os

from cac_jax import train_support as support


def json_safe(value):
    """`value`, or None for a float that is not finite (JSON has no NaN or infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """metrics.jsonl + TensorBoard (tf.summary) on process 0."""

    def __init__(self, workdir, resume_step: int, enabled: bool):
        self.enabled = enabled
        workdir = support.as_path(workdir)
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        # Cloud storage cannot append: the rows are kept and the file rewritten at each row.
        self._lines: list[str] | None = [] if support.is_remote(workdir) else None
        if not enabled:
            return
        # Rows logged after the checkpoint we resume from would be repeated: drop them.
        if self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            support.write_text(self.path, "".join(f"{line}\n" for line in keep))
            if self._lines is not None:
                self._lines = keep
        support.prune_tensorboard(workdir / "tensorboard", resume_step)
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        self._tf = tf
        # tf.summary.scalar needs the tensorboard package (not a dependency): write the same
        # scalar events with the core op and the scalars plugin's metadata.
        self._metadata = summary_pb2.SummaryMetadata()
        self._metadata.plugin_data.plugin_name = "scalars"
        self.tb = tf.summary.create_file_writer(os.fspath(workdir / "tensorboard"))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: json_safe(v) for k, v in row.items()}
        if self._lines is not None:
            self._lines.append(json.dumps(row))
            support.write_text(self.path, "".join(f"{line}\n" for line in self._lines))
        else:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        with self.tb.as_default(step=int(row["step"])):
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float) and value is not None:
                    self._tf.summary.write(key, self._tf.constant(float(value), self._tf.float32),
                                           metadata=self._metadata)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
