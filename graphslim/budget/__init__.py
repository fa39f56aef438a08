"""Compression to a budget (issue 17): sensitivity curves, allocation of per-group ratios to a
MACs / latency / size target, a search over pipelines keeping the Pareto front, recipes, and
the workers trials run on (in-process, a local process pool, or Ray).

Every trial is a pipeline *text* run on the model by `trials.run_trial`: so a trial runs the
same wherever it is sent, and what a search chooses is a pipeline anyone can run again.
"""

from graphslim.budget.search import SearchResult, compress
from graphslim.budget.sensitivity import Sensitivity, sensitivity

__all__ = ["SearchResult", "Sensitivity", "compress", "sensitivity"]
