"""``cfx explain``: :mod:`~cfx_cli.explain.request` (what was asked, resolved and checked once),
:mod:`~cfx_cli.explain.pipeline` (the run end to end, run.json), :mod:`~cfx_cli.explain.batch` (the one worker
builder; a batch in, manifest records out) and :mod:`~cfx_cli.explain.executors` (where the batches run)."""
