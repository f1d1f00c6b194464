"""Pruning whole GroupNorm groups (`groupnorm_cut="groups"`): units, selection, surgery, records, CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from dgo_compile.passes.channel_groups import analyse_channels
from torch import nn

from dgo_compile import load
from dgo_compile.channels.channel_pruning import (
    PruneConfig,
    PruneError,
    apply_pruning,
    plan_channels,
    planned_cut,
    prune,
    select,
)
from dgo_compile.core.errors import ModelLoadError
from dgo_compile.frontend.channel_surgery import PRUNING_FILE
from dgo_compile.frontend.loading import save_denoiser
from reliability import cli
from test_channel_pruning import Skip, exported, group_of


class TwoNorms(nn.Module):
    """One stream under GroupNorm(4, 8) (groups of 2) and, beside a second space, under GroupNorm(4, 12)
    (groups of 3) over a cat: the two partitions disagree, so whole groups of both are larger units."""

    def __init__(self):
        super().__init__()
        self.stream = nn.Conv2d(3, 8, 3, padding=1)
        self.other = nn.Conv2d(3, 4, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, 8)
        self.norm2 = nn.GroupNorm(4, 12)
        self.head1 = nn.Conv2d(8, 3, 1)
        self.head2 = nn.Conv2d(12, 3, 1)

    def forward(self, x):
        h, o = self.stream(x), self.other(x)
        return self.head1(F.silu(self.norm1(h))) + self.head2(F.silu(self.norm2(torch.cat([h, o], dim=1))))


def test_units_are_whole_groups_of_every_groupnorm_over_them():
    plan = analyse_channels(exported(TwoNorms(), torch.randn(2, 3, 8, 8)))
    (stream, _), = group_of(plan, "stream.weight", 0)
    (other, _), = group_of(plan, "other.weight", 0)
    share = plan.groups[stream].share
    # norm1 groups {0,1} {2,3} {4,5} {6,7}; norm2 groups {0,1,2} {3,4,5} {6,7,o0} {o1,o2,o3}: linked, they leave
    # stream[0:6], stream[6:8] with other[0], and other[1:4]
    assert plan.units() == {share: (((stream, 0, 2), (stream, 2, 1), (stream, 3, 1), (stream, 4, 2)),
                                    ((stream, 6, 2), (other, 0, 1)),
                                    ((other, 1, 3),))}


def test_removing_a_unit_leaves_the_kept_channels_exactly_as_they_were():
    torch.manual_seed(0)
    model, x = TwoNorms().eval(), torch.randn(2, 3, 8, 8)
    plan = analyse_channels(exported(model, x))
    (stream, _), = group_of(plan, "stream.weight", 0)
    (other, _), = group_of(plan, "other.weight", 0)
    scores = {stream: torch.tensor([9.0, 9, 9, 9, 9, 9, 1, 1]), other: torch.tensor([1.0, 9, 9, 9])}
    config = PruneConfig(channel_ratio=0.2, importance="magnitude", scope="global", groupnorm_cut="groups")
    keep = select(plan, scores, config)
    assert keep[stream].tolist() == [0, 1, 2, 3, 4, 5] and keep[other].tolist() == [1, 2, 3]
    pruned, records = apply_pruning(model, plan, keep, lambda m: m(x))
    assert (pruned.norm1.num_groups, pruned.norm1.num_channels) == (3, 6)
    assert (pruned.norm2.num_groups, pruned.norm2.num_channels) == (3, 9)
    assert records["modules"]["norm2"] == {"kind": "GroupNorm", "channels": 9, "groups": 3}
    # whole groups keep their statistics: the cut model is the original with the removed channels' reads zeroed
    reference = TwoNorms().eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.head1.weight[:, 6:8] = 0
        reference.head2.weight[:, 6:9] = 0
        torch.testing.assert_close(pruned(x), reference(x), rtol=0, atol=1e-6)
    assert model.norm1.num_groups == 4 and model.head2.in_channels == 12  # the given model is not changed


def test_units_go_cheapest_first_and_every_group_keeps_a_unit():
    plan = analyse_channels(exported(Skip(), torch.randn(2, 3, 8, 8)))
    (deep, _), = group_of(plan, "deep.weight", 0)
    (shallow, _), = group_of(plan, "shallow.weight", 0)
    assert [len(u) for u in plan.units()[plan.groups[deep].share]] == [1] * 5  # GroupNorm(5, 10): 5 pairs
    scores = {deep: torch.arange(6.0), shallow: torch.arange(4.0)}
    # normalised unit costs: deep 0.2, 1.0, 1.8; shallow 0.33, 1.67; 5 of 10 channels go as 3 pairs
    keep = select(plan, scores, PruneConfig(channel_ratio=0.5, importance="magnitude", scope="global",
                                            groupnorm_cut="groups"))
    assert keep[deep].tolist() == [4, 5] and keep[shallow].tolist() == [2, 3]
    for scope in ("uniform", "global"):  # at any ratio each group keeps its best pair
        keep = select(plan, scores, PruneConfig(channel_ratio=0.9, importance="magnitude", scope=scope,
                                                groupnorm_cut="groups"))
        assert keep[deep].tolist() == [4, 5] and keep[shallow].tolist() == [2, 3]
    # thinning (the default) cannot cut groups of 2 at the default minimum; the dry run says what is planned
    config = PruneConfig(channel_ratio=0.5, importance="magnitude", groupnorm_cut="groups")
    assert planned_cut(plan, config)[deep] is None
    assert planned_cut(plan, PruneConfig(channel_ratio=0.5, importance="magnitude"))[deep] == 6


def test_heads_are_still_thinned_when_groupnorm_groups_go(config_dir):
    loaded = load(config_dir / "sd" / "config.json")
    traced, plan = plan_channels(loaded)
    headed = {g.share for g in plan.prunable() if any("heads" in c for c in g.constraints)}
    assert headed and not headed & plan.units().keys() and plan.units()
    pruned = prune(loaded, PruneConfig(channel_ratio=0.5, importance="random", scope="global",
                                       groupnorm_cut="groups"), traced=traced)
    modules = dict(loaded.model.named_modules())
    regrouped = 0
    for name, module in pruned.model.named_modules():
        if isinstance(module, nn.GroupNorm):  # every kept group is whole: channels per group unchanged
            before = modules[name]
            assert module.num_channels // module.num_groups == before.num_channels // before.num_groups, name
            regrouped += module.num_groups < before.num_groups
        elif type(module).__name__ == "Attention":  # the same heads, each thinned
            assert module.heads == modules[name].heads and module.to_q.out_features % module.heads == 0
    assert regrouped > 0


def test_a_groups_cut_saves_and_loads_back_exactly_and_other_formats_are_refused(config_dir, tmp_path):
    loaded = load(config_dir / "unet2d" / "config.json")
    pruned = prune(loaded, PruneConfig(channel_ratio=0.4, importance="magnitude", scope="global",
                                       groupnorm_cut="groups"))
    save_denoiser(loaded, pruned.model, tmp_path / "pruned", pruned.pruning)
    back = load(tmp_path / "pruned")
    assert back.pruning["format"] == 2
    groups = {n: m.num_groups for n, m in back.model.named_modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {n: m.num_groups for n, m in pruned.model.named_modules() if isinstance(m, nn.GroupNorm)}
    inputs = tuple(back.family.example_inputs(back.model, 2).values())
    with torch.no_grad():
        assert torch.equal(back.family.adapter(back.model)(*inputs), back.family.adapter(pruned.model)(*inputs))
    record = json.loads((tmp_path / "pruned" / PRUNING_FILE).read_text())
    record["format"] = 3
    (tmp_path / "pruned" / PRUNING_FILE).write_text(json.dumps(record))
    with pytest.raises(ModelLoadError, match="has format 3; this dgo-compile reads formats 1, 2"):
        load(tmp_path / "pruned")


def test_a_format_1_record_keeps_its_groupnorms_groups(config_dir, tmp_path):
    """Records written before whole groups could go name no groups: their GroupNorms were thinned."""
    loaded = load(config_dir / "unet2d" / "config.json")
    pruned = prune(loaded, PruneConfig(channel_ratio=0.5, importance="magnitude", min_group_channels=1))
    modules = pruned.pruning["modules"]
    record = {**pruned.pruning, "format": 1,
              "modules": {n: {k: v for k, v in s.items() if k != "groups"} for n, s in modules.items()}}
    save_denoiser(loaded, pruned.model, tmp_path / "old", record)
    back = load(tmp_path / "old").model
    norms = [(m.num_groups, m.num_channels) for m in back.modules() if isinstance(m, nn.GroupNorm)]
    assert norms == [(m.num_groups, m.num_channels) for m in pruned.model.modules() if isinstance(m, nn.GroupNorm)]
    assert any(channels < 2 * groups for groups, channels in norms)  # thinned to one channel a group somewhere


def test_cli_prune_groupnorm_cut(tmp_path):
    result = cli("prune", "--channel-ratio", "0.3", "--scope", "global", "--importance", "magnitude",
                 "--groupnorm-cut", "groups", "-o", str(tmp_path / "p"))
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "p" / "unet" / PRUNING_FILE).read_text())  # a pipeline folder, as its input
    assert record["config"]["groupnorm_cut"] == "groups"
    assert any(s["groups"] < 16 for s in record["modules"].values() if s["kind"] == "GroupNorm")
    dry = cli("prune", "--dry-run", "--groupnorm-cut", "groups", "-o", str(tmp_path / "q"))
    assert dry.returncode == 0 and "units of 2 ch" in dry.stdout and "units of 4 ch" in dry.stdout, dry.stderr
    bad = cli("prune", "--groupnorm-cut", "layers", "-o", str(tmp_path / "q"))
    assert bad.returncode == 1 and not (tmp_path / "q").exists()
    assert "--groupnorm-cut must be one of channels, groups" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    with pytest.raises(PruneError, match="`groupnorm_cut` must be one of channels, groups"):
        PruneConfig(groupnorm_cut="layers")
