"""From a schedule to a shipped artifact and back: fold the schedule into per-variant static graphs,
export them to ONNX (precision, one shared weights file), write the artifact and its typed manifest,
and run it (onnxruntime or torch) in a sampler loop, with the bench that times it.

Imports `core`, `frontend`, `schedules` and the passes.
"""
