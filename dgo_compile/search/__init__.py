"""Finding a schedule on calibration noise: DiP-GO's pruner (gates learned by gradient descent through
the sampling trajectory), the calibration inputs it trains on, and the selection that returns the best
of the learned and closed-form schedules at a MACs budget.

Imports `core`, `frontend`, `schedules` and `backend`.
"""
