"""Evaluation of synthetic cohorts: fidelity, utility and privacy, with a report.

``evaluate(real, synthetic, train=None)`` returns a :class:`Report`. SDMetrics provides every
metric it has; the modules here add the ones it lacks, each in SDMetrics' shape (a class with
``name``, ``goal``, ``min_value``, ``max_value`` and ``compute``).

Which negative control (:mod:`synthmed.evaluation.controls`) each metric catches, that is scores
clearly worse than real data of the same size (checked on PhysioNet 2012 by
tests/test_evaluation_physionet.py, and on simulated data by tests/test_evaluation.py):

=============================== ======= ===== ==== ==========================================
metric                          shuffle noise thin other
=============================== ======= ===== ==== ==========================================
KSComplement                            x
TVComplement                                       ``redraw_static``
MissingValueSimilarity                        x
observation_rate_error                        x
CorrelationSimilarity           x       x
SequenceLengthSimilarity                      x
mean_sequence_length_error                    x
StatisticMSAS                   x       x
InterRowMSAS                    x       x
time_gap_similarity                           x
acf_error                       x       x     x
discriminative_score (+auroc)   x       x     x
discriminative_score_gru        x       x     x
tstr_auroc                                         ``shuffle_outcome``
next_value_mae_ratio            x       x
dcr_ratio, nndr                                    a copy of the training cohort
exact_copy_rate                                    a copy of the training cohort
membership_inference_auroc                         a copy of the training cohort
DCROverfittingProtection                           a copy of the training cohort
=============================== ======= ===== ==== ==========================================

shuffle (``shuffle_values``): each variable's observed values permuted across all patients and
times, so marginals and missingness are unchanged; noise (``add_noise``): Gaussian noise of one
standard deviation added to every observed value; thin (``thin_observations``): half of the
observations dropped at random, values unchanged.
"""

from synthmed.evaluation.evaluator import evaluate
from synthmed.evaluation.report import Report

__all__ = ["Report", "evaluate"]
