"""Measures of explanations: exactness, local fidelity, stability, consistency,
faithfulness, randomisation and sensitivity.

>>> from openbox import explainers, metrics
>>> ex = explainers.get("openbox", model, input_shape=(1, 28, 28))
>>> r = ex.explain(x, target)
>>> metrics.exactness(r, model, x)                    # (B,) |P_method - P_model| at x
>>> metrics.local_fidelity(r, model, x).mean          # (B, S) error on Gaussian neighbours
>>> metrics.faithfulness(model, x, r.attribution, target).deletion_auc

Each function documents its formula, shapes and choices; none modifies the model, all
randomness comes from seeded torch.Generators, and an undefined value (a cosine of an
all-zero map, ...) raises instead of returning NaN.
"""

from openbox.metrics.exactness import LocalFidelity, exactness, local_fidelity, neighbours
from openbox.metrics.faithfulness import Faithfulness, faithfulness, removal_order
from openbox.metrics.randomisation import (
    Randomisation,
    layers_in_forward_order,
    normal_init,
    randomisation,
)
from openbox.metrics.sensitivity import sensitivity, uniform_ball
from openbox.metrics.similarity import cosine, rank, spearman
from openbox.metrics.stability import (
    Consistency,
    consistency,
    nearest_neighbours,
    seed_stability,
)

__all__ = [
    "Consistency", "Faithfulness", "LocalFidelity", "Randomisation", "consistency", "cosine",
    "exactness", "faithfulness", "layers_in_forward_order", "local_fidelity",
    "nearest_neighbours", "neighbours",
    "normal_init", "randomisation", "rank", "removal_order", "seed_stability", "sensitivity",
    "spearman", "uniform_ball",
]
