"""Streaming benchmark: a million synthetic patients to a Parquet dataset in bounded memory.

Runs ``synthmed sample MODEL -n N --chunk-size C --out DIR`` as a subprocess (exactly what a user
or a Slurm array job runs) and reports its wall time, throughput, size on disk and peak resident
memory (``wait4``'s ``ru_maxrss`` of the sampling process alone), plus the resident memory over
time, so one can see it stays flat: chunks are generated, written and released one at a time.

The model is an ``LSTMSynthesizer`` trained briefly on stays of up to 48 hours with 8 vital
signs, measured about hourly: a simulated cohort by default, or PhysioNet 2012 set-a binned to
an hourly grid with ``--physionet DIR``. Sampling cost does not depend on how well the model was
trained, only on its size and the length of what it generates.

    python benchmarks/bench_streaming.py                     # 1,000,000 patients
    python benchmarks/bench_streaming.py --patients 100000   # a tenth, extrapolated to 1M
    python benchmarks/bench_streaming.py --model my.synthmed --workers 4

With ``--workers K`` the run is split into K concurrent ``--shard i/K`` processes writing into
the same folder (as K Slurm array tasks would); the peak RSS is then per worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.dataset as ds

TARGET_PATIENTS = 1_000_000
PEAK_RSS_TARGET_MB = 2048
VITALS = ["HR", "MAP", "SysABP", "DiasABP", "RespRate", "Temp", "SaO2", "Glucose"]


def train_model(path: Path, physionet: Path | None, seed: int) -> Path:
    """A small LSTM on 48-hour stays of 8 hourly vitals (simulated, or PhysioNet set-a)."""
    from synthmed.models.lstm import LSTMConfig, LSTMSynthesizer

    if physionet is not None:
        from synthmed.datasets import load_physionet2012

        archive = next(p for p in (physionet / "set-a.tar.gz", physionet / "set-a") if p.exists())
        cohort = load_physionet2012(archive, variables=VITALS, resample="1h")
        cohort = cohort.subset(cohort.ids[:1000])
    else:
        from synthmed.datasets import simulate_cohort

        cohort = simulate_cohort(1000, seed=seed)
    model = LSTMSynthesizer(
        LSTMConfig(hidden_size=64, head_hidden=32, static_hidden=64),
        epochs=5,
        seed=seed,
        device="cpu",
        verbose=False,
    )
    model.fit(cohort)
    return model.save(path)


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_sampling(
    model: Path, n: int, chunk_size: int, out: Path, workers: int, seed: int
) -> dict[str, object]:
    """Run the sampling processes; returns wall time, peak RSS and the RSS trace."""
    shutil.rmtree(out, ignore_errors=True)
    base = [sys.executable, "-m", "synthmed.cli", "sample", str(model), "-n", str(n)]
    base += ["--chunk-size", str(chunk_size), "--out", str(out), "--seed", str(seed), "--quiet"]
    commands = [
        base + (["--shard", f"{i}/{workers}"] if workers > 1 else []) for i in range(workers)
    ]
    started = time.perf_counter()
    processes = [subprocess.Popen(command) for command in commands]
    trace: list[tuple[float, float]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            total = sum(_rss_mb(p.pid) or 0.0 for p in processes)
            trace.append((round(time.perf_counter() - started, 1), round(total, 1)))
            done.wait(1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    peaks = []
    for process in processes:
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise SystemExit(f"sampling failed with exit status {process.returncode}")
        peaks.append(usage.ru_maxrss / 1024)  # kB on Linux
    seconds = time.perf_counter() - started
    done.set()
    watcher.join()
    return {"seconds": seconds, "peak_rss_mb_per_process": max(peaks), "rss_trace": trace}


def describe(out: Path) -> dict[str, float]:
    """Patients and rows in the dataset (from Parquet metadata) and its size on disk."""
    files = sorted(out.glob("part-*.parquet"))
    dataset = ds.dataset([str(f) for f in files], format="parquet")
    manifests = [json.loads(p.read_text()) for p in out.glob("_manifest*.json")]
    return {
        "patients": sum(m["n_patients"] for m in manifests),
        "rows": dataset.count_rows(),
        "files": len(files),
        "size_mb": sum(f.stat().st_size for f in files) / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=TARGET_PATIENTS)
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1, help="concurrent --shard processes")
    parser.add_argument("--model", type=Path, help="a saved model (default: train one)")
    parser.add_argument("--physionet", type=Path, help="train on PhysioNet set-a (hourly grid)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/streaming"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the generated dataset")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        started = time.perf_counter()
        model = train_model(args.out / "model.synthmed", args.physionet, args.seed)
        print(f"trained the benchmark model in {time.perf_counter() - started:.0f} s")
    dataset = args.out / "dataset"
    run = run_sampling(model, args.patients, args.chunk_size, dataset, args.workers, args.seed)
    facts = describe(dataset)
    if facts["patients"] != args.patients:
        raise SystemExit(f"expected {args.patients} patients, found {facts['patients']}")
    seconds = float(run["seconds"])
    scale = TARGET_PATIENTS / args.patients
    trace = run["rss_trace"]
    half = len(trace) // 2
    result = {
        "patients": args.patients,
        "chunk_size": args.chunk_size,
        "workers": args.workers,
        "seconds": round(seconds, 1),
        "patients_per_s": round(args.patients / seconds, 1),
        "rows": facts["rows"],
        "files": facts["files"],
        "size_mb": round(facts["size_mb"], 1),
        "peak_rss_mb_per_process": round(float(run["peak_rss_mb_per_process"]), 1),
        "rss_first_half_max_mb": max((r for _, r in trace[:half]), default=None),
        "rss_second_half_max_mb": max((r for _, r in trace[half:]), default=None),
        "extrapolated_1m_seconds": round(seconds * scale, 0) if scale != 1 else None,
        "extrapolated_1m_size_mb": round(facts["size_mb"] * scale, 0) if scale != 1 else None,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "rss_trace": trace,
    }
    (args.out / "bench_streaming.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.patients:,} patients in {seconds:.1f} s ({result['patients_per_s']:,} /s), "
        f"{facts['rows']:,} rows, {facts['size_mb']:.0f} MB on disk, {facts['files']} files"
    )
    print(
        f"peak RSS per sampling process: {result['peak_rss_mb_per_process']:.0f} MB "
        f"(target < {PEAK_RSS_TARGET_MB} MB); RSS max in the first/second half of the run: "
        f"{result['rss_first_half_max_mb']} / {result['rss_second_half_max_mb']} MB"
    )
    if scale != 1:
        print(
            f"extrapolated linearly to {TARGET_PATIENTS:,} patients (chunks are independent, "
            f"memory does not grow with N): ~{seconds * scale / 60:.0f} min, "
            f"~{facts['size_mb'] * scale / 1024:.1f} GB on disk, same peak RSS"
        )
    if not args.keep:
        shutil.rmtree(dataset)
    return 0 if result["peak_rss_mb_per_process"] < PEAK_RSS_TARGET_MB else 1


if __name__ == "__main__":
    sys.exit(main())
