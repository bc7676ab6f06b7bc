"""The SDV baselines: PARBaseline and GaussianCopulaBaseline behind the synthmed surface."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from synthmed import Cohort, load_synthesizer
from synthmed.errors import DataError, MissingDependencyError

pytest.importorskip("sdv", reason="the SDV baselines need the sdv extra")
pytestmark = pytest.mark.sdv

from synthmed.baselines import GaussianCopulaBaseline, PARBaseline  # noqa: E402
from synthmed.baselines.gaussian_copula import flatten, grid_column  # noqa: E402
from synthmed.datasets import simulate_cohort  # noqa: E402


@pytest.fixture(scope="module")
def cohort() -> Cohort:
    return simulate_cohort(30, seed=0)


@pytest.fixture(scope="module")
def par(cohort) -> PARBaseline:
    return PARBaseline(epochs=2, verbose=False, device="cpu").fit(cohort)


@pytest.fixture(scope="module")
def copula(cohort) -> GaussianCopulaBaseline:
    return GaussianCopulaBaseline(n_steps=12, verbose=False).fit(cohort)


def _revalidated(synthetic: Cohort) -> Cohort:
    """Build the cohort again from its tables so full validation runs on the output."""
    return Cohort(synthetic.static, synthetic.events, synthetic.schema)


# -- PAR -------------------------------------------------------------------------------------------


def test_par_fits_and_samples_a_valid_cohort(par, cohort):
    synthetic = par.sample(12)
    again = _revalidated(synthetic)
    assert again.n_patients == 12
    assert again.variables == cohort.variables
    assert len(again.events) > 12
    assert (again.events[cohort.time_column] >= 0).all()
    assert synthetic.metadata["generator"] == "PARBaseline"
    assert list(par.history_.columns) == ["epoch", "loss"]
    assert len(par.history_) == 2


def test_par_conditions_fix_the_context_columns(par):
    synthetic = par.sample(8, conditions={"In-hospital_death": 1, "ICUType": 2})
    assert (synthetic.static["In-hospital_death"] == 1).all()
    assert (synthetic.static["ICUType"] == 2).all()
    rows = pd.DataFrame({"Gender": [0, 1, np.nan], "Age": [30.0, np.nan, 70.0]})
    synthetic = par.sample(conditions=rows)
    assert synthetic.static["Gender"].iloc[:2].tolist() == [0, 1]
    assert synthetic.static["Age"].iloc[[0, 2]].tolist() == [30.0, 70.0]


def test_par_seeds_reproduce_and_differ(par):
    a, b, c = par.sample(6, seed=4), par.sample(6, seed=4), par.sample(6, seed=5)
    pd.testing.assert_frame_equal(a.events, b.events)
    pd.testing.assert_frame_equal(a.static, b.static)
    assert not a.events.equals(c.events)


def test_par_refuses_to_save_with_a_reason(par, tmp_path):
    with pytest.raises(NotImplementedError, match="pickle"):
        par.save(tmp_path / "par.synthmed")
    assert not (tmp_path / "par.synthmed").exists()


# -- GaussianCopula --------------------------------------------------------------------------------


def test_flatten_puts_bin_means_on_the_grid():
    static = pd.DataFrame({"Age": [50.0, 60.0]}, index=pd.Index([1, 2], name="patient_id"))
    events = pd.DataFrame(
        {
            "patient_id": [1, 1, 1, 2],
            "time": [0.5, 1.5, 3.5, 2.2],
            "HR": [80.0, 90.0, 100.0, 70.0],
            "Temp": [np.nan, 37.0, np.nan, np.nan],
        }
    )
    flat, columns = flatten(Cohort(static, events), n_steps=2, horizon=4.0)
    np.testing.assert_allclose(
        flat[grid_column("HR", 0)].to_numpy(), [85.0, np.nan], equal_nan=True
    )
    np.testing.assert_allclose(flat[grid_column("HR", 1)].to_numpy(), [100.0, 70.0])
    np.testing.assert_allclose(
        flat[grid_column("Temp", 0)].to_numpy(), [37.0, np.nan], equal_nan=True
    )
    assert grid_column("Temp", 1) not in flat.columns  # never observed: left out
    assert columns[grid_column("HR", 1)] == ("HR", 1)
    assert flat["Age"].tolist() == [50.0, 60.0]


def test_copula_reassembles_the_grid_into_a_cohort(copula, cohort):
    synthetic = _revalidated(copula.sample(60))
    assert synthetic.n_patients == 60
    lengths = synthetic.arrays.lengths
    assert lengths.max() <= 12 and lengths.min() >= 1
    width = copula.horizon_ / 12
    centres = (np.arange(12) + 0.5) * width
    times = synthetic.events[cohort.time_column].to_numpy()
    assert np.isin(np.round(times, 9), np.round(centres, 9)).all()
    # Every emitted step has at least one observed variable.
    assert synthetic.events[cohort.variables].notna().any(axis=1).all()
    # Marginals follow the data (a broken reverse transform would not).
    real, fake = cohort.events["HR"], synthetic.events["HR"]
    assert abs(real.mean() - fake.mean()) < 0.5 * real.std()
    assert 0.5 < fake.notna().mean() / real.notna().mean() < 1.5


def test_copula_conditions_are_exact(copula):
    synthetic = copula.sample(20, conditions={"In-hospital_death": 1, "ICUType": 3})
    assert (synthetic.static["In-hospital_death"] == 1).all()
    assert (synthetic.static["ICUType"] == 3).all()
    rows = pd.DataFrame({"Gender": [0, 1, np.nan], "Age": [30.0, np.nan, 70.0]})
    synthetic = copula.sample(conditions=rows)
    assert synthetic.static["Gender"].iloc[:2].tolist() == [0, 1]
    assert synthetic.static["Age"].iloc[[0, 2]].tolist() == [30.0, 70.0]


def test_copula_conditioned_column_is_fixed_free_one_varies(copula):
    # A conditioned column is fixed for every row while unconditioned draws of it vary.
    young = copula.sample(200, conditions={"Age": 20.0}, seed=1)
    assert (young.static["Age"] == 20.0).all()
    free = copula.sample(200, seed=1)
    assert free.static["Age"].nunique() > 10


def test_copula_seeds_and_save_load_round_trip(copula, tmp_path):
    a, b, c = copula.sample(15, seed=2), copula.sample(15, seed=2), copula.sample(15, seed=3)
    pd.testing.assert_frame_equal(a.events, b.events)
    assert not a.events.equals(c.events)
    path = copula.save(tmp_path / "copula.synthmed")
    loaded = load_synthesizer(path)
    assert isinstance(loaded, GaussianCopulaBaseline)
    pd.testing.assert_frame_equal(loaded.sample(15, seed=2).events, a.events)
    pd.testing.assert_frame_equal(loaded.sample(15, seed=2).static, a.static)


def test_copula_refuses_an_unseen_category(cohort):
    model = GaussianCopulaBaseline(n_steps=4, verbose=False)
    schema = cohort.schema.with_column("ICUType", categories=(1, 2, 3, 4, 9))
    widened = Cohort(cohort.static, cohort.events, schema)
    model.fit(widened)
    with pytest.raises(DataError, match="never occurred"):
        model.sample(3, conditions={"ICUType": 9})


# -- shared ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [PARBaseline, GaussianCopulaBaseline])
def test_missing_sdv_names_the_extra(cls, cohort, monkeypatch):
    monkeypatch.setitem(sys.modules, "sdv", None)
    with pytest.raises(MissingDependencyError, match=r"pip install synthmed\[sdv\]"):
        cls(epochs=1, verbose=False).fit(cohort)


def test_synthmed_imports_without_sdv():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["sdv"] = None
        import synthmed
        from synthmed.baselines import PARBaseline, GaussianCopulaBaseline
        PARBaseline(epochs=1)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("cls", [PARBaseline, GaussianCopulaBaseline])
def test_differential_privacy_is_refused(cls):
    with pytest.raises(ValueError, match="differential privacy"):
        cls(epsilon=1.0)


# -- benchmark helpers -----------------------------------------------------------------------------


def test_hourly_grid_fills_gaps_and_round_trips_to_a_cohort(cohort):
    from synthmed.benchmark import grid_to_cohort, hourly_grid

    grid = hourly_grid(cohort, steps=12, hours=48.0)
    assert len(grid.features) == cohort.n_patients * 12
    assert not grid.features[grid.variables].isna().any(axis=None)
    assert not grid.attributes[grid.attribute_columns].isna().any(axis=None)
    assert set(grid.discrete_attributes) == {"Gender", "ICUType", "In-hospital_death"}
    back = _revalidated(grid_to_cohort(grid.features, grid.attributes, cohort.schema))
    assert back.n_patients == cohort.n_patients
    assert (back.arrays.lengths == 12).all()
    assert back.static["ICUType"].tolist() == cohort.static["ICUType"].tolist()


def test_hourly_grid_fills_forward_backward_then_median():
    from synthmed.benchmark import hourly_grid

    static = pd.DataFrame({"Age": [50.0, 60.0]}, index=pd.Index([1, 2], name="patient_id"))
    events = pd.DataFrame(
        {
            "patient_id": [1, 1, 2],
            "time": [2.5, 10.2, 1.0],
            "HR": [80.0, 90.0, 70.0],
            "Temp": [np.nan, np.nan, 37.0],
        }
    )
    grid = hourly_grid(Cohort(static, events), steps=12, hours=12.0)
    first = grid.features.loc[grid.features["patient"] == 0]
    assert first["HR"].tolist() == [80.0] * 10 + [90.0] * 2
    assert first["Temp"].tolist() == [37.0] * 12  # never measured: the variable's median


def test_benchmark_summary_and_results_section(tmp_path):
    from synthmed.benchmark import (
        SECTION_END,
        SECTION_START,
        results_markdown,
        summarize_scores,
        write_results_section,
    )

    scores = pd.DataFrame(
        {
            "metric": [
                "KSComplement",
                "KSComplement",
                "observation_rate_error",
                "observation_rate_error",
                "next_value_mae_ratio",
                "next_value_mae_ratio",
            ],
            "variable": ["HR", "Age", "HR", "Age", "HR", None],
            "value": [0.8, 0.6, 0.2, 0.0, 3.0, 1.5],
        }
    )
    summary = summarize_scores(scores, ["HR"])
    assert summary["ks_complement"] == pytest.approx(0.7)
    assert summary["observation_rate_error"] == pytest.approx(0.2)
    assert summary["next_value_mae_ratio"] == pytest.approx(1.5)  # the overall row wins
    assert np.isnan(summary["tstr_auroc"])
    table = pd.DataFrame(
        [
            {"generator": "par", "fit_s": 100.0, "patients_per_s": 2.0, "par_fit_ratio": np.nan},
            {
                "generator": "lstm",
                "fit_s": 10.0,
                "patients_per_s": 400.0,
                "par_fit_ratio": 10.0,
                "par_speed_ratio": 200.0,
                "note": "x",
            },
        ]
    )
    section = results_markdown(table, {"cpu_cores": 2}, "python benchmarks/run.py")
    assert "| lstm | 10.0 | 400.0 |" in section and "10.0×" in section and "200×" in section
    path = tmp_path / "results.md"
    path.write_text("# Title\n\nkept above\n")
    write_results_section(path, section)
    write_results_section(path, section.replace("400.0", "500.0"))
    text = path.read_text()
    assert text.count(SECTION_START) == 1 and text.count(SECTION_END) == 1
    assert "kept above" in text and "500.0" in text and "| lstm | 10.0 | 400.0 |" not in text


def test_benchmark_runs_generators_side_by_side_and_reports_each(physionet_dir, tmp_path):
    from synthmed.benchmark import run_benchmark

    table = run_benchmark(
        physionet_dir,
        patients=40,
        generators=["lstm", "gaussian-copula"],
        out_dir=tmp_path,
        settings={"lstm": {"epochs": 1}},
        gru=False,
        jobs=2,
        verbose=False,
    )
    assert table["generator"].tolist() == ["lstm", "gaussian-copula"]  # the order asked for
    assert "note" not in table or table["note"].isna().all()
    assert (table["threads"] == max(1, (os.cpu_count() or 1) // 2)).all()
    for column in ("fit_s", "patients_per_s", "discriminative_score", "ks_complement"):
        assert np.isfinite(table[column].to_numpy(dtype=float)).all(), column
    assert (tmp_path / "report-lstm.html").exists()
    assert (tmp_path / "report-gaussian-copula.html").exists()
    assert "2 generator(s) at a time" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="jobs must be a positive integer"):
        run_benchmark(physionet_dir, patients=5, generators=["lstm"], out_dir=tmp_path, jobs=0)
