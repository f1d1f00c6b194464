"""What to compute at each denoiser call: the `Schedule` (calls x blocks/units, compute or reuse), the
built-in closed-form ones (`full`, `steps:K`, `deepcache:N[:B]`), the MACs cost model that prices them,
and the SuperNet (backup edges and gates) that a learned schedule is trained through.

Imports `core`, `frontend` and the passes.
"""
