"""Fit gretel's DGAN on the benchmark's hourly grid and sample from it (runs in its own venv).

Usage (called by ``synthmed.benchmark.run_benchmark``; see ``benchmarks/README-dgan.md``)::

    benchmarks/.dgan-venv/bin/python benchmarks/dgan_runner.py FOLDER

``FOLDER`` holds ``job.json`` (feature and attribute names, which attributes are discrete,
``max_sequence_len``, ``sample_len``, ``n`` to sample, ``seed`` and optional ``epochs``),
``features.parquet`` (columns ``patient``, ``step`` and one per feature; no missing values) and
``attributes.parquet`` (``patient`` and one column per attribute). The runner writes
``synthetic-features.parquet``, ``synthetic-attributes.parquet`` (same layouts, ``n`` patients)
and ``timing.json`` (fit seconds, sampling patients/s, this process's peak RSS).

DGAN is fitted at its defaults (``DGANConfig``: 400 epochs, batch size 1024, ...) except
``sample_len`` (steps generated per RNN step; it must divide ``max_sequence_len``) and ``epochs``
when the job gives them. DGAN has no seed argument: numpy's and torch's global generators are
seeded. This file imports only numpy, pandas, torch and gretel-synthetics: it does not import
synthmed, whose dependencies conflict with gretel-synthetics' pins.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def main(folder: Path) -> None:
    from gretel_synthetics.timeseries_dgan.config import DGANConfig, OutputType
    from gretel_synthetics.timeseries_dgan.dgan import DGAN

    job = json.loads((folder / "job.json").read_text())
    seed = int(job.get("seed", 0))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    features_table = pd.read_parquet(folder / "features.parquet").sort_values(["patient", "step"])
    attributes_table = pd.read_parquet(folder / "attributes.parquet").sort_values("patient")
    names, attribute_names = job["features"], job["attributes"]
    steps = int(job["max_sequence_len"])
    n_train = len(attributes_table)
    features = np.stack(
        [features_table[c].to_numpy(dtype=np.float32).reshape(n_train, steps) for c in names],
        axis=2,
    )
    attributes = attributes_table[attribute_names].to_numpy(dtype=np.float32)
    discrete = set(job.get("discrete_attributes", []))
    attribute_types = [
        OutputType.DISCRETE if a in discrete else OutputType.CONTINUOUS for a in attribute_names
    ]
    settings = {"max_sequence_len": steps, "sample_len": int(job["sample_len"])}
    if job.get("epochs"):
        settings["epochs"] = int(job["epochs"])
    settings["cuda"] = torch.cuda.is_available()
    model = DGAN(DGANConfig(**settings))
    started = time.perf_counter()
    model.train_numpy(
        features=features,
        attributes=attributes,
        feature_types=[OutputType.CONTINUOUS] * len(names),
        attribute_types=attribute_types,
    )
    fit_s = time.perf_counter() - started
    n = int(job["n"])
    started = time.perf_counter()
    synthetic_attributes, synthetic_features = model.generate_numpy(n)
    synthetic_features = np.asarray(synthetic_features, dtype=np.float64)
    sample_s = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    pd.DataFrame(
        {
            "patient": np.repeat(np.arange(n), steps),
            "step": np.tile(np.arange(steps), n),
            **{c: synthetic_features[:, :, j].reshape(-1) for j, c in enumerate(names)},
        }
    ).to_parquet(folder / "synthetic-features.parquet", index=False)
    attributes_out = pd.DataFrame(
        np.asarray(synthetic_attributes, dtype=np.float64), columns=attribute_names
    )
    attributes_out.insert(0, "patient", np.arange(n))
    attributes_out.to_parquet(folder / "synthetic-attributes.parquet", index=False)
    (folder / "timing.json").write_text(
        json.dumps(
            {
                "fit_s": fit_s,
                "sample_s": sample_s,
                "patients_per_s": n / sample_s,
                "peak_rss_mb": peak / 2**20,
                "epochs_run": settings.get("epochs", DGANConfig.epochs),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: dgan_runner.py FOLDER")
    main(Path(sys.argv[1]))
