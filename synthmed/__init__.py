"""synthmed: synthetic longitudinal patient cohorts.

Importing synthmed is cheap: generators, baselines and the evaluation suite (which pull in torch,
SDMetrics and plotting) are imported on first use.
"""

from __future__ import annotations

import importlib

from synthmed.cohort import Cohort
from synthmed.errors import (
    DataError,
    MissingDependencyError,
    ModelFileError,
    NotFittedError,
    PrivacyError,
    SchemaError,
    SynthmedError,
)
from synthmed.schema import ColumnSchema, Schema

__version__ = "0.1.0"

_LAZY = {
    "Synthesizer": "synthmed.models.base",
    "LSTMSynthesizer": "synthmed.models.lstm",
    "CGANSynthesizer": "synthmed.models.cgan",
    "load_synthesizer": "synthmed.models.persistence",
    "evaluate": "synthmed.evaluation",
    "Report": "synthmed.evaluation",
    "share": "synthmed.sharing",
    "datasets": "synthmed.datasets",
    "baselines": "synthmed.baselines",
}

__all__ = [
    "Cohort",
    "ColumnSchema",
    "DataError",
    "MissingDependencyError",
    "ModelFileError",
    "NotFittedError",
    "PrivacyError",
    "Schema",
    "SchemaError",
    "SynthmedError",
    *_LAZY,
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'synthmed' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"synthmed.{name}" else getattr(module, name)
    globals()[name] = value
    return value
