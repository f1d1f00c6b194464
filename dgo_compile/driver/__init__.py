"""The whole compile as a user runs it: `compile --config` stages (prune, finetune, schedule or optimize,
compile, verify, bench) with their cached, stamped work folders, the optimize/schedule orchestration,
and the report with its grids and heatmap.

Imports every sub-package above; only the CLI and the integrations import it.
"""
