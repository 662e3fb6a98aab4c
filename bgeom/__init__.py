"""bgeom: the geometry of the decision boundaries of deep image classifiers, in JAX.

Every analysis takes ``apply_fn(params, x)`` (logits of ONE example of shape
(H, W, C)) and returns a NamedTuple of arrays; batch with ``jax.vmap``.
"""

from bgeom import boundary, curvature, data, detection, models, sparse, subspaces, train
from bgeom.boundary import BoundaryPoint, DeepFoolOptions, boundary_point
from bgeom.curvature import CurvatureResult, boundary_curvature
from bgeom.engine import batched
from bgeom.margins import (
    MarginResult,
    deepfool,
    subspace_deepfool,
    subspace_margins,
    targeted_deepfool,
)
from bgeom.paths import PathResult, find_path, find_paths
from bgeom.sharding import sweep
from bgeom.sparse import SparseResult, sparsefool

__version__ = "0.1.0"

__all__ = [
    "BoundaryPoint",
    "CurvatureResult",
    "DeepFoolOptions",
    "MarginResult",
    "PathResult",
    "SparseResult",
    "batched",
    "boundary",
    "boundary_curvature",
    "boundary_point",
    "curvature",
    "data",
    "deepfool",
    "detection",
    "find_path",
    "find_paths",
    "models",
    "sparse",
    "sparsefool",
    "subspace_deepfool",
    "subspace_margins",
    "subspaces",
    "sweep",
    "targeted_deepfool",
    "train",
    "__version__",
]
