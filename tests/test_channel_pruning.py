"""Channel pruning: dependency groups on hand-built graphs, surgery, save/load, ONNX parity, the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from dgo_compile.passes.channel_groups import TIMESTEP_ONLY, analyse_channels
from dgo_compile.passes.channel_plan import ChannelRuleError
from dgo_compile.passes.channel_rules import RULES, register_channel_rule
from torch import nn

from dgo_compile import load, trace
from dgo_compile.backend.export import export_onnx
from dgo_compile.channels.channel_pruning import PruneConfig, PruneError, apply_pruning, plan_channels, prune, select
from dgo_compile.frontend.loading import save_denoiser
from reliability import cli, run


def exported(module: nn.Module, *inputs):
    """The ATen graph `trace` would give, for a plain module: export, minus its runtime guard call."""
    graph_module = torch.export.export(module.eval(), inputs, strict=False).module()
    for node in list(graph_module.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph_module.graph.erase_node(node)
    return graph_module


def group_of(plan, param, axis):
    """The groups (id, start) that slice `param` on `axis`."""
    return sorted((g.id, s.start) for g in plan.groups for s in g.slices if s.param == param and s.axis == axis)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(4, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        h = self.stem(x)
        return self.head(h + self.conv(F.silu(self.norm(h))))


def test_residual_add_couples_both_branches_and_groupnorm_keeps_groups_whole():
    plan = analyse_channels(exported(Residual(), torch.randn(2, 3, 8, 8)))
    (stream, _), = group_of(plan, "stem.weight", 0)
    assert group_of(plan, "conv.weight", 0) == [(stream, 0)]  # both branches of the add
    assert group_of(plan, "head.weight", 1) == [(stream, 0)]
    assert group_of(plan, "norm.weight", 0) == [(stream, 0)] and group_of(plan, "conv.weight", 1) == [(stream, 0)]
    group = plan.groups[stream]
    assert group.atoms == (2, 2, 2, 2) and group.steps == 2 and group.prunable
    assert group.constraints == ("GroupNorm(4) norm",)
    (out, _), = group_of(plan, "head.weight", 0)
    assert plan.groups[out].fixed == "the model output" and not plan.groups[out].prunable


class Skip(nn.Module):
    """A UNet skip: cat([deep, shallow]) read by a GroupNorm whose groups straddle the seam."""

    def __init__(self):
        super().__init__()
        self.shallow = nn.Conv2d(3, 4, 3, padding=1)
        self.deep = nn.Conv2d(4, 6, 3, padding=1)
        self.norm = nn.GroupNorm(5, 10)
        self.head = nn.Conv2d(10, 3, 1)

    def forward(self, x):
        a = self.shallow(x)
        return self.head(F.silu(self.norm(torch.cat([self.deep(a), a], dim=1))))


def test_cat_skip_connection_offsets_and_groupnorm_atoms_across_the_seam():
    plan = analyse_channels(exported(Skip(), torch.randn(2, 3, 8, 8)))
    (deep, _), = group_of(plan, "deep.weight", 0)
    (shallow, _), = group_of(plan, "shallow.weight", 0)
    assert group_of(plan, "head.weight", 1) == sorted([(deep, 0), (shallow, 6)])  # index offsets of the cat
    assert group_of(plan, "norm.weight", 0) == sorted([(deep, 0), (shallow, 6)])
    assert group_of(plan, "deep.weight", 1) == [(shallow, 0)]
    # GroupNorm(5, 10): groups of 2 at 0,2,4 | 6,8 -> each group keeps the same count
    assert plan.groups[deep].atoms == (2, 2, 2) and plan.groups[shallow].atoms == (2, 2)
    assert plan.groups[deep].share == plan.groups[shallow].share  # one GroupNorm: they lose the same share
    scores = {g.id: torch.arange(g.size, dtype=torch.float) for g in plan.prunable()}
    keep = select(plan, scores, PruneConfig(channel_ratio=0.5, importance="magnitude", min_group_channels=1))
    kept_channels = torch.cat([keep[deep], keep[shallow] + 6])
    per_norm_group = torch.bincount(kept_channels // 2, minlength=5)
    assert per_norm_group.tolist() == [1, 1, 1, 1, 1]  # channels per group stay whole and equal
    assert keep[deep].tolist() == [1, 3, 5]  # the higher-scored channel of each pair survives
    # by default a GroupNorm group keeps 2 channels: groups of 2 are not cut at any ratio
    for scope in ("uniform", "global"):
        keep = select(plan, scores, PruneConfig(channel_ratio=0.9, importance="magnitude", scope=scope))
        assert keep[deep].tolist() == [0, 1, 2, 3, 4, 5] and keep[shallow].tolist() == [0, 1, 2, 3]


class WideGroups(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(2, 16)
        self.head = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        return self.head(F.silu(self.norm(self.stem(x))))


@pytest.mark.parametrize("minimum, ratio, kept", [(2, 0.9, 2), (2, 0.5, 4), (3, 0.9, 3), (1, 0.9, 1), (8, 0.5, 8)])
def test_groupnorm_groups_keep_the_minimum_channels(minimum, ratio, kept):
    plan = analyse_channels(exported(WideGroups(), torch.randn(2, 3, 8, 8)))
    (stem, _), = group_of(plan, "stem.weight", 0)
    assert plan.groups[stem].norm_group == 8 and plan.groups[stem].steps == 8
    for scope in ("uniform", "global"):
        keep = select(plan, {stem: torch.rand(16)}, PruneConfig(channel_ratio=ratio, importance="magnitude",
                                                                scope=scope,
                                                              min_group_channels=minimum))
        assert torch.bincount(keep[stem] // 8, minlength=2).tolist() == [kept, kept]


class TimeProjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.time_proj = nn.Linear(4, 8)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x, emb):
        return self.out(self.conv(x) + self.time_proj(F.silu(emb))[:, :, None, None])


def test_time_embedding_projection_joins_the_resnet_features():
    plan = analyse_channels(exported(TimeProjection(), torch.randn(2, 3, 8, 8), torch.randn(2, 4)))
    assert group_of(plan, "time_proj.weight", 0) == group_of(plan, "conv.weight", 0) == group_of(plan, "out.weight", 1)
    assert group_of(plan, "time_proj.weight", 1) == []  # a model input: never cut


def test_class_embedding_and_output_keep_their_size(config_dir):
    _, plan = plan_channels(load(config_dir / "unet2d_class_cond" / "config.json"))
    (temb, _), = group_of(plan, "time_embedding.linear_2.weight", 0)
    assert plan.groups[temb].fixed == "an embedding table (class labels)"
    (out, _), = group_of(plan, "conv_out.weight", 0)
    assert plan.groups[out].fixed == "the model output"
    (down, _), = group_of(plan, "down_blocks.0.downsamplers.0.conv.weight", 0)
    assert plan.groups[down].prunable and ("down_blocks.1.resnets.0.conv1.weight", 1, 0) in \
        [(s.param, s.axis, s.start) for s in plan.groups[down].slices]


@pytest.mark.parametrize("family", ["unet2d", "dit"])
def test_time_mlp_is_kept_whole(config_dir, family):
    # timestep-only weights save no MACs once a schedule is folded; a global cut ranked them cheapest
    loaded = load(config_dir / family / "config.json")
    _, plan = plan_channels(loaded)
    prefix = "time_embedding" if family == "unet2d" else "transformer_blocks.0.norm1.emb.timestep_embedder"
    hidden = group_of(plan, f"{prefix}.linear_1.weight", 0)  # DiT's final layer calls block 0's embedder again
    assert hidden and all(plan.groups[g].fixed == TIMESTEP_ONLY for g, _ in hidden)
    if family == "unet2d":  # its output only feeds the resnets' time projections
        (out, _), = group_of(plan, f"{prefix}.linear_2.weight", 0)
        assert plan.groups[out].fixed == TIMESTEP_ONLY
        (joined, _), = group_of(plan, "down_blocks.0.resnets.0.time_emb_proj.weight", 0)
        assert plan.groups[joined].prunable  # the projection's output is the resnet's features
    pruned = prune(loaded, PruneConfig(channel_ratio=0.9, importance="random", scope="global"))
    assert pruned.model.get_submodule(f"{prefix}.linear_1").out_features == \
        loaded.model.get_submodule(f"{prefix}.linear_1").out_features


class RowModulation(nn.Module):
    """PixArt's adaLN-single: one linear gives 3 x D, reshaped to rows [B, 3, D], plus a [3, D] table, chunked."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.ada = nn.Linear(5, 3 * 8)
        self.table = nn.Parameter(torch.randn(3, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x, t):
        h = self.stem(x)
        shift, scale, gate = (self.table[None] + self.ada(t).reshape(t.shape[0], 3, -1)).chunk(3, dim=1)
        return self.head(gate * (h * (1 + scale) + shift))


def test_rows_of_a_channel_axis_chunked_and_a_broadcast_table_cut_by_columns():
    plan = analyse_channels(exported(RowModulation(), torch.randn(2, 6, 4), torch.randn(2, 5)))
    (group, _), = group_of(plan, "stem.weight", 0)
    # each row of the adaLN output and every column of the table is the hidden channels
    assert group_of(plan, "ada.weight", 0) == [(group, 0), (group, 8), (group, 16)]
    assert group_of(plan, "table", 1) == [(group, 0)] and group_of(plan, "table", 0) == []
    assert group_of(plan, "head.weight", 1) == [(group, 0)] and plan.groups[group].prunable


def test_pruning_rows_modulation_matches_the_unpruned_channels():
    torch.manual_seed(0)
    module = RowModulation().eval()
    x, t = torch.randn(2, 6, 4), torch.randn(2, 5)
    graph_module = exported(module, x, t)
    plan = analyse_channels(graph_module)
    (group, _), = group_of(plan, "stem.weight", 0)
    keep = {group: torch.tensor([0, 2, 3, 5, 6, 7])}
    pruned, _ = apply_pruning(module, plan, keep, lambda m: m(x, t))
    assert pruned.table.shape == (3, 6) and pruned.ada.out_features == 18
    # zeroing the removed channels in the original gives the same output as removing them
    with torch.no_grad():
        reference = RowModulation().eval()
        reference.load_state_dict(module.state_dict())
        for channel in (1, 4):
            reference.head.weight[:, channel] = 0
        torch.testing.assert_close(pruned(x, t), reference(x, t))


class ShapeTie(nn.Module):
    """PixArt's captions: viewed with the hidden width, a size export bakes into a constant."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 8)
        self.caption = nn.Linear(3, 8)
        self.head = nn.Linear(8, 4)
        self.text_head = nn.Linear(8, 4)

    def forward(self, x, c):
        h = self.hidden(x)
        text = self.caption(c).view(c.shape[0], -1, h.shape[-1])
        return self.head(h), self.text_head(text)


def test_modules_tied_by_a_shape_in_the_code_lose_the_same_share():
    graph_module = exported(ShapeTie(), torch.randn(2, 5, 4), torch.randn(2, 6, 3))
    free = analyse_channels(graph_module)
    tied = analyse_channels(graph_module, (("caption", "hidden"),))
    share = lambda plan, param: plan.groups[group_of(plan, param, 0)[0][0]].share  # noqa: E731
    assert share(free, "caption.weight") != share(free, "hidden.weight")
    assert share(tied, "caption.weight") == share(tied, "hidden.weight")
    caption = tied.groups[group_of(tied, "caption.weight", 0)[0][0]]
    assert "same size as hidden (a shape in the model's code)" in caption.constraints
    with pytest.raises(ChannelRuleError, match="nowhere has no weight whose output channels"):
        analyse_channels(graph_module, (("nowhere", "hidden"),))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        from diffusers.models.attention_processor import Attention as DiffusersAttention

        self.attn = DiffusersAttention(query_dim=16, heads=2, dim_head=8)

    def forward(self, x):
        return self.attn(x)


def test_attention_heads_shrink_with_the_original_scale():
    torch.manual_seed(0)
    module = Attention().eval()
    x = torch.randn(2, 5, 16)
    plan = analyse_channels(exported(module, x))
    (qk, _), = group_of(plan, "attn.to_q.weight", 0)
    assert group_of(plan, "attn.to_k.weight", 0) == [(qk, 0)]  # q.k contracts the head channels
    (vo, _), = group_of(plan, "attn.to_v.weight", 0)
    assert group_of(plan, "attn.to_out.0.weight", 1) == [(vo, 0)] and vo != qk
    assert plan.groups[qk].atoms == (8, 8) and plan.groups[vo].atoms == (8, 8)
    assert plan.groups[qk].share == plan.groups[vo].share  # diffusers takes the value head size from the keys
    assert plan.attention[0].head_dim == 8 and not plan.attention[0].explicit_scale

    keep = {qk: torch.tensor([0, 2, 3, 5, 8, 9, 12, 15]), vo: torch.tensor([1, 2, 3, 4, 9, 10, 11, 12])}
    pruned, records = apply_pruning(module, plan, keep, lambda m: m(x))
    assert records["modules"]["attn.to_q"] == {"kind": "Linear", "in": 16, "out": 8}
    attn = module.attn
    q = F.linear(x, attn.to_q.weight[keep[qk]])
    k = F.linear(x, attn.to_k.weight[keep[qk]])
    v = F.linear(x, attn.to_v.weight[keep[vo]])
    heads = [slice(0, 4), slice(4, 8)]
    mixed = torch.cat([torch.softmax(q[..., h] @ k[..., h].transpose(1, 2) * 8 ** -0.5, -1) @ v[..., h]
                       for h in heads], dim=-1)  # the original 1/sqrt(8), not 1/sqrt(4)
    expected = F.linear(mixed, attn.to_out[0].weight[:, keep[vo]], attn.to_out[0].bias)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, atol=1e-5, rtol=1e-4)
    assert module.attn.to_q.weight.shape == (16, 16)  # the user's module is untouched


class Cumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return torch.cumsum(self.conv(x), dim=1)


def test_unknown_op_is_named_with_how_to_register_it():
    graph = exported(Cumsum(), torch.randn(1, 3, 4, 4))
    with pytest.raises(ChannelRuleError, match=r"node cumsum calls aten\.cumsum\.default, whose channel semantics "
                                               r"channel pruning does not know; register a rule with "
                                               r"dgo_compile\.passes\.channel_rules\.register_channel_rule"):
        analyse_channels(graph)
    register_channel_rule(torch.ops.aten.cumsum.default, lambda walk, node: walk.axis(node.args[0]))
    try:
        plan = analyse_channels(graph)
    finally:
        del RULES[torch.ops.aten.cumsum.default]
    assert plan.groups[group_of(plan, "conv.weight", 0)[0][0]].fixed == "the model output"


@pytest.mark.parametrize("family, groupnorm_cut", [*((f, "channels") for f in ("unet2d", "sd", "sdxl", "dit",
                                                                                "pixart")),
                                                    ("sd", "groups"), ("sdxl", "groups")])
@pytest.mark.slow
def test_pruned_tiny_models_run_and_match_onnxruntime(config_dir, family, groupnorm_cut, tmp_path):
    import onnxruntime as ort

    loaded = load(config_dir / family / "config.json")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    config = PruneConfig(channel_ratio=0.5, importance="magnitude", groupnorm_cut=groupnorm_cut)
    pruned = prune(loaded, config)  # re-traces and checks itself
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in before.items())  # user's model untouched
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(pruned.model) < 0.8 * params(loaded.model)
    traced = pruned.traced  # prune's own re-trace, checked against the pruned eager model
    assert traced.model is pruned.model
    inputs = traced.example_inputs(2)
    path = export_onnx(traced.graph_module, inputs, tmp_path / "m.onnx")[0]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        expected = traced.family.adapter(pruned.model)(*inputs.values()).numpy()
    assert abs(actual - expected).max() < 1e-4 * max(1.0, abs(expected).max())


@pytest.mark.parametrize("family", ["unet2d", "pixart"])
def test_pruned_model_saves_and_loads_back_exactly(config_dir, family, tmp_path):
    loaded = load(config_dir / family / "config.json")
    model_folder = save_denoiser(loaded, loaded.model, tmp_path / "model")
    loaded = load(model_folder)
    config = PruneConfig(channel_ratio=0.5, importance="random", scope="global")
    pruned = prune(loaded, config)
    # given the caller's trace of the model (compile --config's load stage), the same cut, and its own trace
    again = prune(loaded, config, traced=trace(loaded, verify=False))
    assert all(torch.equal(again.keep[g], pruned.keep[g]) for g in pruned.keep)
    assert again.traced.sample_size == pruned.traced.sample_size
    with pytest.raises(PruneError, match="`traced` must be a trace of `loaded.model`"):
        prune(loaded, config, traced=pruned.traced)
    save_denoiser(loaded, pruned.model, tmp_path / "pruned", pruned.pruning)
    back = load(tmp_path / "pruned")
    assert back.pruning["modules"] == pruned.pruning["modules"]
    state, expected = back.model.state_dict(), pruned.model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    inputs = tuple(back.family.example_inputs(back.model, 2).values())
    with torch.no_grad():
        assert torch.equal(back.family.adapter(back.model)(*inputs), back.family.adapter(pruned.model)(*inputs))


@pytest.mark.slow
def test_taylor_accumulates_timesteps_until_the_loss_falls_below_the_threshold():
    loaded = load()
    from dgo_compile.channels.data import mnist_digits

    config = PruneConfig(channel_ratio=0.3, threshold=0.2, batch=4, max_timesteps=40)
    pruned = prune(loaded, config, mnist_digits()[0][:64])
    losses = pruned.taylor_losses
    assert 1 <= len(losses) <= 40
    stops = [i for i, loss in enumerate(losses) if loss < config.threshold * max(losses[:i + 1])]
    assert stops in ([len(losses) - 1], []) and (stops or len(losses) == 40)
    magnitude = prune(loaded, PruneConfig(channel_ratio=0.3, importance="magnitude"))
    assert any(not torch.equal(pruned.keep[g], magnitude.keep[g]) for g in pruned.keep)  # the gradients matter



def test_cli_dry_run_lists_groups_and_writes_nothing(tmp_path):
    result = cli("prune", "--dry-run", "--channel-ratio", "0.5", "-o", tmp_path / "p")
    assert result.returncode == 0, result.stderr
    assert "57 channel groups, 54 prunable" in result.stdout and "timestep-only (the time MLP" in result.stdout
    assert "GroupNorm(16) conv_norm_out" in result.stdout and "the model output" in result.stdout
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_cli_prune_then_compile_carries_width_and_time(tmp_path):
    # `prune` as a real command; the follow-up and the error cases run in this process (reliability.cli)
    result = run("prune", "--importance", "magnitude", "--channel-ratio", "0.5", "-o", tmp_path / "p")
    assert result.returncode == 0, result.stderr
    stored = json.loads((tmp_path / "p" / "unet" / "dgo_pruning.json").read_text())
    assert stored["macs"]["after"] < 0.6 * stored["macs"]["before"]
    # `compile` in this process (the same entry point; test_cli.py runs it as a real command)
    result = cli("compile", tmp_path / "p", "--schedule", "deepcache:2", "--steps", "4", "-o", tmp_path / "a")
    assert result.returncode == 0, result.stderr
    macs = json.loads((tmp_path / "a" / "manifest.json").read_text())["macs"]
    assert macs["full_total"] == 4 * stored["macs"]["after"]  # width: the pruned model is what runs
    assert macs["total"] < 0.8 * macs["full_total"]  # time: deepcache reuses blocks on top
    # gradual pruning: the pruned model pruned again, its record still read from the original config
    result = cli("prune", tmp_path / "p", "--importance", "magnitude", "--channel-ratio", "0.3", "-o", tmp_path / "p2")
    assert result.returncode == 0, result.stderr
    again = json.loads((tmp_path / "p2" / "unet" / "dgo_pruning.json").read_text())
    assert again["macs"]["before"] == stored["macs"]["after"] > again["macs"]["after"]
    assert again["earlier"][0]["macs"] == stored["macs"]
    kept = f"{again['macs']['after'] / stored['macs']['before']:.1%}"
    assert next(line for line in result.stdout.splitlines() if "of the original" in line).split("│")[-2].strip() == kept
    assert load(tmp_path / "p2").pruning["macs"] == again["macs"]


@pytest.mark.parametrize("args, message", [
    (["prune", "--channel-ratio", "1.5", "-o", "{tmp}/p"],
     "error: --channel-ratio must be in [0, 1) (the share of channels removed)"),
    (["prune", "--importance", "fisher", "-o", "{tmp}/p"], "error: --importance must be one of taylor, magnitude"),
    (["prune", "--images", "{tmp}/none.safetensors", "-o", "{tmp}/p"], "cannot read 'images' from"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    result = cli(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "p").exists()


def test_prune_config_errors():
    with pytest.raises(PruneError, match="`scope` must be one of uniform, global"):
        PruneConfig(scope="layer")
    with pytest.raises(PruneError, match="`min_group_channels` must be at least 1, got 0"):
        PruneConfig(min_group_channels=0)
    _, plan = plan_channels(load())
    assert len(plan.prunable()) == 54  # of 57: the model output and the two time-MLP groups are fixed


class PaddedDownsample(nn.Module):
    """diffusers' Downsample2D with downsample_padding=0 pads the spatial dims before its conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.out(self.down(F.pad(self.conv(x), (0, 1, 0, 1))))


def test_spatial_padding_keeps_the_channel_axis():
    plan = analyse_channels(exported(PaddedDownsample(), torch.randn(1, 3, 8, 8)))
    assert group_of(plan, "conv.weight", 0) == group_of(plan, "down.weight", 1)


@pytest.mark.parametrize("family", ["unet2d", "dit"])
def test_pruned_model_pruned_again_loads_back_exactly(config_dir, family, tmp_path):
    # gradual pruning: the record of the second cut still rebuilds the model from the original config
    original = load(config_dir / family / "config.json")
    loaded = load(save_denoiser(original, original.model, tmp_path / "model"))
    first = prune(loaded, PruneConfig(channel_ratio=0.5, importance="random"))
    save_denoiser(loaded, first.model, tmp_path / "once", first.pruning)
    once = load(tmp_path / "once")
    second = prune(once, PruneConfig(channel_ratio=0.5, importance="random", seed=1))
    assert second.pruning["macs"]["after"] < second.pruning["macs"]["before"] == first.pruning["macs"]["after"]
    assert [e["config"]["seed"] for e in second.pruning["earlier"]] == [0]
    assert set(second.pruning["modules"]) >= set(first.pruning["modules"])
    for name, cut in first.pruning["tensors"].items():  # DiT's position table: indices of the original table
        assert cut["keep"] != list(range(len(cut["keep"])))  # the first cut really re-indexes it
        assert set(second.pruning["tensors"][name]["keep"]) < set(cut["keep"])
    assert bool(first.pruning["tensors"]) == (family == "dit")
    save_denoiser(once, second.model, tmp_path / "twice", second.pruning)
    back = load(tmp_path / "twice")
    state, expected = back.model.state_dict(), second.model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    inputs = tuple(back.family.example_inputs(back.model, 2).values())
    with torch.no_grad():
        assert torch.equal(back.family.adapter(back.model)(*inputs), back.family.adapter(second.model)(*inputs))
