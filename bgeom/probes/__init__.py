"""Suite probes: one module per probe, each registering itself in ``bgeom.probes.base``.

A probe is ``fn(ctx, opts, *, probe_id, models) -> ProbeOutput``, decorated with
``@register_probe(name, Options)`` where ``Options`` is its ``ProbeOptions``
dataclass (see ``bgeom.probes.base`` and docs/suite.md). Probes are the
experiment layer: they loop over the members of their models (``ctx.members``),
draw figures and show progress; the numerical work they call lives in the pure
modules (margins, subspaces, curvature, ...). Do per-example work through
``ctx.map`` (or ``ctx.batched`` for the iterative searches) so it is batched
(and sharded) the same way everywhere. Probes
import ``base``, never ``bgeom.suite``. To add a probe, add a module here and
import it below.
"""

from bgeom.probes import (
    borderline,  # noqa: F401
    connectivity,  # noqa: F401
    curvature,  # noqa: F401
    features,  # noqa: F401
    invariance,  # noqa: F401
    margins,  # noqa: F401
    robustness,  # noqa: F401
    sparsity,  # noqa: F401
)
from bgeom.probes.base import (  # noqa: F401
    PROBES,
    Member,
    Probe,
    ProbeOptions,
    ProbeOutput,
    SuiteContext,
    option,
    register_probe,
)
