"""Time ``load_physionet2012`` on the 4,000 stays of a PhysioNet 2012 set, read from the archive.

Usage::

    python benchmarks/load_physionet.py [--data-dir DIR] [--set a] [--repeat 3]

``DIR`` defaults to ``$SYNTHMED_PHYSIONET_DIR`` or ``../shared/data/physionet2012`` beside the
repository. The target is under 15 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from synthmed.datasets import load_physionet2012

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_data_dir() -> Path:
    configured = os.environ.get("SYNTHMED_PHYSIONET_DIR")
    return Path(configured) if configured else REPO_ROOT.parent / "shared/data/physionet2012"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--set", default="a", help="which set: a or b")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    archive = args.data_dir / f"set-{args.set}.tar.gz"
    wall, cpu = [], []
    for _ in range(args.repeat):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        cohort = load_physionet2012(archive)
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    print(f"{archive}: {cohort!r}")
    print(f"cores available: {len(os.sched_getaffinity(0))}")
    print(
        f"load time over {args.repeat} runs: median {statistics.median(wall):.2f} s wall, "
        f"best {min(wall):.2f} s, worst {max(wall):.2f} s; median CPU {statistics.median(cpu):.2f} s"
    )
    print("cleaning:", {k: v for k, v in cohort.metadata["cleaning"].items() if k != "by_variable"})


if __name__ == "__main__":
    main()
