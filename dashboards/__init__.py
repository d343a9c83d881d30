"""W&B workspaces as code: one workspace per stage family and one per sweep, drawn from the panel layout
(raytrain/train/panels.py) and the metric registry (raytrain/train/metrics.py); exported as JSON specs offline
or published to W&B (`raytrain dashboards export|publish`).
"""
