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
# # Margins along subspaces ("Hold me tight!")
#
# Ortiz-Jimenez et al. (NeurIPS 2020) measure the **margin along a subspace**: the norm of
# the smallest perturbation *inside* the subspace that changes the label. Along the
# diagonal blocks of the 2-D DCT, from low to high frequency, the profile of these margins
# shows which frequencies a network uses: small margins where the data discriminates, very
# large ones (invariance) elsewhere. This notebook goes from a trained model to that plot,
# then checks the two facts the paper builds on: training on frequency-flipped images mirrors
# the profile, and on synthetic data the margin along the one discriminative direction is the
# construction's `eps`.
#
# Set `BGEOM_NOTEBOOK_TOY=1` to run it at toy size (the tests do).

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import bgeom
from bgeom import augment, data, train
from bgeom import subspaces as S

TOY = os.environ.get("BGEOM_NOTEBOOK_TOY") == "1"
SIZE, BLOCK = (8, 2) if TOY else (28, 8)  # 28x28 with 8x8 blocks: the paper's MNIST grid
SAMPLES = 8 if TOY else 200
EPOCHS = 1 if TOY else 15

# %% [markdown]
# ## Data, subspaces and two models
#
# The embedded digits, resized. `dct_blocks` gives every diagonal K x K block of DCT atoms as
# one stacked subspace: index it (`blocks[3]`) or vmap over it. A second MLP is trained on
# frequency-flipped images (`augment.Flip`), and is probed on flipped images too.

# %%
ds = data.load("digits", size=SIZE)
blocks = S.dct_blocks(ds.shape, block=BLOCK, stride=1)
print(f"{len(blocks)} blocks of dimension {int(blocks.dim[0])} in {ds.shape} images")

config = train.recipe("default", epochs=EPOCHS)
standard = train.fit("mlp", ds, config=config, progress=False)
flipped = train.fit("mlp", ds, config=config, transform=augment.Flip(), progress=False)
print("test accuracy: standard", standard.test_accuracy, "flipped", flipped.test_accuracy)

# %%
fig, axes = plt.subplots(1, 3, figsize=(7, 2.4))
x0 = ds.x_test[0]
for ax, img, title in zip(
    axes,
    [x0, S.flip(x0), S.low_pass(x0, SIZE // 3)],
    ["image", "frequency flip", "low-pass"],
    strict=True,
):
    ax.imshow(np.asarray(img)[..., 0], cmap="gray")
    ax.set_title(title)
    ax.axis("off")

# %% [markdown]
# ## The margin profile: one jitted call
#
# `bgeom.subspace_margins` vmaps `subspace_deepfool` over the images *and* the blocks, so
# the whole profile of a model (here `SAMPLES` images x all blocks) is one compiled call.

# %%
x = jnp.asarray(ds.x_test[:SAMPLES])
profiles = {}
for name, result in [("standard", standard), ("flipped", flipped)]:
    inputs = result.inputs(x) if result.inputs is not None else x
    grid = bgeom.subspace_margins(result.apply_fn, result.params, inputs, blocks)
    print(f"{name}: {float(jnp.mean(grid.converged)):.1%} of searches flipped the label")
    profiles[name] = np.asarray(grid.margin)

fig, ax = plt.subplots(figsize=(7, 3.8))
for name, m in profiles.items():
    q25, med, q75 = np.quantile(m, [0.25, 0.5, 0.75], axis=0)
    (line,) = ax.plot(med, marker="o", ms=3, label=name)
    ax.fill_between(range(len(med)), q25, q75, color=line.get_color(), alpha=0.2)
ax.set_xlabel("diagonal DCT block: low -> high frequency")
ax.set_ylabel("margin along the block")
ax.legend()
ax.grid(alpha=0.3)

# %%
from scipy.stats import spearmanr  # noqa: E402

standard_profile = np.median(profiles["standard"], 0)
mirrored = np.median(profiles["flipped"], 0)[::-1]
print("Spearman(standard, reversed flipped) =", round(spearmanr(standard_profile, mirrored)[0], 3))

# %% [markdown]
# ## Synthetic data: invariance off the discriminative direction
#
# `data.synthetic` draws `x = 0.5 + eps * y * u + sigma * P_perp n`: the label lives only
# along the DCT atom `u`. The margin along `u` should be about `eps`, and the margins along
# DCT blocks orthogonal to `u` much larger.

# %%
eps = 0.5
syn = data.synthetic((SIZE, SIZE, 1), n_train=200 if TOY else 1000, eps=eps, atom=(1, 1))
model = train.fit(
    "mlp", syn, config=train.recipe("default", epochs=max(EPOCHS // 2, 2)), progress=False
)
xs = jnp.asarray(syn.x_test[:SAMPLES])
u = S.from_basis(syn.info["direction"][None])
along_u = jax.vmap(lambda xi: bgeom.subspace_deepfool(model.apply_fn, model.params, xi, u))(xs)
others = bgeom.subspace_margins(model.apply_fn, model.params, xs, blocks[1:])
print(f"margin along u: {float(jnp.median(along_u.margin)):.3f} (eps = {eps})")
print(f"median margin along blocks orthogonal to u: {float(jnp.median(others.margin)):.3f}")
