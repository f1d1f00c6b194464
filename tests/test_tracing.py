"""Tracing: every family's graph matches eager, blocks and units are identifiable, guards hold."""

import copy
import json

import pytest
import torch
from dgo_compile.passes import AnnotateBlocks, AnnotateBlocksConfig, block_of

from dgo_compile import TraceError, load, trace
from dgo_compile.core.errors import AnnotationMissingError
from dgo_compile.frontend.tracing import check_against_eager
from model_configs import TINY

EXPECTED_BLOCKS = {
    "unet2d": ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"],
    "sd": ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"],
    "dit": ["transformer_blocks.0", "transformer_blocks.1"],
}


@pytest.fixture(scope="module")
def traced(config_dir):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = trace(load(config_dir / name / "config.json"))
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_graph_matches_eager_exactly(traced, name, batch):
    # Same kernels in the same order: float32 results agree to rounding noise.
    assert check_against_eager(traced(name), batch=batch) <= 1e-5


@pytest.mark.parametrize("name", sorted(TINY))
def test_inputs_are_named_after_the_family(traced, name):
    placeholders = [n.name for n in traced(name).graph_module.graph.nodes if n.op == "placeholder"]
    expected = {
        "unet2d": ["sample", "timestep"],
        "unet2d_class_cond": ["sample", "timestep", "class_labels"],
        "sd": ["sample", "timestep", "encoder_hidden_states"],
        "sdxl": ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"],
        "dit": ["sample", "timestep", "class_labels"],
        "pixart": ["sample", "timestep", "encoder_hidden_states"],
    }[name]
    assert placeholders == expected


@pytest.mark.parametrize("name", sorted(EXPECTED_BLOCKS))
def test_block_structure(traced, name):
    assert [b.name for b in traced(name).blocks] == EXPECTED_BLOCKS[name]


def test_unet_units_in_call_order(traced):
    blocks = {b.name: b for b in traced("unet2d").blocks}
    assert blocks["down_blocks.1"].units == ("down_blocks.1.resnets.0", "down_blocks.1.attentions.0")
    assert blocks["mid_block"].units == ("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1")
    assert blocks["up_blocks.0"].units == ("up_blocks.0.resnets.0", "up_blocks.0.attentions.0",
                                           "up_blocks.0.resnets.1", "up_blocks.0.attentions.1",
                                           "up_blocks.0.upsamplers.0")
    assert blocks["down_blocks.0"].kind == "DownBlock2D"


def test_every_block_and_unit_owns_graph_nodes(traced):
    for name in ("unet2d", "sdxl", "dit", "pixart"):
        t = traced(name)
        AnnotateBlocks(AnnotateBlocksConfig(t.blocks)).call(t.graph_module)
        seen_blocks = {block_of(n).block for n in t.graph_module.graph.nodes if n.op == "call_function"}
        seen_units = {block_of(n).unit for n in t.graph_module.graph.nodes if n.op == "call_function"}
        for spec in t.blocks:
            assert spec.name in seen_blocks, (name, spec.name)
            assert set(spec.units) <= seen_units, (name, set(spec.units) - seen_units)


def test_convolutions_are_attributed_to_their_module(traced):
    t = traced("unet2d")
    AnnotateBlocks(AnnotateBlocksConfig(t.blocks)).call(t.graph_module)
    convs = [n for n in t.graph_module.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    modules = [block_of(n).module for n in convs]
    assert modules[0] == "conv_in" and modules[-1] == "conv_out"
    assert "down_blocks.0.resnets.0.conv1" in modules
    assert block_of(convs[1]) == block_of(convs[1]).__class__(
        "down_blocks.0.resnets.0.conv1", "down_blocks.0", "down_blocks.0.resnets.0")


def test_annotation_accessor_asks_for_the_pass(config_dir):
    t = trace(load(config_dir / "unet2d" / "config.json"), verify=False)
    node = next(n for n in t.graph_module.graph.nodes if n.op == "call_function")
    with pytest.raises(AnnotationMissingError, match="run pass 'annotate_blocks' first"):
        block_of(node)


def test_tracing_leaves_the_model_untouched(config_dir):
    loaded = load(config_dir / "sd" / "config.json")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    modules_before = [type(m) for m in loaded.model.modules()]
    trace(loaded)
    assert [type(m) for m in loaded.model.modules()] == modules_before
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())


def test_guarded_batch_range_is_checked_past_the_guard_without_running_it(monkeypatch):
    # diffusers' Upsample2D branches on batch >= 64 (a layout-only `contiguous()`); export turns that
    # into a guard batch <= 63. trace() must prove the graph right past it without a batch-64 forward
    # (64 full-size forwards took over 20 minutes on SD-1.5): it compares a second, fake-tensor export.
    monkeypatch.delenv("DGO_COMPILE_EXPORT_CACHE", raising=False)  # worked out here, not read from the cache
    loaded = load()
    batches = []
    handle = loaded.model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    traced = trace(loaded)
    handle.remove()
    assert any("63" in g for g in traced.guards)
    assert traced.max_batch is None  # the branch past the guard is the same computation
    real = [b for b in batches if type(b) is int]  # export's own calls see a symbolic batch
    assert real == [1]  # one real eager forward, at batch 1
    assert check_against_eager(traced, batch=64) <= 1e-5  # and the claim holds


def test_the_verdict_past_the_guard_is_cached_and_a_damaged_one_worked_out_again(monkeypatch, tmp_path):
    """The second export costs as much as the first; the compile cache keeps its answer per traced graph."""
    import dgo_compile.frontend.tracing as tracing

    monkeypatch.setenv("DGO_COMPILE_EXPORT_CACHE", str(tmp_path))
    exports, real = [], tracing._export
    monkeypatch.setattr(tracing, "_export", lambda *a: exports.append(a[1]["sample"].shape[0]) or real(*a))
    loaded = load()
    first = trace(loaded, verify=False)
    assert exports == [2, 64] and first.max_batch is None
    verdict, = (tmp_path / "trace").iterdir()
    assert json.loads(verdict.read_text())["same_computation"] is True
    second = trace(loaded, verify=False)
    assert exports == [2, 64, 2] and second.max_batch is None
    verdict.write_text('{"same_comp')  # damaged: worked out again and rewritten
    assert trace(loaded, verify=False).max_batch is None
    assert exports[-2:] == [2, 64] and json.loads(verdict.read_text())["same_computation"] is True


class _Branchy(torch.nn.Module):
    """Takes another path at batch >= 8: a layout-only one, or one that changes the values."""

    def __init__(self, changes_values: bool):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.changes_values = changes_values

    def forward(self, *inputs):
        x = inputs[0]
        if x.shape[0] >= 8:
            x = x * 2 if self.changes_values else x.contiguous()
        return self.linear(x)


@pytest.mark.parametrize("changes_values", [False, True])
def test_a_guarded_branch_is_compared_op_for_op(changes_values):
    from dgo_compile.frontend.tracing import _export, _plain_graph_module, batch_bound, same_computation

    model = _Branchy(changes_values)
    below = _export(model, {"x": torch.randn(2, 4)}, "toy")
    assert batch_bound(below) == 7
    past = _export(model, {"x": torch.randn(8, 4)}, "toy")
    graphs = [_plain_graph_module(e.module(), ("x",)) for e in (below, past)]
    assert same_computation(*graphs) is (not changes_values)


def test_mismatch_is_an_error(traced):
    t = traced("unet2d")
    original = t.graph_module
    broken = copy.deepcopy(original)
    conv = next(n for n in broken.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    with broken.graph.inserting_after(conv):
        shifted = broken.graph.call_function(torch.ops.aten.add.Tensor, (conv, 1e-2))
    conv.replace_all_uses_with(shifted, delete_user_cb=lambda user: user is not shifted)
    broken.recompile()
    t.graph_module = broken
    try:
        with pytest.raises(TraceError,
                           match=r"traced graph of UNet2DModel differs from eager at batch 2: max \|diff\|"):
            check_against_eager(t, batch=2)
    finally:
        t.graph_module = original
