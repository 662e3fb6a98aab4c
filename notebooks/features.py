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
# # Feature-space geometry: class polyhedra, convex hulls and morphing
#
# Yousefzadeh ("Decision boundaries and convex hulls in the feature space that deep
# learning functions learn from images", 2022) looks at a classifier in its last hidden
# layer, where it is affine: logits `W f + b` of the features `f = phi(x)` (>= 0 after a
# ReLU). There,
#
# 1. the region of class `i` is the polyhedron `{f : (w_i - w_j)^T f + b_i - b_j >= 0}`; it
#    is convex, so it holds the **convex hull of the training features of class i exactly
#    when all of them are classified i**;
# 2. test images lie **outside the convex hull of the training set**, in pixel space (the
#    companion paper) and in feature space;
# 3. the features of a **pixel-space interpolation** between two images leave the training
#    hull, while the straight path between their features stays in it.
#
# `bgeom.features` computes distances to convex hulls (Wolfe's minimum-norm-point algorithm,
# with a certificate), decides membership exactly, and builds the class polyhedra from the
# last layer. This notebook checks the distances against scipy, then measures the three
# facts on the embedded 8x8 digits.
#
# Set `BGEOM_NOTEBOOK_TOY=1` to run it at toy size (the tests do).

# %%
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from scipy.optimize import nnls

from bgeom import data, train
from bgeom import features as F

TOY = os.environ.get("BGEOM_NOTEBOOK_TOY") == "1"
N_TEST = 40 if TOY else 360  # test images
PAIRS = 2 if TOY else 6  # morphing pairs
STEPS = N_TEST // 2 if TOY else 17  # points per path (at toy size: the shapes of section 4)
MODEL, OPTIONS = ("mlp", {"hidden": (32,)}) if TOY else ("cnn", {})
EPOCHS = 2 if TOY else 15
print("toy size" if TOY else "full size", "- jax", jax.__version__, jax.devices()[0].platform)

# %% [markdown]
# ## 1. The distance to a convex hull, against an exact solver
#
# `hull_distance(points, q)` minimises `||points^T a - q||` over convex weights `a`. The
# reference: scipy's NNLS with the sum-to-one constraint as a heavily weighted extra row.
# The result carries a certificate: the true distance lies in `[distance - gap, distance]`,
# the lower end given by the hyperplane through the nearest point found.

# %%
rng = np.random.default_rng(0)
points = rng.standard_normal((500, 16)).astype(np.float32)
far = 2.0 * rng.standard_normal((4, 16))
inside = rng.dirichlet(np.ones(500), 4) @ points
queries = np.concatenate([far, inside]).astype(np.float32)
res = F.hull_distance(points, queries)


def nnls_distance(p, q, w=1e5):
    a, _ = nnls(np.vstack([p.T, w * np.ones((1, len(p)))]).astype(np.float64), np.append(q, w))
    return np.linalg.norm(p.T @ (a / a.sum()) - q)


for i, q in enumerate(queries):
    print(f"query {i}: bgeom {float(res.distance[i]):.6f} (gap {float(res.gap[i]):.1e}), "
          f"NNLS {nnls_distance(points, q):.6f}, {F.STATUS_NAMES[int(res.status[i])]}, "
          f"{int((res.weights[i] > 0).sum())} points carry the answer")
member = F.hull_membership(points, queries)
print("inside:", member.inside, "decided by", [F.MEMBERSHIP_METHODS[m] for m in member.method])

# %% [markdown]
# ## 2. A digits classifier, its features and its last layer

# %%
ds = data.load("digits")
t0 = time.time()
model = train.fit(MODEL, ds, config=train.recipe("default", epochs=EPOCHS), progress=False, **OPTIONS)
print(f"{MODEL} trained in {time.time() - t0:.1f}s, test accuracy {float(model.test_accuracy[0]):.3f}")
features = jax.jit(jax.vmap(lambda x: model.features_fn(model.params, x)))
x_tr, y_tr = ds.x_train, ds.y_train
x_te, y_te = ds.x_test[:N_TEST], ds.y_test[:N_TEST]
f_tr, f_te = np.asarray(features(x_tr)), np.asarray(features(x_te))
w, b = (np.asarray(a) for a in F.last_layer(model.params))
logits = jax.vmap(lambda x: model.apply_fn(model.params, x))(x_te)
print(f"features {f_tr.shape[1]}-d, all >= 0: {bool(f_tr.min() >= 0)}; "
      f"max |W phi + b - logits| = {np.abs(f_te @ w.T + b - np.asarray(logits)).max():.1e}")

# %% [markdown]
# ## 3. The class polyhedra and the hulls of the training features
#
# Containment holds exactly for the classes whose training points are all classified
# correctly. For those, random convex combinations of the class's features confirm it; for
# a class with a misclassified training point, that point is a vertex of the hull outside
# the region.

# %%
cont = F.containment(f_tr, y_tr, w, b)
for c in range(10):
    own = f_tr[y_tr == c]
    combos = rng.dirichlet(np.ones(len(own)), 300) @ own
    in_region = np.mean(np.argmax(combos @ w.T + b, 1) == c)
    facets = F.class_facets(w, b, c).is_facet.sum()
    print(f"class {c}: training accuracy {float(cont.accuracy[c]):.3f}, hull inside region "
          f"{bool(cont.inside[c])}, min margin {float(cont.min_margin[c]):+.2f}, "
          f"sampled hull points in region {in_region:.2f}, {facets} facets")
    for v in np.flatnonzero((y_tr == c) & (np.argmax(f_tr @ w.T + b, 1) != c)):
        print(f"    training point {v} of class {c} is classified "
              f"{int(np.argmax(f_tr[v] @ w.T + b))}: a vertex of the hull outside the region")

# %% [markdown]
# ## 4. Test points outside the training hull: pixels vs features
#
# Exact decisions (a separating hyperplane checked in float64, or a convex combination
# within 1e-6 of the radius), overall and per class.

# %%
t0 = time.time()
pixel = F.outside_fractions(x_tr, y_tr, x_te, y_te)
feat = F.outside_fractions(f_tr, y_tr, f_te, y_te)
print(f"{time.time() - t0:.1f}s")
rad = {
    "pixel": np.max(np.linalg.norm(x_tr.reshape(len(x_tr), -1) - x_tr.reshape(len(x_tr), -1).mean(0), axis=1)),
    "feature": np.max(np.linalg.norm(f_tr - f_tr.mean(0), axis=1)),
}
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
for k, (name, r) in enumerate((("pixel", pixel), ("feature", feat))):
    print(f"{name} space: {r.overall:.2f} of the test points outside the training hull "
          f"(per class {np.round(r.per_class, 2)}), median distance / radius "
          f"{np.median(r.distance) / rad[name]:.3f}")
    ax1.bar(np.arange(10) + 0.4 * (k - 0.5), r.per_class, 0.4, label=name)
    ax2.hist(r.distance / rad[name], bins=30, histtype="step", lw=1.6, label=name)
ax1.set_xlabel("class")
ax1.set_ylabel("outside the class hull")
ax1.legend()
ax2.set_xlabel("distance to the training hull / radius")
ax2.legend()
fig.tight_layout()

# %% [markdown]
# ## 5. The closest point of the decision boundary, and the training hull
#
# For each test feature vector, the closest point of the boundary of its class region
# within the orthant `f >= 0` (a small QP per facet). Is it inside the hull of the class's
# training features? Then, can an image reach those features?

# %%
bnd = jax.vmap(lambda f: F.closest_boundary_point(w, b, f))(jnp.asarray(f_te))
masks = y_tr[None, :] == np.asarray(bnd.label)[:, None]
mem = F.hull_membership(f_tr, np.asarray(bnd.point), mask=masks)
print(f"median distance to the boundary {float(jnp.median(bnd.distance)):.2f}; "
      f"{mem.inside.mean():.2f} of the boundary points lie inside their class's training hull")
reach = jax.vmap(lambda x, t: F.reach_features(model.features_fn, model.params, x, t))(
    x_te[:4], bnd.point[:4])
print("relative feature error of the images reaching them:", np.round(np.asarray(reach.error), 3),
      "from", np.round(np.asarray(reach.initial_error), 3))

# %% [markdown]
# With 64 pixels and 128 features (full size), the features of all images form a set of
# dimension at most 64: a generic feature vector cannot be reached exactly, and the error
# above says how close images get.
#
# ## 6. Morphing: the pixel path against the straight path in feature space

# %%
pairs = [(int(i), int(rng.choice(np.flatnonzero(y_tr == y_tr[i])))) if k % 2 == 0
         else (int(i), int(rng.choice(np.flatnonzero(y_tr != y_tr[i]))))
         for k, i in enumerate(rng.integers(0, len(x_tr), PAIRS))]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
for (i, j), color in zip(pairs, plt.cm.tab10.colors):
    m = F.morph(model.features_fn, model.params, x_tr[i], x_tr[j], (w, b), f_tr, steps=STEPS)
    label = f"{y_tr[i]} -> {y_tr[j]}"
    axes[0].plot(m.t, m.hull_distance, "-", color=color, label=label)
    axes[0].plot(m.t, m.straight_hull_distance, "--", color=color)
    axes[1].plot(m.t, m.deviation, color=color, label=label)
    print(f"{label}: pixel path leaves the hull at t = {float(m.exit):.3f}, crosses the "
          f"boundary at {float(m.crossing):.3f}; straight path: leaves at "
          f"{float(m.straight_exit):.3f}, crosses at {float(m.straight_crossing):.3f}")
axes[0].set_xlabel("t")
axes[0].set_ylabel("distance to the training hull")
axes[0].set_title("pixel path (solid) vs straight feature path (dashed)", fontsize=9)
axes[1].set_xlabel("t")
axes[1].set_ylabel("||phi(x_t) - straight_t||")
axes[1].legend(fontsize=7)
fig.tight_layout()

# %% [markdown]
# The straight path joins two vertices of the hull and never leaves it (up to the solver's
# tolerance); the features of the interpolated images leave it at once and come back only
# at the end. Between two classes, the straight path crosses the boundary exactly where its
# affine slacks vanish; the pixel path crosses elsewhere.
