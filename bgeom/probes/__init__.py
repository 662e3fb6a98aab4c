"""Suite probes: one module per probe; each registers itself with ``bgeom.suite``.

A probe is ``fn(ctx: SuiteContext, spec: dict) -> ProbeOutput``, decorated with
``@register_probe(name, **options)``. Probes are the experiment layer: they may
loop over models, draw figures and show progress; the numerical work they call
lives in the pure modules (margins, subspaces, curvature, ...). Do per-example
work through ``ctx.map`` so it is batched (and sharded) the same way everywhere.
To add a probe, add a module here and import it below.
"""

from bgeom.probes import (
    connectivity,  # noqa: F401
    curvature,  # noqa: F401
    invariance,  # noqa: F401
    margins,  # noqa: F401
)
