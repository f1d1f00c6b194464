"""DeepCache (Ma et al., CVPR 2024) as its package defines it, written as a static unit schedule.

`DeepCacheSDHelper.set_params(cache_interval=N, cache_branch_id=B)` (DeepCache 0.1.1) counts the
branch in layers inside blocks: block K = B // 3, layer L = B % 3. Call 0 and every N-th call after it
run everything; on the calls between (`skip_mode="uniform"`):

- down block i: i < K runs; i > K reuses; i == K runs its layers l < L (layer l = `resnets.l` and
  `attentions.l`; the downsampler is layer len(resnets)), so branch 0 reuses all of down block 0;
- the mid block reuses;
- up blocks are counted from the output (j = number of up blocks - 1 - i) and their layers too
  (`resnets.l`, `attentions.l` are layer len(resnets) - 1 - l; the upsampler is layer 0): j < K runs,
  j > K reuses, j == K runs its layers <= L.

Everything outside the blocks (conv_in, the time embedding, the head) always runs. A reused module
hands on its output from the last call that ran it: the last full call, as the package's cache.
Branch 0 thus runs conv_in, the last resnet/attention pair of the last up block and the head, which
reads conv_in's fresh output through the skip connection (about 51% of SD-1.5's MACs per run at N 3).

The package indexes calls by the position of their timestep in `scheduler.timesteps`, so with a
sampler that repeats timesteps (Heun) its calls drift off its own interval; here call i is call i.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from dgo_compile.schedules.schedule import Schedule, ScheduleError

LAYERS_PER_BRANCH_BLOCK = 3  # DeepCache's cache_branch_id = 3 * block + layer
UNIT = re.compile(r"^(?P<block>.+)\.(?P<kind>resnets|attentions|downsamplers|upsamplers)\.(?P<index>\d+)$")


def deepcache_schedule(spec: str, calls: int, blocks: Sequence[str], units: Mapping[str, Sequence[str]],
                       interval: int, branch: int) -> Schedule:
    """DeepCacheSDHelper(cache_interval=`interval`, cache_branch_id=`branch`) over `calls` denoiser calls,
    at unit granularity (`units`: each block's unit names, in call order)."""
    downs = [b for b in blocks if b.startswith("down_blocks.")]
    ups = [b for b in blocks if b.startswith("up_blocks.")]
    if not downs or not ups:
        raise ScheduleError(f"deepcache needs a UNet (down and up blocks); this model has {', '.join(blocks[:3])}...: "
                            "use steps:K, a schedule JSON or a learned schedule")
    if interval < 1:
        raise ScheduleError(f"deepcache interval must be at least 1, got {interval}")
    if not 0 <= branch < LAYERS_PER_BRANCH_BLOCK * len(downs):
        raise ScheduleError(f"deepcache branch must be in 0..{LAYERS_PER_BRANCH_BLOCK * len(downs) - 1} "
                            f"(3 x block + layer, as DeepCache's cache_branch_id), got {branch}")
    branch_block, branch_layer = divmod(branch, LAYERS_PER_BRANCH_BLOCK)
    shallow = set()
    for i, block in enumerate(downs):
        shallow |= {u for u in units[block] if i < branch_block
                    or (i == branch_block and _down_layer(u, units[block]) < branch_layer)}
    for i, block in enumerate(ups):
        j = len(ups) - 1 - i
        shallow |= {u for u in units[block] if j < branch_block
                    or (j == branch_block and _up_layer(u, units[block]) <= branch_layer)}
    names = tuple(u for b in blocks for u in units[b])
    rows = tuple(tuple(call % interval == 0 or u in shallow for u in names) for call in range(calls))
    return Schedule(spec, names, rows, "unit")


def _parsed(unit: str) -> tuple[str, int]:
    match = UNIT.match(unit)
    if match is None:
        raise ScheduleError(f"deepcache counts resnets, attentions and samplers inside UNet blocks; "
                            f"cannot place unit {unit}")
    return match["kind"], int(match["index"])


def _resnets(units: Sequence[str]) -> int:
    return sum(_parsed(u)[0] == "resnets" for u in units)


def _down_layer(unit: str, units: Sequence[str]) -> int:
    kind, index = _parsed(unit)
    return _resnets(units) if kind == "downsamplers" else index


def _up_layer(unit: str, units: Sequence[str]) -> int:
    kind, index = _parsed(unit)
    return 0 if kind == "upsamplers" else _resnets(units) - 1 - index
