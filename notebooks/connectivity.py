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
# # Connectivity of classification regions
#
# Fawzi, Moosavi-Dezfooli, Frossard and Soatto ("Classification regions of deep neural
# networks", 2017) ask whether two points that a network puts in the same class are joined
# by a path that never leaves that class. Their path search: accept the segment [a, b] if
# densely sampled points on it all keep the class; otherwise push its midpoint back into the
# class with a minimal *targeted* perturbation, make it an anchor, and recurse on both
# halves. They find the regions of deep nets connected, with paths that are nearly straight,
# while straight segments often cross other classes: connected, but not convex.
#
# This notebook runs `bgeom.find_path` on a hand-made non-convex region (an annulus), then
# on a classifier trained on the embedded digits data with the three kinds of pairs of the
# paper, and shows a path in the plane through its ends and its first anchor.
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
from bgeom import data, paths, train
from bgeom.probes.connectivity import plane_grid, plot_planes

TOY = os.environ.get("BGEOM_NOTEBOOK_TOY") == "1"
MODEL = "mlp" if TOY else "cnn"  # the small CNN of the demo at full size
EPOCHS = 2 if TOY else 15
PAIRS = 3 if TOY else 16  # pairs per kind
GRID = 21 if TOY else 61

# %% [markdown]
# ## A region with a hole
#
# Class 0 is the annulus 1 < |x| < 2 of the plane (2-D points stored as (2, 1, 1) "images"),
# class 1 everything else. Two points on opposite sides of the hole: the straight segment
# crosses class 1, so the search needs anchors. Each anchor is a midpoint pushed back into
# class 0 by targeted DeepFool; with the minimal overshoot (0.02) anchors sit just outside
# the hole. Every segment of the returned path is then re-sampled at 128 points.

# %%
def annulus(params, x):
    lo, hi = params
    r2 = jnp.sum(jnp.square(x))
    return jnp.stack([-(r2 - lo) * (r2 - hi), jnp.zeros_like(r2)])


ring = (jnp.float32(1.0), jnp.float32(4.0))
x1 = jnp.array([-1.5, 0.3]).reshape(2, 1, 1)
x2 = jnp.array([1.5, 0.1]).reshape(2, 1, 1)
res = bgeom.find_path(annulus, ring, x1, x2)
print(
    f"connected={bool(res.connected)}  anchors={int(res.num_anchors)}  "
    f"straight segment keeps the class: {bool(res.straight_ok)}  "
    f"length / distance = {float(res.length_ratio):.3f}  segments tested: {int(res.segments_tested)}"
)
short = bgeom.find_path(annulus, ring, jnp.array([1.5, 0.0]).reshape(2, 1, 1),
                        jnp.array([1.4, 0.3]).reshape(2, 1, 1))
print(f"a short chord: anchors={int(short.num_anchors)}, connected={bool(short.connected)}")

g = np.linspace(-2.4, 2.4, 201)
gx, gy = np.meshgrid(g, g)
labels = jax.vmap(lambda p: jnp.argmax(annulus(ring, p)))(
    jnp.asarray(np.stack([gx, gy], -1).reshape(-1, 2, 1, 1), jnp.float32)
).reshape(gx.shape)
path = np.asarray(res.points).reshape(len(res.points), 2)[: int(res.num_points)]
fig, ax = plt.subplots(figsize=(4.2, 4.2))
ax.imshow(labels, origin="lower", extent=[g[0], g[-1], g[0], g[-1]], cmap="Pastel1", vmax=8)
ax.plot(path[[0, -1], 0], path[[0, -1], 1], "k--", lw=1, label="straight segment")
ax.plot(path[:, 0], path[:, 1], "o-", color="tab:red", ms=3, label="path found")
ax.set_title(f"annulus: {int(res.num_anchors)} anchors")
ax.legend(fontsize=8, loc="lower right")
plt.show()

# %% [markdown]
# ## Targeted DeepFool
#
# The push is `bgeom.targeted_deepfool`: DeepFool with the target as the only candidate
# (it linearises `f_target - f_rival` at the current point, the rival being the strongest
# other class, and steps onto its zero set). On a classifier trained on digits, it moves a
# test image into a class of our choice.

# %%
ds = data.load("digits")
t0 = time.time()
model = train.fit(MODEL, ds, config=train.recipe("default", epochs=EPOCHS), seeds=0, progress=False)
apply_fn, params = model.apply_fn, model.params
print(f"{MODEL}: test accuracy {float(model.test_accuracy[0]):.3f} ({time.time() - t0:.0f} s)")

x = jnp.asarray(ds.x_test[0])
label = int(jnp.argmax(apply_fn(params, x)))
targets = jnp.arange(10)
moves = jax.vmap(lambda t: bgeom.targeted_deepfool(apply_fn, params, x, t))(targets)
print("label", label, "| reached:", np.asarray(moves.adv_label).tolist())
print("norm of the move to each class:", np.asarray(moves.margin, np.float64).round(2).tolist())
print("DeepFool margin (nearest class):", round(float(bgeom.deepfool(apply_fn, params, x).margin), 2))

# %% [markdown]
# ## Three kinds of pairs, one search
#
# `paths.make_pairs` draws pairs of test images of the same predicted class ("natural"),
# a natural image and an image of another class pushed into that class
# ("natural-adversarial"), and two such pushed images ("adversarial"). `bgeom.find_paths`
# searches all of them from one pool of segments.

# %%
pairs = paths.make_pairs(jax.random.PRNGKey(0), apply_fn, params, ds.x_test, PAIRS)
v = pairs.valid
t0 = time.time()
found = bgeom.find_paths(apply_fn, params, pairs.x1[v], pairs.x2[v])
jax.block_until_ready(found)
print(f"{int(v.sum())} pairs searched in {time.time() - t0:.1f} s (compilation included)")
kind = pairs.kind[v]
conn, straight = np.asarray(found.connected), np.asarray(found.straight_ok)
anchors, ratio = np.asarray(found.num_anchors), np.asarray(found.length_ratio)
print(f"{'kind':22s} pairs connected straight-leaves  anchors(max)  length/distance(max)")
for k, name in enumerate(paths.PAIR_KINDS):
    s = kind == k
    c = s & conn
    print(
        f"{name:22s} {s.sum():5d} {conn[s].mean():9.2f} {(~straight[s]).mean():14.2f}"
        f"  {anchors[c].max() if c.any() else '-':>12}  {ratio[c].max() if c.any() else 1:.4f}"
    )
print("statuses:", {paths.STATUS_NAMES[s]: int(n) for s, n in enumerate(np.bincount(found.status)) if n})

# %% [markdown]
# ## A path in its plane
#
# The plane through x1, x2 and the first anchor, coloured by the model's label (later anchors
# are projected onto it). The straight segment (dashed) crosses another class; the path
# bends just enough to stay inside.

# %%
with_anchor = np.flatnonzero(conn & (anchors >= 1))
planes = []
for i in with_anchor[:3]:
    made = plane_grid(np.asarray(found.points[i]), int(found.num_points[i]), GRID)
    if made is None:
        continue
    info, grid_images = made
    info["map"] = np.asarray(
        jax.vmap(lambda z: jnp.argmax(apply_fn(params, z)))(jnp.asarray(grid_images))
    ).reshape(GRID, GRID)
    info.update(kind=paths.PAIR_KINDS[int(kind[i])], label=int(found.label[i]),
                anchors=int(anchors[i]), length_ratio=float(ratio[i]))
    planes.append(info)
if planes:
    plot_planes(planes, MODEL, 10)
    plt.show()
else:
    print("no connected path needed an anchor in this sample of pairs")

# %% [markdown]
# ## Why `find_paths` and not `jax.vmap(find_path)`
#
# `find_path` is a fixed-shape `lax` loop, so `jax.vmap` runs many pairs at once, but every
# pair then runs as many segment tests as the hardest pair (most need one test, a few need
# a hundred). `find_paths` takes the next segments of all pairs from one pool, in the same
# order per pair, so the results are the same up to the rounding of batched model
# evaluations (which can decide a label differently exactly on a boundary). Timed at full
# size only: at toy size the compilation would dominate.

# %%
if not TOY:
    search = jax.jit(jax.vmap(lambda a, b: bgeom.find_path(apply_fn, params, a, b)))
    a, b = jnp.asarray(pairs.x1[v]), jnp.asarray(pairs.x2[v])
    jax.block_until_ready(search(a, b))  # compile
    t0 = time.time()
    lockstep = jax.block_until_ready(search(a, b))
    t_vmap = time.time() - t0
    t0 = time.time()
    pooled = jax.block_until_ready(bgeom.find_paths(apply_fn, params, a, b))
    t_pool = time.time() - t0
    print(f"vmap(find_path): {t_vmap:.1f} s   find_paths: {t_pool:.1f} s   "
          f"({t_vmap / t_pool:.1f}x; compiled, same pairs)")
    agree = all(np.array_equal(getattr(lockstep, f), getattr(pooled, f)) for f in ("connected", "status"))
    differ = [i for i in range(len(a)) if not all(
        np.allclose(getattr(lockstep, f)[i], getattr(pooled, f)[i], atol=1e-5) for f in pooled._fields)]
    print(f"same connected and status for every pair: {agree}; pairs whose paths differ: {differ}"
          f" (statuses {[paths.STATUS_NAMES[int(pooled.status[i])] for i in differ]})")
    print("segment tests per pair:", np.asarray(pooled.segments_tested).tolist())
