"""Benchmark every generator on PhysioNet 2012: fit on set-a, sample, evaluate against set-b.

Usage::

    nice python benchmarks/run.py [--patients N] [--generators lstm cgan par gaussian-copula dgan]
                                  [--out DIR] [--data-dir DIR] [--set par.epochs=16 ...]
                                  [--jobs 2]

``--patients N`` takes the first N patients of each of set-a and set-b (the full run uses all
4,000 of each; the reference run is ``--patients 1000``). ``DIR`` for data defaults to
``$SYNTHMED_PHYSIONET_DIR`` or ``../shared/data/physionet2012`` beside the repository. Results go
to ``--out`` (default ``benchmarks/out``: the synthetic cohorts, ``results.json``, one HTML
report per generator) and the benchmark section of ``benchmarks/results.md`` is rewritten.
DGAN needs its own environment: see ``benchmarks/README-dgan.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from synthmed.benchmark import DEFAULT_GENERATORS, GENERATORS, run_benchmark

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_data_dir() -> Path:
    configured = os.environ.get("SYNTHMED_PHYSIONET_DIR")
    return Path(configured) if configured else REPO_ROOT.parent / "shared/data/physionet2012"


def parse_settings(pairs: list[str]) -> dict[str, dict]:
    """``["par.epochs=16", "lstm.batch_size=32"]`` → ``{"par": {"epochs": 16}, ...}``."""
    settings: dict[str, dict] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        generator, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise SystemExit(f"--set expects GENERATOR.SETTING=VALUE, got {pair!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        settings.setdefault(generator, {})[name] = value
    return settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--patients", type=int, default=None, help="first N of set-a and set-b")
    parser.add_argument(
        "--generators",
        nargs="+",
        default=list(DEFAULT_GENERATORS),
        choices=[*GENERATORS, "dgan"],
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "out")
    parser.add_argument(
        "--results",
        type=Path,
        default=REPO_ROOT / "benchmarks" / "results.md",
        help="Markdown file whose benchmark section is rewritten",
    )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="GENERATOR.SETTING=VALUE",
        help="override a default setting",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per generator")
    parser.add_argument(
        "--no-gru", action="store_true", help="skip the evaluation's recurrent discriminator"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="generators fitted at once, each with cpu_count/jobs threads",
    )
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/run.py", *(shlex.quote(a) for a in argv)])
    table = run_benchmark(
        args.data_dir,
        patients=args.patients,
        generators=args.generators,
        out_dir=args.out,
        results_path=args.results,
        settings=parse_settings(args.settings),
        seed=args.seed,
        timeout=args.timeout,
        command=command,
        gru=not args.no_gru,
        jobs=args.jobs,
    )
    print((args.out / "results.md").read_text())
    if table.get("note") is not None and table["note"].astype(str).str.startswith("failed").any():
        sys.exit(1)


if __name__ == "__main__":
    main()
