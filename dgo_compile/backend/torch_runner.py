"""Running a compiled schedule: the call-order and timestep checks every runner shares (`StepRun`;
the onnxruntime runner is the other subclass), and the PyTorch runner of folded graphs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dgo_compile.passes.annotations import variant_signature
from dgo_compile.schedules.schedule import ScheduleError

if TYPE_CHECKING:
    from dgo_compile.backend.folding import FoldedSchedule


class StepRun:
    """One sampling run of a compiled schedule: call once per denoiser call, in order.

    Calls are counted by index, never matched by timestep value, so schedulers that repeat a
    timestep (Heun, PNDM) work. A folded timestep is checked, so a sampler with another
    scheduler or step count fails loudly instead of producing wrong images. The caches belong
    to this run alone.
    """

    def __init__(self, calls: int, input_names: tuple[str, ...], timesteps: tuple[float, ...] | None):
        self.calls, self.input_names, self.timesteps = calls, input_names, timesteps
        self.step = 0

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.step >= self.calls:
            raise ScheduleError(f"the schedule was compiled for {self.calls} denoiser calls; this is call "
                                f"{self.step + 1}: sample with the scheduler and step count it was compiled for")
        if len(inputs) != len(self.input_names):
            raise ScheduleError(f"expected inputs {', '.join(self.input_names)}; got {len(inputs)} tensors")
        named = dict(zip(self.input_names, inputs))
        if self.timesteps is not None and "timestep" in named:
            expected, got = self.timesteps[self.step], named["timestep"].float()
            if not torch.allclose(got, torch.full_like(got, expected), rtol=1e-5, atol=1e-3):
                raise ScheduleError(f"call {self.step + 1} was compiled for timestep {expected:g}, got "
                                    f"{got.flatten()[0].item():g}: sample with the scheduler and step count "
                                    "it was compiled for")
        prediction = self._run(self.step, named)
        self.step += 1
        return prediction

    def _run(self, step: int, named: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class ScheduleRun(StepRun):
    def __init__(self, folded: "FoldedSchedule"):
        super().__init__(len(folded.step_variant), folded.input_names, folded.timesteps)
        self.folded = folded
        self.cache: dict[str, torch.Tensor] = {}

    def _run(self, step: int, named: dict[str, torch.Tensor]) -> torch.Tensor:
        graph_module = self.folded.variants[self.folded.step_variant[step]]
        signature = variant_signature(graph_module)
        batch = named["sample"].shape[0]
        constants = self.folded.constants[step] if self.folded.constants else {}
        outputs = graph_module(*(named[n] for n in signature.inputs),
                               *(constants[n].expand(batch, *constants[n].shape[1:])
                                 for n in signature.constant_inputs),
                               *(self.cache[n] for n in signature.cache_inputs))
        self.cache.update(zip(signature.cache_outputs, outputs[1:]))
        return outputs[0]
