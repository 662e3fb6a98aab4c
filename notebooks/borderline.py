# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Borderline instances and what they say about the decision boundary (DeepDIG)
#
# Karimi, Tang and Derr ("Characterizing the decision boundary of deep neural networks",
# 2019) generate **borderline instances**, points where a classifier is undecided between
# two classes s and t, in three phases: an autoencoder pushes class-s images into class t
# (phase I), a second one pushes those back into s (phase II), and a bisection between
# each adversarial image and its image under the second autoencoder stops where
# `|p_s - p_t| < 1e-4` (phase III). Then they ask what the instances say:
#
# 1. in **input space**, segments between borderline instances cross the boundary again and
#    again (a complex boundary);
# 2. in the **embedding space** of the penultimate layer, a linear SVM separates s from t
#    and the instances sit near its hyperplane (a nearly linear boundary).
#
# `bgeom.borderline` has the bisection as a pure, vectorised function, the generators
# trained through `bgeom.train.train_loop`, and both characteristics, for DeepDIG and for
# the baselines RPBS (random pairs of s and t images) and EPBS (each s image with its
# nearest t image in embedding space). Method page: `docs/borderline.md`.
#
# Set `BGEOM_NOTEBOOK_TOY=1` to run it at toy size (the tests do).

# %%
import math
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from bgeom import borderline as bl
from bgeom import data, train
from bgeom.probes.borderline import plot_instances

TOY = os.environ.get("BGEOM_NOTEBOOK_TOY") == "1"
MODEL, EPOCHS = ("mlp", 8) if TOY else ("cnn", 15)
STEPS = 30 if TOY else 300  # generator steps per phase (the reference: 5000)
PARTNERS = 5 if TOY else 20  # complexity partners per instance (the reference: 50)
PAIRS = [(3, 8), (8, 3), (4, 9), (9, 4)]
print("toy size" if TOY else "full size", "- jax", jax.__version__, jax.devices()[0].platform)

# %% [markdown]
# ## 1. The bisection, on a classifier solvable by hand
#
# For an affine two-class classifier `p_0 - p_1 = tanh(F / 2)` with `F = f_0 - f_1` affine,
# so the search must stop within `2 artanh(tol) / ||w||` of the hyperplane `F = 0`, after
# at most `floor(log2(|F(a) - F(b)| / (2 artanh(tol)))) + 1` halvings (the k-th midpoint is
# within `2^-k` of the crossing along the segment). `borderline_search` is a fixed-shape
# `lax.while_loop`: `jax.vmap` runs many segments at once.

# %%
def affine(params, x):
    W, b = params
    return W @ x.ravel() + b


rng = np.random.default_rng(0)
W = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32)
params = (W, jnp.zeros(2))
w = np.asarray(W[0] - W[1], np.float64)
F = lambda x: float(w @ np.asarray(x, np.float64).ravel())


def at(value):
    """A random 4x4 image x with F(x) = value."""
    x = rng.standard_normal(16)
    return (x + (value - w @ x) * w / (w @ w)).reshape(4, 4, 1).astype(np.float32)


a = np.stack([at(v) for v in (0.5, 3.0, 8.0)])
b = np.stack([at(v) for v in (-1.0, -6.0, -2.0)])
res = jax.vmap(lambda a, b: bl.borderline_search(affine, params, a, b))(a, b)
for i in range(len(a)):
    bound = math.floor(math.log2(abs(F(a[i]) - F(b[i])) / (2 * math.atanh(1e-4)))) + 1
    print(
        f"{bl.STATUS_NAMES[int(res.status[i])]:10s} halvings {int(res.halvings[i]):2d} "
        f"(bound {bound}), gap {float(res.gap[i]):.1e}, distance to the hyperplane "
        f"{abs(F(res.point[i])) / np.linalg.norm(w):.1e} (at most "
        f"{2 * math.atanh(1e-4) / np.linalg.norm(w):.1e})"
    )

# %% [markdown]
# A midpoint of a third class ends the search (`third_class`): three classes on a line,
# `f0 = 4 x`, `f1 = -4 x`, `f2 = 1`, and a segment whose midpoint is the origin. The
# reference code has no cap on the halvings; bgeom stops at `max_halvings` (60), here on a
# step classifier whose probabilities never come within `tol` of each other.

# %%
line = (jnp.array([[4.0, 0.0], [-4.0, 0.0], [0.0, 0.0]]), jnp.array([0.0, 0.0, 1.0]))
r = bl.borderline_search(affine, line, jnp.array([1.0, 0.0]).reshape(1, 2, 1),
                         jnp.array([-1.0, 0.0]).reshape(1, 2, 1))
print(bl.STATUS_NAMES[int(r.status)], "after", int(r.halvings), "halving")


def step(threshold, x):
    return jnp.where(x.ravel()[0] > threshold, jnp.array([5.0, 0.0]), jnp.array([0.0, 5.0]))


r = bl.borderline_search(step, jnp.float32(1 / 3), jnp.ones((1, 1, 1)), jnp.zeros((1, 1, 1)))
print(bl.STATUS_NAMES[int(r.status)], "after", int(r.halvings), "halvings, at x =",
      float(r.point.ravel()[0]), "(the jump is at 1/3)")

# %% [markdown]
# ## 2. DeepDIG on the digits
#
# A classifier trained on scikit-learn's 8x8 digits, and DeepDIG for the pairs 3-8 and 4-9
# in both directions. Each phase trains all four generators (fully connected autoencoders
# 64-100-50-64, as DeepDIG's MNIST one) together, with DeepDIG's loss and Adam at 0.01.
# Phase II is evaluated on held-out images (phase I applied to the test images), which its
# generator never saw.

# %%
ds = data.load("digits")
t0 = time.time()
model = train.fit(MODEL, ds, config=train.recipe("default", epochs=EPOCHS), progress=False)
apply_fn, params, features_fn = model.apply_fn, model.params, model.features_fn
print(f"{MODEL}: test accuracy {float(model.test_accuracy[0]):.3f} ({time.time() - t0:.0f} s)")

t0 = time.time()
config = bl.GeneratorConfig(steps=STEPS, batch_size=32)
dd = bl.deepdig(apply_fn, params, ds.x_train, ds.y_train, ds.x_test, ds.y_test, PAIRS,
                config=config)
print(f"DeepDIG, {STEPS} steps per phase: {time.time() - t0:.0f} s")
print("pair  phase I yield (train / test)  phase II yield (own training set / held out)  "
      "searched  instances  halvings")
for p in dd.pairs:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    print(f"{p.source}->{p.target}   {fmt(p.phase1_train_yield):>8s} / {fmt(p.phase1_test_yield):4s}"
          f"   {fmt(p.phase2_train_yield):>22s} / {fmt(p.phase2_yield):4s}        "
          f"{len(p.search.status):5d}  {len(p.instances):9d}  "
          f"{p.search.halvings.mean() if len(p.search.halvings) else float('nan'):8.1f}")
print("loss of phase I per epoch:", [round(float(v), 3) for v in dd.phase1.history["loss"]])

# %%
plot_instances(dd, examples=3, title=MODEL)
plt.show()

# %% [markdown]
# ## 3. The baselines, and the characteristics
#
# RPBS and EPBS bisect segments between correctly classified test images of the two
# classes. For every set of instances: the **complexity** (label changes per point along
# segments joining each instance to random others, DeepDIG's trajectory measure) and the
# **linear SVM** on the penultimate features of the training images (its accuracy, and the
# normalised distance `m / (1 + m)`, `m` the mean |signed distance| to its hyperplane).

# %%
labels = bl.predict(apply_fn, params, ds.x_test)
key = jax.random.PRNGKey(0)
rows = {}
for c, (s, t) in enumerate(PAIRS[::2]):
    sets = {f"DeepDIG {p.source}->{p.target}": p.instances for p in dd.pairs[2 * c : 2 * c + 2]}
    for name, ends in (
        ("RPBS", bl.random_pairs(key, apply_fn, params, ds.x_test, ds.y_test, s, t, labels=labels)),
        ("EPBS", bl.embedding_nearest_pairs(apply_fn, features_fn, params, ds.x_test, ds.y_test,
                                            s, t, labels=labels)),
    ):
        found = bl.borderline_searches(apply_fn, params, ends.a, ends.b)
        sets[name] = found.point[found.converged]
        print(f"{s}-{t} {name}: {len(ends.a)} segments, success rate {found.converged.mean():.2f}")
    feats = lambda x: bl.features(features_fn, params, x)
    test = (ds.y_test == s) | (ds.y_test == t)
    svm = bl.embedding_linearity(
        feats(ds.x_train[ds.y_train == s]), feats(ds.x_train[ds.y_train == t]),
        {"test": (feats(ds.x_test[test]), ds.y_test[test]),
         **{name: (feats(x), bl.predict(apply_fn, params, x)) for name, x in sets.items()}},
        source=s, target=t,
    )
    complexity = bl.input_complexities([jax.random.fold_in(key, i) for i in range(len(sets))],
                                       apply_fn, params, list(sets.values()), partners=PARTNERS)
    rows[f"{s}-{t}"] = (sets, svm, dict(zip(sets, complexity, strict=True)))

for pair, (sets, svm, complexity) in rows.items():
    print(f"\n{pair}: SVM accuracy train {svm.accuracy['train']:.3f}, test {svm.accuracy['test']:.3f}")
    print(f"{'set':16s} {'n':>4s} {'complexity':>10s} {'SVM distance':>13s} {'SVM accuracy':>13s}")
    for name in ("train", "test", *sets):
        n = len(svm.signed[name])
        cx = complexity[name].mean if name in complexity else None
        dist, acc = svm.distance[name], svm.accuracy[name]
        show = lambda v, f: "-" if v is None else format(v, f)
        print(f"{name:16s} {n:4d} {show(cx, '10.4f'):>10s} {show(dist, '13.3f'):>13s} "
              f"{show(acc, '13.3f'):>13s}")

# %% [markdown]
# The SVM separates the training and test images of the two classes perfectly, and they lie
# far from its hyperplane (normalised distance about 0.9, a mean |d| near 10), while every
# kind of borderline instance lies several times nearer it, on both sides: the SVM agrees
# with the model's own label on only about half of them. In the embedding space the
# boundary the network draws between two classes is close to this hyperplane. In input
# space, a segment between two instances changes label about once (complexity near
# 1/50), for DeepDIG's instances as for the baselines'. At toy size these numbers are noisy.

# %%
fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.2), squeeze=False)
for ax, (pair, (_, svm, _)) in zip(axes[0], rows.items(), strict=True):
    for name, d in svm.signed.items():
        if len(d):
            ax.hist(d, bins=30, histtype="step", density=True, label=f"{name} ({len(d)})")
    s, t = pair.split("-")
    ax.set_xlabel(f"signed distance to the SVM hyperplane ({s} < 0 < {t})")
    ax.set_title(pair)
    ax.legend(fontsize=7)
plt.tight_layout()
plt.show()
