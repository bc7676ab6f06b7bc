"""Datasets: the PhysioNet/CinC Challenge 2012 loader, a physiological simulator and long tables."""

from synthmed.datasets.physionet2012 import load_physionet2012
from synthmed.datasets.simulate import simulate_cohort
from synthmed.datasets.tables import read_long_table

__all__ = ["load_physionet2012", "read_long_table", "simulate_cohort"]
