"""bgeom: the geometry of the decision boundaries of deep image classifiers, in JAX.

Every analysis takes ``apply_fn(params, x)`` (logits of ONE example of shape
(H, W, C)) and returns a NamedTuple of arrays; batch with ``jax.vmap``.
"""

from bgeom import (
    augment,
    borderline,
    boundary,
    corruptions,
    curvature,
    data,
    detection,
    features,
    models,
    sparse,
    subspaces,
    train,
)
from bgeom.borderline import BorderlineResult, borderline_search
from bgeom.boundary import BoundaryPoint, DeepFoolOptions, boundary_point
from bgeom.curvature import CurvatureResult, boundary_curvature
from bgeom.engine import batched
from bgeom.features import HullResult, hull_distance
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
    "augment",
    "corruptions",
    "BorderlineResult",
    "HullResult",
    "borderline",
    "borderline_search",
    "features",
    "hull_distance",
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
