"""SDV baselines behind the synthmed surface (needs the optional extra: ``pip install synthmed[sdv]``).

Importing this package does not import SDV; fitting a baseline does, and raises
:class:`~synthmed.errors.MissingDependencyError` when SDV is absent.
"""

from synthmed.baselines.gaussian_copula import GaussianCopulaBaseline
from synthmed.baselines.par import PARBaseline

__all__ = ["GaussianCopulaBaseline", "PARBaseline"]
