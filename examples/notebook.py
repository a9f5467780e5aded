# %% [markdown]
# # Counterfactual explanations from a notebook
#
# Explain three of the bundled demo digits with DiME (a diffusion model guided by the classifier's gradients)
# and TIME (a text-to-image model with learned class tokens; black-box), compare both runs with the metrics,
# and look at the results. This file is a notebook in percent format: open it in VS Code / PyCharm, or turn it
# into a `.ipynb` with `jupytext --to ipynb examples/notebook.py`; `python examples/notebook.py` runs it as a
# script (tests/test_python_api.py does). On 2 CPU cores it takes about 15 seconds.

# %%
import os
from pathlib import Path

import cfx

# where the runs are written; CFX_EXAMPLE_OUT lets the test choose a temporary folder
OUT = Path(os.environ.get("CFX_EXAMPLE_OUT", "cfx-runs/notebook"))
images = cfx.demo_images(3)  # digit-00-label0.png, digit-01-label1.png, digit-02-label2.png
print([m.name for m in cfx.methods()])

# %% [markdown]
# Each method documents its parameters (what `cfx methods dime` shows); `params={...}` sets them.

# %%
for p in cfx.method("dime").params[:4]:
    print(f"{p.name:16s} {p.kind:6s} default {p.default!r:8} {p.bounds:12s} {p.help}")

# %% [markdown]
# `cfx.explain` runs exactly what `cfx explain` runs (the same presets, per-image seeds and run directory):
# these two runs are byte-identical to
# `cfx explain cfx_cli/demo/images --limit 3 --method dime --out cfx-runs/notebook/dime`.
# Without `out=...` the run goes to a temporary folder and lives in memory only.

# %%
dime = cfx.explain(images, method="dime", classifier="demo:digits", out=OUT / "dime", overwrite=True)
time = cfx.explain(images, method="time", classifier="demo:digits", out=OUT / "time", overwrite=True)
for r in dime:
    print(r)  # id, status, source → target label, p(target) before → after

# %% [markdown]
# Every manifest field is an attribute of a result; `.counterfactual` is the image as a (3, H, W) tensor and
# `.counterfactual_image` as a PIL image.

# %%
first = dime[0]
print(first.status, first.target_label, round(first.target_prob_after, 3), tuple(first.counterfactual.shape))

# %% [markdown]
# The metrics of `cfx eval`, one row per run (also saved as each run's `eval.json`).

# %%
table = cfx.evaluate([dime, time], metrics=["flip_rate", "distance"])
for row in table:
    print(row["run"], {k: round(v, 4) for k, v in row.items() if k in ("flip_rate", "l1", "l2")})

# %% [markdown]
# In a notebook the last expression of a cell shows the results as a table with original | counterfactual |
# difference images; `grid()` returns the same images as one PIL image (no matplotlib needed).

# %%
dime.grid().save(OUT / "dime-grid.png")
time.grid().save(OUT / "time-grid.png")
dime  # noqa: B018 - a notebook shows the value of the last expression
