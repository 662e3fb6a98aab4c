"""bgeom: the geometry of the decision boundaries of deep image classifiers, in JAX.

Every analysis takes ``apply_fn(params, x)`` (logits of ONE example of shape
(H, W, C)) and returns a NamedTuple of arrays; batch with ``jax.vmap``.
"""

from bgeom import data, models, subspaces, train
from bgeom.margins import MarginResult, deepfool, subspace_deepfool, subspace_margins

__version__ = "0.1.0"

__all__ = [
    "MarginResult",
    "data",
    "deepfool",
    "models",
    "subspace_deepfool",
    "subspace_margins",
    "subspaces",
    "train",
    "__version__",
]
