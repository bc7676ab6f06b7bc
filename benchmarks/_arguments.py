"""Command-line options that the generator benchmarks (bench_lstm.py, bench_cgan.py) share."""

from __future__ import annotations

import argparse
import os


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """``--sample-threads``, ``--rejection-sampling`` and ``--rejection-stages``."""
    parser.add_argument(
        "--sample-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads while measuring sampling throughput (default: all cores)",
    )
    parser.add_argument(
        "--rejection-sampling",
        type=float,
        default=None,
        help="share of drafts to keep by discriminator rejection sampling (default: off)",
    )
    parser.add_argument(
        "--rejection-stages",
        type=int,
        default=1,
        help="rejection filters applied in turn (with --rejection-sampling)",
    )
