"""A small physiological simulator of ICU stays, written from textbook physiology.

Nothing here is fitted to or copied from a real record. Each simulated patient has a latent
severity and a daily trend (deteriorating or recovering); a latent illness state, severity plus
trend plus slow AR(1) fluctuations, drives eight correlated vital signs and labs. Patients who die
deteriorate faster in their last hours and have shorter stays. Measurements are taken roughly
hourly with jitter; some variables are measured rarely, and more often in sicker patients, so
missingness carries information as it does in real ICU data.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from synthmed.cohort import Cohort
from synthmed.datasets.physionet2012 import DESCRIPTORS, OUTCOMES, TIME_SERIES
from synthmed.errors import DataError
from synthmed.schema import Schema

VARIABLES = ("HR", "SysABP", "DiasABP", "MAP", "RespRate", "Temp", "SaO2", "Glucose")
MAX_HOURS = 48
ICU_TYPES = (1, 2, 3, 4)
ICU_TYPE_RATES = (0.15, 0.21, 0.36, 0.28)
#: Severity offset per ICU type: coronary, cardiac surgery recovery, medical, surgical.
ICU_TYPE_SEVERITY = (0.0, -0.6, 0.3, 0.0)
#: Intercept of the death model, chosen so that about 15% of patients die.
DEATH_INTERCEPT = -2.6


@dataclasses.dataclass(frozen=True)
class _VitalSign:
    """``value = baseline + slope * illness + patient offset + AR(1) noise``, clipped, rounded."""

    baseline: float
    slope: float
    patient_sd: float
    noise_sd: float
    low: float
    high: float
    decimals: int
    measured: float  # probability of a measurement at a given hourly step
    measured_if_sick: float  # extra probability per unit of illness above 0


_VITALS = {
    "HR": _VitalSign(82.0, 9.0, 9.0, 5.0, 30.0, 200.0, 0, 0.95, 0.0),
    "SysABP": _VitalSign(122.0, -9.0, 12.0, 7.0, 60.0, 220.0, 0, 0.80, 0.05),
    "DiasABP": _VitalSign(62.0, -4.5, 7.0, 4.0, 30.0, 130.0, 0, 0.80, 0.05),
    "RespRate": _VitalSign(18.0, 2.5, 3.0, 2.0, 6.0, 45.0, 0, 0.55, 0.05),
    "Temp": _VitalSign(37.0, 0.35, 0.4, 0.25, 34.0, 41.5, 1, 0.25, 0.10),
    "SaO2": _VitalSign(97.0, -1.0, 1.0, 0.8, 70.0, 100.0, 0, 0.10, 0.10),
    "Glucose": _VitalSign(135.0, 14.0, 25.0, 18.0, 40.0, 600.0, 0, 0.18, 0.08),
}


def simulate_cohort(n_patients: int, seed: int = 0) -> Cohort:
    """A simulated ICU cohort of ``n_patients`` stays, deterministic for a given ``seed``.

    Static columns: Age (years), Gender (0/1), ICUType (1-4) and the outcome In-hospital_death
    (about 15% of patients; it depends on the latent severity and trend, so it can be predicted
    from the trajectories). Temporal columns, in hours since admission over 12-48 h stays
    (6-36 h for patients who die): HR, SysABP, DiasABP, MAP = (SysABP + 2 DiasABP) / 3, RespRate,
    Temp, SaO2 and Glucose, with the units and bounds of the PhysioNet 2012 loader. Patient ids
    are the integers 0 to ``n_patients - 1``. ``metadata`` is ``{"source":
    "synthmed.simulate_cohort", "seed": seed}``.

    Raises:
        DataError: ``n_patients`` is not a positive integer.
    """
    if isinstance(n_patients, bool) or not isinstance(n_patients, int | np.integer):
        raise DataError(f"n_patients must be a positive integer, got {n_patients!r}")
    if n_patients < 1:
        raise DataError(f"n_patients must be a positive integer, got {n_patients}")
    rng = np.random.default_rng(seed)
    patients = _patients(int(n_patients), rng)
    times, lengths = _sampling_times(patients, rng)
    illness = _illness(patients, times, rng)
    values = _vital_signs(patients, illness, rng)
    observed = _measured(illness, lengths, rng)
    static = pd.DataFrame(
        {
            "Age": patients.age,
            "Gender": patients.gender,
            "ICUType": patients.icu_type,
            "In-hospital_death": patients.death,
        },
        index=pd.RangeIndex(len(patients.age), name="patient_id"),
    )
    events = _events(times, values, observed)
    metadata = {"source": "synthmed.simulate_cohort", "seed": seed}
    return Cohort(static, events, _schema(), metadata)


@dataclasses.dataclass(frozen=True)
class _Patients:
    age: np.ndarray
    gender: np.ndarray
    icu_type: np.ndarray
    severity: np.ndarray
    trend: np.ndarray
    death: np.ndarray
    length: np.ndarray


def _patients(n: int, rng: np.random.Generator) -> _Patients:
    """Static attributes, latent severity and daily trend, outcome and length of stay."""
    age = np.clip(np.round(rng.normal(64.0, 17.0, n)), 18, 90)
    gender = (rng.random(n) < 0.56).astype(np.int64)
    icu = rng.choice(len(ICU_TYPES), size=n, p=ICU_TYPE_RATES)
    severity = rng.normal(0.0, 1.0, n) + 0.02 * (age - 64.0) + np.take(ICU_TYPE_SEVERITY, icu)
    trend = rng.normal(0.0, 0.8, n)
    death_probability = 1.0 / (1.0 + np.exp(-(DEATH_INTERCEPT + 1.4 * severity + 1.2 * trend)))
    death = (rng.random(n) < death_probability).astype(np.int64)
    length = np.where(death == 1, rng.uniform(6.0, 36.0, n), rng.uniform(12.0, 48.0, n))
    return _Patients(age, gender, np.take(ICU_TYPES, icu), severity, trend, death, length)


def _sampling_times(patients: _Patients, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Roughly hourly times ``k + U(0, 0.8)`` up to the end of each stay, and the step counts."""
    n = len(patients.age)
    times = np.arange(MAX_HOURS)[None, :] + rng.uniform(0.0, 0.8, (n, MAX_HOURS))
    times = np.round(times * 60.0) / 60.0  # whole minutes, as charted
    lengths = (times <= patients.length[:, None]).sum(axis=1)
    return times, lengths


def _ar1(rng: np.random.Generator, shape: tuple[int, ...], phi: float) -> np.ndarray:
    """Stationary AR(1) noise of unit variance along axis 1."""
    shocks = rng.standard_normal(shape)
    noise = np.empty(shape)
    noise[:, 0] = shocks[:, 0]
    scale = np.sqrt(1.0 - phi**2)
    for step in range(1, shape[1]):
        noise[:, step] = phi * noise[:, step - 1] + scale * shocks[:, step]
    return noise


def _illness(patients: _Patients, times: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Latent illness: severity + trend per day + slow fluctuations + terminal deterioration."""
    drift = patients.trend[:, None] * times / 24.0
    fluctuation = 0.35 * _ar1(rng, times.shape, phi=0.9)
    hours_left = patients.length[:, None] - times
    terminal = 1.5 * patients.death[:, None] * np.exp(-np.clip(hours_left, 0.0, None) / 6.0)
    return patients.severity[:, None] + drift + fluctuation + terminal


def _vital_signs(patients: _Patients, illness: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[N, T, V]`` values of the eight variables, in the order of ``VARIABLES``."""
    n, steps = illness.shape
    noise = _ar1(rng, (n, steps, len(_VITALS)), phi=0.7)
    # Diastolic noise shares part of the systolic noise: both come from the same pressure wave.
    noise[:, :, 2] = 0.6 * noise[:, :, 1] + 0.8 * noise[:, :, 2]
    # Systolic pressure rises with age (stiffer arteries).
    extra = {"SysABP": 0.2 * (patients.age[:, None] - 64.0)}
    raw = {}
    for j, (name, vital) in enumerate(_VITALS.items()):
        offset = rng.normal(0.0, vital.patient_sd, n)[:, None] + extra.get(name, 0.0)
        value = vital.baseline + vital.slope * illness + offset + vital.noise_sd * noise[:, :, j]
        raw[name] = np.round(np.clip(value, vital.low, vital.high), vital.decimals)
    # A pulse pressure of at least 15 mmHg; the mean arterial pressure from both pressures.
    raw["SysABP"] = np.minimum(
        np.maximum(raw["SysABP"], raw["DiasABP"] + 15.0), _VITALS["SysABP"].high
    )
    raw["MAP"] = np.round((raw["SysABP"] + 2.0 * raw["DiasABP"]) / 3.0, 2)
    return np.stack([raw[name] for name in VARIABLES], axis=-1)


def _measured(illness: np.ndarray, lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[N, T, V]`` True where a variable is measured; blood pressures are measured together."""
    n, steps = illness.shape
    sick = np.clip(illness, 0.0, None)
    inside = np.arange(steps)[None, :] < lengths[:, None]
    uniform = rng.random((n, steps, len(_VITALS)))
    taken = {}
    for j, (name, vital) in enumerate(_VITALS.items()):
        probability = np.clip(vital.measured + vital.measured_if_sick * sick, 0.0, 1.0)
        taken[name] = (uniform[:, :, j] < probability) & inside
    taken["DiasABP"] = taken["SysABP"]
    taken["MAP"] = taken["SysABP"]
    return np.stack([taken[name] for name in VARIABLES], axis=-1)


def _events(times: np.ndarray, values: np.ndarray, observed: np.ndarray) -> pd.DataFrame:
    """The long events table: one row per step at which at least one variable was measured."""
    patient, step = np.nonzero(observed.any(axis=-1))
    data = {"patient_id": patient, "time": times[patient, step]}
    masked = np.where(observed, values, np.nan)
    for j, name in enumerate(VARIABLES):
        data[name] = masked[patient, step, j]
    return pd.DataFrame(data)


def _schema() -> Schema:
    static = [DESCRIPTORS[name].column("static") for name in ("Age", "Gender", "ICUType")]
    outcome = OUTCOMES["In-hospital_death"].column("outcome")
    temporal = [TIME_SERIES[name].column("temporal") for name in VARIABLES]
    return Schema([*static, outcome, *temporal], id_column="patient_id", time_column="time")
