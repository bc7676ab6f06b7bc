"""Sampling speed of saved models: patients per second, best of two calls of ``sample``.

For each model file: one warm-up call of 100 patients, then ``sample(n, seed=0)`` twice; prints
the better rate, a hash of the generated tables (so two versions of the code can be shown to
draw the same patients) and, for a model with rejection filters, how many drafts were made::

    python benchmarks/bench_sampling.py --threads 1 --n 2000 model.synthmed [more.synthmed ...]

Run it with ``PYTHONPATH`` pointing at another checkout to time that version of the code on
the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch

import synthmed
from synthmed.models.persistence import load_synthesizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="saved model files")
    parser.add_argument("--n", type=int, default=2000, help="patients per call")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"synthmed from {synthmed.__file__}, {args.threads} thread(s), n = {args.n}")
    for path in args.models:
        model = load_synthesizer(path)
        model.verbose = False
        model.sample(100, seed=7)
        best = 0.0
        for _ in range(2):
            start = time.perf_counter()
            cohort = model.sample(args.n, seed=0)
            best = max(best, args.n / (time.perf_counter() - start))
        tables = cohort.events.to_csv().encode() + cohort.static.to_csv().encode()
        digest = hashlib.sha256(tables).hexdigest()[:12]
        drafts = cohort.metadata.get("rejection_sampling", {}).get("drafted", args.n)
        print(f"{path}: {best:,.1f} patients/s, tables {digest}, {drafts / args.n:.1f} drafts each")


if __name__ == "__main__":
    main()
