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
# # Sparse perturbations from the geometry of the boundary (SparseFool)
#
# Modas, Moosavi-Dezfooli and Frossard ("SparseFool: a few pixels make a big difference",
# CVPR 2019) look for perturbations that change **few pixels**. Near an image the decision
# boundary is almost flat, so they replace it by its tangent hyperplane and solve a sparse
# linear problem on it; a few repetitions cross the real boundary. Every outer iteration of
# `bgeom.sparsefool`:
#
# 1. finds the boundary point `z` near the current `x_i` and the unit normal `w` there
#    (`bgeom.boundary_point`: DeepFool, refined onto the boundary);
# 2. anchors the hyperplane `lambda_` times further out, `x_B = x_i + lambda_ (z - x_i)`;
# 3. runs the greedy linear solver: the coordinates in order of `|w_j|`, each moved onto the
#    hyperplane or to the edge of the box `[0, 1]` (intersected with `x_0 +- delta`);
# 4. tests `x_adv = x_0 + (1 + epsilon)(x_i - x_0)`.
#
# This notebook checks one iteration against its closed form on an affine classifier, then
# measures on the embedded 8x8 digits: the fooling rate, the pixels changed against DeepFool,
# where the changed pixels lie for each class, and the effect of the per-pixel limit `delta`.
# Method page: `docs/sparsefool.md`.
#
# Set `BGEOM_NOTEBOOK_TOY=1` to run it at toy size (the tests do).

# %%
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import bgeom
from bgeom import data, sparse, train
from bgeom.probes.sparsity import plot_sparse_examples

TOY = os.environ.get("BGEOM_NOTEBOOK_TOY") == "1"
N = 24 if TOY else 300  # test images attacked
N_DELTA = 8 if TOY else 100  # the first of them, for the delta study
EPOCHS = 3 if TOY else 15
MODELS = ("mlp",) if TOY else ("cnn", "mlp")
print("toy size" if TOY else "full size", "- jax", jax.__version__, jax.devices()[0].platform)

# %% [markdown]
# ## 1. One iteration, one coordinate: an affine classifier
#
# For two classes with `f(x) = W vec(x) + b`, the boundary `F = f_1 - f_0 = 0` is a
# hyperplane with unit normal `w = (W_1 - W_0) / ||W_1 - W_0||`, and the boundary point is
# the projection of `x_0` on it, at distance `d = |F(x_0)| / ||W_1 - W_0||`. The solver
# needs `w . (x - x_B) = 0` with `x_B` at `lambda_ d` along `w`: when the coordinate with the
# largest `|w_j|` has room, it moves alone, by `(lambda_ d + 0.001) / |w_j|` (the solver's
# bias 0.001), and the final overshoot multiplies that by `1 + epsilon`. The label flips in
# one outer iteration, with one pixel changed.

# %%
rng = np.random.default_rng(0)
shape = (4, 4, 1)
W = rng.standard_normal((2, 16))
x0 = np.full(16, 0.5)
w = (W[1] - W[0]) / np.linalg.norm(W[1] - W[0])
d = 0.02  # the distance of x0 to the boundary, on class 0's side
b = np.array([0.0, -(W[1] - W[0]) @ x0 - d * np.linalg.norm(W[1] - W[0])])
params = (jnp.asarray(W, jnp.float32), jnp.asarray(b, jnp.float32))


def affine(p, x):
    return p[0] @ x.ravel() + p[1]


res = bgeom.sparsefool(affine, params, jnp.asarray(x0.reshape(shape), jnp.float32))
r = np.asarray(res.perturbation).ravel()
j = int(np.argmax(np.abs(w)))
predicted = np.sign(w[j]) * 1.02 * (3.0 * d + 1e-3) / abs(w[j])
print(f"label {int(res.label)} -> {int(res.adv_label)} in {int(res.iterations)} iteration(s); "
      f"pixels changed: {np.flatnonzero(r).tolist()} (largest |w_j|: {j})")
print(f"change of pixel {j}: {r[j]:.6f}; closed form (1 + eps)(lambda d + 0.001) / |w_j| = "
      f"{predicted:.6f}")

# %% [markdown]
# The linear solver alone (`bgeom.sparse.linear_solver`) does the same in one sort and one
# cumulative sum: with a far hyperplane it moves the coordinates in order of `|w_j|`, each to
# the edge of the box, and the last one by what is left.

# %%
far = jnp.asarray(x0 + 0.8 * w, jnp.float32)  # x_B well beyond what one pixel can reach
moved = np.asarray(sparse.linear_solver(jnp.asarray(x0, jnp.float32), jnp.asarray(w, jnp.float32),
                                        far, jnp.zeros(16), jnp.ones(16)))
order = np.argsort(-np.abs(w))
print("coordinates by |w_j|:", order.tolist())
print("moved (in that order):", [round(float(v), 3) for v in (moved - x0)[order]])
print(f"w . (x - x_B) before {w @ (x0 - np.asarray(far)):.4f}, after {w @ (moved - np.asarray(far)):.4f}")

# %% [markdown]
# ## 2. Digits: fooling rate and pixels changed, against DeepFool
#
# A ReLU CNN and a ReLU MLP trained on the embedded 8x8 digits (64 pixels). SparseFool runs
# through `bgeom.batched` (every outer iteration a jitted top-level call, finished images leave
# the batch); DeepFool, clipped to `[0, 1]` as SparseFool is, gives the minimal L2
# perturbation for comparison (one `jit(vmap)` call). A pixel counts as changed when its
# value moves at all.

# %%
ds = data.load("digits")
cfg = train.recipe("default", epochs=EPOCHS)
t0 = time.time()
models = {name: train.fit(name, ds, config=cfg, progress=False) for name in MODELS}
print(f"trained in {time.time() - t0:.1f}s; test accuracy",
      {k: round(float(m.test_accuracy[0]), 3) for k, m in models.items()})
x = jnp.asarray(ds.x_test[:N])

results = {}
for name, m in models.items():
    t0 = time.time()
    sf = bgeom.batched(bgeom.sparsefool)(m.apply_fn, m.params, x)
    t1 = time.time()
    df = jax.jit(jax.vmap(lambda xi, m=m: bgeom.deepfool(m.apply_fn, m.params, xi,
                                                          bounds=(0.0, 1.0))))(x)
    t2 = time.time()
    df_pixels = np.mean(np.asarray(df.perturbation)[..., 0] != 0, axis=(1, 2))
    results[name] = (sf, df, df_pixels)
    ok, dok = np.asarray(sf.converged), np.asarray(df.converged)
    l2 = np.linalg.norm(np.asarray(sf.perturbation).reshape(N, -1), axis=1)
    print(f"{name}: SparseFool fools {ok.mean():.1%} ({t1 - t0:.1f}s with compilation), median "
          f"{np.median(sf.pixels_changed[ok]):.1%} of pixels "
          f"({np.median(sf.pixels_changed[ok]) * 64:.0f} of 64; quartiles "
          f"{np.quantile(sf.pixels_changed[ok], 0.25):.1%}-{np.quantile(sf.pixels_changed[ok], 0.75):.1%}), "
          f"median iterations {np.median(sf.iterations):.0f} (max {int(np.max(sf.iterations))}), "
          f"median L2 {np.median(l2[ok]):.2f}")
    print(f"{' ' * len(name)}  DeepFool fools {dok.mean():.1%} ({t2 - t1:.1f}s), median "
          f"{np.median(df_pixels[dok]):.1%} of pixels, median L2 {np.median(df.margin[dok]):.2f}")

# %% [markdown]
# Every SparseFool perturbation changes a handful of pixels by a lot; DeepFool's changes most
# pixels a little (the pixels it leaves alone are black background pushed below 0 and clipped
# back). The scatter shows the trade: a few times DeepFool's L2 norm for several times fewer
# pixels.

# %%
fig, ax = plt.subplots(figsize=(6, 3.6))
for (name, (sf, df, df_pixels)), color in zip(results.items(), ("C0", "C1")):
    ok, dok = np.asarray(sf.converged), np.asarray(df.converged)
    l2 = np.linalg.norm(np.asarray(sf.perturbation).reshape(N, -1), axis=1)
    ax.plot(np.asarray(sf.pixels_changed)[ok], l2[ok], "o", ms=3, color=color, alpha=0.6,
            label=f"{name} SparseFool")
    ax.plot(df_pixels[dok], np.asarray(df.margin)[dok], "x", ms=4, color=color, alpha=0.6,
            label=f"{name} DeepFool")
ax.set_xscale("log")
ax.set_xlabel("fraction of pixels changed")
ax.set_ylabel("||r||_2")
ax.legend(fontsize=8)
fig.tight_layout()

name = MODELS[0]
sf = results[name][0]
pick = np.flatnonzero(np.asarray(sf.converged))[:3]
l2 = np.linalg.norm(np.asarray(sf.perturbation).reshape(N, -1), axis=1)
plot_sparse_examples({"x": np.asarray(x)[pick], "perturbation": np.asarray(sf.perturbation)[pick],
                      "label": np.asarray(sf.label)[pick], "adv_label": np.asarray(sf.adv_label)[pick],
                      "pixels_changed": np.asarray(sf.pixels_changed)[pick], "l2": l2[pick]},
                     title=name);

# %% [markdown]
# ## 3. Where the changed pixels lie, per class
#
# The paper links sparse perturbations to the **discriminative features** of a class: the
# pixels SparseFool changes are not random, they sit where the classes differ. For every
# predicted class, the fraction of its (fooled) images whose perturbation changes each pixel,
# next to the class's mean image.

# %%
name = MODELS[0]
sf = results[name][0]
changed = np.asarray(sf.perturbation)[..., 0] != 0
labels, ok = np.asarray(sf.label), np.asarray(sf.converged)
fig, axes = plt.subplots(2, 10, figsize=(11, 2.6))
maps = {}
for c in range(10):
    rows = ok & (labels == c)
    axes[0, c].set_title(f"{c} (n={int(rows.sum())})", fontsize=8)
    if not rows.any():
        continue
    maps[c] = changed[rows].mean(0)
    axes[0, c].imshow(np.asarray(x)[rows][..., 0].mean(0), cmap="gray", vmin=0, vmax=1)
    axes[1, c].imshow(maps[c], cmap="magma", vmin=0, vmax=1)
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
axes[0, 0].set_ylabel("mean image", fontsize=8)
axes[1, 0].set_ylabel("changed", fontsize=8)
fig.suptitle(f"{name}: how often SparseFool changes each pixel, per predicted class")
fig.tight_layout()

# How different are the classes' maps? The correlation of two different classes' maps, and
# (with two models) that of the same class's maps in the two models.
classes = sorted(maps)
corr = np.corrcoef(np.array([maps[c].ravel() for c in classes]))
off = corr[~np.eye(len(classes), dtype=bool)]
print(f"{name}: correlation of the maps of two different classes: median {np.median(off):.2f}")
if len(MODELS) > 1:
    other = results[MODELS[1]][0]
    changed2 = np.asarray(other.perturbation)[..., 0] != 0
    labels2, ok2 = np.asarray(other.label), np.asarray(other.converged)
    same = [np.corrcoef(maps[c].ravel(), changed2[ok2 & (labels2 == c)].mean(0).ravel())[0, 1]
            for c in classes if (ok2 & (labels2 == c)).any()]
    print(f"same class, {MODELS[0]} against {MODELS[1]}: median {np.median(same):.2f}")

# %% [markdown]
# ## 4. The per-pixel limit `delta`
#
# The paper controls perceptibility with `delta`, the largest change of one pixel value
# (its 255, 50 and 25 on a 0-255 scale are `delta` = 1, 0.196, 0.098 here). A smaller `delta`
# means every changed pixel carries less, so more pixels and more iterations; when the box
# cannot reach the boundary within `max_iter` iterations the search stops with status
# `max_iter`.

# %%
name = MODELS[0]
m = models[name]
xd = x[:N_DELTA]
for delta in (1.0, 0.2, 0.1):
    t0 = time.time()
    if delta == 1.0:  # the whole range: section 2's searches
        res = jax.tree.map(lambda a: np.asarray(a)[:N_DELTA], results[name][0])
    else:
        res = bgeom.batched(bgeom.sparsefool)(m.apply_fn, m.params, xd, delta=delta)
    ok = np.asarray(res.converged)
    counts = {s: int(np.sum(np.asarray(res.status) == i)) for i, s in enumerate(sparse.STATUS_NAMES)}
    print(f"delta {delta}: fooling rate {ok.mean():.1%}, median pixels changed "
          f"{np.median(res.pixels_changed[ok]):.1%}, largest |r| {np.abs(res.perturbation).max():.3f}, "
          f"median iterations {np.median(res.iterations):.0f}, statuses {counts} "
          f"({time.time() - t0:.1f}s)")

# %% [markdown]
# ## What we see
#
# The printed numbers above are the record. At full size on this machine (a ReLU CNN and a
# ReLU MLP, 15 epochs, the first 300 test images; the delta study on the CNN's first 100)
# they were:
#
# - **Affine check:** one iteration, one pixel (the largest `|w_j|`), its change equal to the
#   closed form to six digits.
# - **Fooling rate: every image**, in one outer iteration, for both models.
# - **Pixels: about an eighth, against three quarters for DeepFool.** SparseFool changes a
#   median 14 % (CNN) and 12.5 % (MLP) of the 64 pixels, i.e. 8-9 pixels; DeepFool, clipped
#   to `[0, 1]`, 73 % (every pixel except background pushed below 0), at about a quarter of
#   SparseFool's L2 norm (0.59 and 0.52 against 2.19 and 2.20). On 8x8 digits one pixel is
#   1.6 % of the image: the paper's 1-2 % of MNIST's 784 pixels is 8-16 pixels, the same
#   order as here.
# - **Per class: related but distinct maps.** The maps of two different classes correlate at
#   a median 0.52 (every class's changes fall on the central strokes region), the same
#   class's maps in the CNN and the MLP at 0.68: where a class is attacked depends on the
#   class more than on the model.
# - **delta: sparsity needs large per-pixel changes.** At `delta` = 0.2 every image is still
#   fooled in one iteration, but with 73 % of the pixels, as many as DeepFool; at 0.1 only
#   33 % are fooled within 20 iterations (the rest stop at `max_iter`): a box of +-0.1 on 64
#   pixels reaches L2 0.8 at most, little more than DeepFool's median margin. The paper's
#   images have 12 times as many pixels.
