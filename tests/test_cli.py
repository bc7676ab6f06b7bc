"""The ``synthmed`` command, driven as a user would: a subprocess per command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from synthmed import Cohort, load_synthesizer
from synthmed.cli import _fit_settings, _sweep_settings, build_parser
from synthmed.datasets import simulate_cohort
from synthmed.models.cgan import CGANConfig

COMMANDS = ("demo", "fit", "sample", "evaluate", "benchmark", "share", "privacy-sweep")
#: One thread per process: several test processes share few cores, and oversubscribed OpenMP
#: threads (torch, scikit-learn) are many times slower than one.
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",
}


def synthmed(*args: str | Path, cwd: Path | None = None, timeout: float = 300):
    """Run ``python -m synthmed.cli ARGS``; returns the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "synthmed.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result


def long_frame(cohort: Cohort) -> pd.DataFrame:
    return (
        cohort.to_long().sort_values([cohort.id_column, cohort.time_column]).reset_index(drop=True)
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A long CSV of 40 simulated patients and a 2-epoch LSTM fitted on 70% of them."""
    folder = tmp_path_factory.mktemp("cli")
    simulate_cohort(40, seed=1).to_long().to_csv(folder / "cohort.csv", index=False)
    result = synthmed(
        "fit", folder / "cohort.csv",
        "--model", "lstm", "--out", folder / "model.synthmed", "--epochs", "2", "--seed", "3",
        "--id", "patient_id", "--time", "time", "--static", "Age,Gender", "ICUType",
        "--outcomes", "In-hospital_death", "--holdout", "0.3",
    )  # fmt: skip
    ok(result)
    assert "model:" in result.stdout
    return folder


# -- help ------------------------------------------------------------------------------------------


def test_main_help_lists_every_command():
    result = ok(synthmed("--help"))
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = ok(synthmed(command, "--help"))
    assert result.stdout.startswith(f"usage: synthmed {command}")
    assert "--quiet" in result.stdout


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "synthmed"
    if not script.exists():
        pytest.skip("the console script is not installed in this environment")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, env=ENV)
    assert result.returncode == 0 and result.stdout.startswith("synthmed ")


# -- fit and sample --------------------------------------------------------------------------------


def test_fit_writes_model_and_split(work):
    assert (work / "model.synthmed").is_file()
    train = Cohort.read_parquet(work / "model.train.parquet")
    holdout = Cohort.read_parquet(work / "model.holdout.parquet")
    assert train.n_patients + holdout.n_patients == 40
    assert not set(train.ids) & set(holdout.ids)
    assert train.outcome_columns == ["In-hospital_death"]


def test_sample_single_files_csv_and_parquet_hold_the_same_patients(work):
    ok(synthmed("sample", work / "model.synthmed", "-n", "25", "--out", work / "s.parquet",
                "--seed", "4"))  # fmt: skip
    quiet = ok(synthmed("sample", work / "model.synthmed", "-n", "25", "--out", work / "s.csv",
                        "--seed", "4", "--quiet"))  # fmt: skip
    assert quiet.stdout == "" and quiet.stderr == ""
    parquet = Cohort.read_parquet(work / "s.parquet")
    assert parquet.n_patients == 25 and (work / "s.parquet").is_file()
    assert parquet.metadata["seed"] == 4
    csv = pd.read_csv(work / "s.csv")
    assert csv["patient_id"].nunique() == 25
    expected = long_frame(parquet)
    pd.testing.assert_frame_equal(
        csv[expected.columns].astype(expected.dtypes.to_dict()), expected, check_dtype=False
    )


def test_shard_union_equals_unsharded_run(work):
    model = work / "model.synthmed"
    common = ("-n", "23", "--chunk-size", "4", "--seed", "11", "--quiet")
    ok(synthmed("sample", model, "--out", work / "whole", *common))
    for i in range(3):
        ok(synthmed("sample", model, "--out", work / "sharded", "--shard", f"{i}/3", *common))
    whole = Cohort.read_parquet(work / "whole")
    union = Cohort.read_parquet(work / "sharded")
    assert whole.n_patients == 23
    assert len(list((work / "sharded").glob("_manifest-*-of-3.json"))) == 3
    pd.testing.assert_frame_equal(long_frame(union), long_frame(whole))


def test_sample_honours_conditions(work):
    ok(synthmed("sample", work / "model.synthmed", "-n", "12", "--out", work / "dead.parquet",
                "--condition", "In-hospital_death=1", "--condition", "Gender=0", "-q"))  # fmt: skip
    dead = Cohort.read_parquet(work / "dead.parquet")
    assert (dead.static["In-hospital_death"] == 1).all() and (dead.static["Gender"] == 0).all()
    pd.DataFrame({"Gender": [0, 1, None], "ICUType": [2, None, 4]}).to_csv(
        work / "conditions.csv", index=False
    )
    ok(synthmed("sample", work / "model.synthmed", "--conditions", work / "conditions.csv",
                "--out", work / "rows.csv", "-q"))  # fmt: skip
    rows = pd.read_csv(work / "rows.csv").groupby("patient_id").first()
    assert len(rows) == 3
    assert rows["Gender"].iloc[:2].tolist() == [0, 1]
    assert rows["ICUType"].iloc[[0, 2]].tolist() == [2, 4]


def test_existing_output_needs_overwrite(work):
    target = work / "twice.parquet"
    target.write_text("not yet a cohort")
    again = synthmed("sample", work / "model.synthmed", "-n", "3", "--out", target, "-q")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    ok(synthmed("sample", work / "model.synthmed", "-n", "3", "--out", target, "--overwrite", "-q"))


def write_physionet_set(root: Path, n: int = 14) -> Path:
    """A tiny set in the PhysioNet 2012 layout: ``set-t/<RecordID>.txt`` + ``Outcomes-t.txt``."""
    folder = root / "set-t"
    folder.mkdir(parents=True)
    outcomes = ["RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death"]
    for i in range(n):
        record = 140000 + i
        rows = ["Time,Parameter,Value", f"00:00,RecordID,{record}", f"00:00,Age,{40 + i}",
                f"00:00,Gender,{i % 2}", "00:00,Height,-1", f"00:00,ICUType,{1 + i % 4}",
                "00:00,Weight,80"]  # fmt: skip
        for hour in range(1 + i % 5):
            rows += [f"{hour:02d}:30,HR,{70 + i + hour}", f"{hour:02d}:30,MAP,{80 - hour}"]
        (folder / f"{record}.txt").write_text("\n".join(rows) + "\n")
        outcomes.append(f"{record},{10 + i},{i % 5},{3 + i % 4},-1,{int(i % 4 == 0)}")
    (root / "Outcomes-t.txt").write_text("\n".join(outcomes) + "\n")
    return folder


def test_fit_with_rejection_sampling_writes_a_model_that_filters(work, tmp_path):
    result = ok(synthmed("fit", work / "cohort.csv", "--model", "lstm", "--epochs", "1",
                         "--out", tmp_path / "r.synthmed", "--rejection-sampling", "0.5",
                         "--rejection-stages", "2",
                         "--id", "patient_id", "--time", "time", "--static", "Age,Gender",
                         "ICUType", "--outcomes", "In-hospital_death"))  # fmt: skip
    assert "model:" in result.stdout
    from synthmed import load_synthesizer

    model = load_synthesizer(tmp_path / "r.synthmed")
    assert model.rejection_sampling == 0.5 and model.rejection_filter_ is not None
    assert model.rejection_stages == 2 and len(model.rejection_filter_.stages) == 2
    assert model.sample(10, seed=0).metadata["rejection_sampling"]["kept"] == 10
    refused = synthmed("fit", work / "cohort.csv", "--model", "lstm", "--epsilon", "3",
                       "--out", tmp_path / "p.synthmed", "--rejection-sampling", "0.5",
                       "--id", "patient_id", "--time", "time")  # fmt: skip
    assert refused.returncode != 0
    assert "cannot be combined with epsilon" in refused.stderr


def test_fit_detects_the_physionet_layout(tmp_path):
    folder = write_physionet_set(tmp_path)
    result = ok(synthmed("fit", folder, "--model", "lstm", "--out", tmp_path / "m.synthmed",
                         "--epochs", "1", "--variables", "HR", "MAP",
                         "--max-time", "48"))  # fmt: skip
    assert "14 patients" in result.stderr
    from synthmed import load_synthesizer

    model = load_synthesizer(tmp_path / "m.synthmed")
    assert model.max_time == 48 and model.max_time_ == 48
    assert model.schema_.temporal_columns == ["HR", "MAP"]
    assert "In-hospital_death" in model.schema_.outcome_columns
    parent = synthmed("fit", tmp_path, "--model", "lstm", "--out", tmp_path / "x.synthmed")
    assert parent.returncode == 2 and "pass one set" in parent.stderr


# -- evaluate and share ----------------------------------------------------------------------------


def test_evaluate_writes_html_and_json(work):
    ok(synthmed("sample", work / "model.synthmed", "-n", "15", "--out", work / "ev.parquet", "-q"))
    result = ok(
        synthmed("evaluate", "--real", work / "model.holdout.parquet",
                 "--synthetic", work / "ev.parquet", "--train", work / "model.train.parquet",
                 "--out", work / "report.html", "--json", work / "scores.json", "--fast")
    )  # fmt: skip
    assert "fidelity" in result.stdout and "report:" in result.stdout
    assert (work / "report.html").read_text().lstrip().lower().startswith("<!doctype html")
    scores = json.loads((work / "scores.json").read_text())
    assert set(scores["summary"]) == {"fidelity", "utility", "privacy"}
    assert {"KSComplement", "dcr_ratio"} <= {row["metric"] for row in scores["scores"]}


def test_share_writes_a_complete_bundle(work):
    out = work / "bundle"
    ok(synthmed("share", work / "model.synthmed", "-n", "15",
                "--train", work / "model.train.parquet", "--holdout", work / "model.holdout.parquet",
                "--out", out, "--fast", "-q"))  # fmt: skip
    names = {p.name for p in out.iterdir()}
    assert names == {"README.md", "synthetic.parquet", "synthetic.csv", "schema.json",
                     "report.html", "report.json"}  # fmt: skip
    assert Cohort.read_parquet(out / "synthetic.parquet").n_patients == 15
    datasheet = (out / "README.md").read_text()
    assert "LSTMSynthesizer" in datasheet and "Not trained with differential privacy" in datasheet
    again = synthmed("share", work / "model.synthmed", "-n", "15",
                     "--train", work / "model.train.parquet",
                     "--holdout", work / "model.holdout.parquet", "--out", out, "-q")  # fmt: skip
    assert again.returncode == 2 and "exists" in again.stderr


# -- demo and benchmark ----------------------------------------------------------------------------


def test_demo_writes_model_cohort_and_report(tmp_path):
    result = ok(synthmed("demo", "--out", tmp_path / "demo", "--patients", "40",
                         "--epochs", "2", "--fast"))  # fmt: skip
    assert {p.name for p in (tmp_path / "demo").iterdir()} >= {
        "model.synthmed",
        "synthetic.parquet",
        "report.html",
    }
    assert f"report: {tmp_path / 'demo' / 'report.html'}" in result.stdout


def test_benchmark_needs_the_physionet_folder(tmp_path):
    result = synthmed("benchmark", tmp_path / "nowhere", "--out", tmp_path / "b")
    assert result.returncode == 2
    assert result.stderr.startswith("synthmed: error: no PhysioNet folder")


# -- user mistakes: one line on stderr, exit 2, no traceback ---------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("fit", "{w}/absent.csv", "--model", "lstm", "--out", "{w}/m"), "no data at"),
        (("fit", "{w}/cohort.csv", "--model", "transformer", "--out", "{w}/m"), "invalid choice"),
        (
            (
                "fit",
                "{w}/cohort.csv",
                "--model",
                "lstm",
                "--out",
                "{w}/m",
                "--id",
                "pid",
                "--time",
                "time",
            ),
            "'pid'",
        ),  # fmt: skip
        (("fit", "{w}/cohort.csv", "--model", "lstm", "--out", "{w}/m"), "needs --id and --time"),
        (
            ("fit", "{w}/cohort.csv", "--model", "lstm", "--out", "{w}/m", "--epochs", "0"),
            "positive integer",
        ),  # fmt: skip
        (
            ("sample", "{w}/model.synthmed", "-n", "5", "--out", "{w}/x", "--shard", "3/3"),
            "shard",
        ),  # fmt: skip
        (("sample", "{w}/absent.synthmed", "-n", "5", "--out", "{w}/x.parquet"), "no model file"),
        (
            (
                "sample",
                "{w}/model.synthmed",
                "-n",
                "5",
                "--out",
                "{w}/x.parquet",
                "--condition",
                "Height=170",
            ),
            "'Height'",
        ),  # fmt: skip
        (("sample", "{w}/model.synthmed", "-n", "5", "--out", "{w}/x.json"), ".parquet or .csv"),
        (
            (
                "evaluate",
                "--real",
                "{w}/absent.parquet",
                "--synthetic",
                "{w}/s.parquet",
                "--out",
                "{w}/r.html",
            ),
            "no data at",
        ),  # fmt: skip
        (
            (
                "share",
                "{w}/cohort.csv",
                "-n",
                "5",
                "--train",
                "{w}/model.train.parquet",
                "--holdout",
                "{w}/model.holdout.parquet",
                "--out",
                "{w}/b2",
            ),
            "cohort.csv",
        ),  # fmt: skip
        (("privacy-sweep", "{w}/absent.csv", "--out", "{w}/ps"), "no data at"),
        (
            (
                "fit",
                "{w}/cohort.csv",
                "--model",
                "gaussian-copula",
                "--out",
                "{w}/c",
                "--max-time",
                "48",
            ),
            "--max-time does not apply to the gaussian-copula model",
        ),
        (("fit", "{w}/cohort.csv", "--model", "lstm", "--out", "{w}/c", "--max-time", "0"), "0"),
        ((), "required"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(work, args, expected):
    result = synthmed(*(a.format(w=work) for a in args))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("synthmed: error: ")
    assert expected in lines[0]


def test_fit_writes_checkpoints_and_resumes_them(work):
    checkpoints = work / "checkpoints"
    common = ("fit", work / "cohort.csv", "--model", "lstm", "--epochs", "2", "--seed", "3",
              "--id", "patient_id", "--time", "time", "--static", "Age", "Gender", "ICUType",
              "--outcomes", "In-hospital_death", "--quiet", "--checkpoint-dir", checkpoints)  # fmt: skip
    ok(synthmed(*common, "--out", work / "checkpointed.synthmed"))
    assert (checkpoints / "checkpoint.pt").is_file()
    ok(synthmed(*common, "--out", work / "resumed.synthmed", "--resume"))
    first = load_synthesizer(work / "checkpointed.synthmed").sample(5, seed=0)
    second = load_synthesizer(work / "resumed.synthmed").sample(5, seed=0)
    pd.testing.assert_frame_equal(first.events, second.events)
    refused = synthmed(*common[:3], "gaussian-copula", *common[4:], "--out", work / "gc.synthmed")
    assert refused.returncode == 2 and "checkpoints" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("lstm", {"max_length": 48, "max_time": 36.0}),
        ("cgan", {"config": CGANConfig(max_steps=48, max_time=36.0)}),
    ],
)
@pytest.mark.parametrize(
    ("command", "settings"), [("privacy-sweep", _sweep_settings), ("fit", _fit_settings)]
)
def test_fit_and_privacy_sweep_set_each_models_stay_length(command, settings, model, expected):
    parser = build_parser()
    args = parser.parse_args(
        [command, "data.csv", "--out", "o", "--model", model, "--max-length", "48"]
        + ["--max-time", "36"]
    )
    assert settings(args) == expected
    bare = parser.parse_args([command, "data.csv", "--out", "o", "--model", model])
    assert settings(bare) == {}
