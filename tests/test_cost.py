"""Cost model: published per-call MACs, exact counts on a hand-computable model, block shares."""

import json

import pytest
import torch
from diffusers import UNet2DModel

from dgo_compile import trace
from dgo_compile.frontend.families import FAMILIES
from dgo_compile.schedules.cost import cost_report
from model_configs import PUBLISHED_MACS, TINY_DIT


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(PUBLISHED_MACS))
def test_published_macs_within_3_percent(key):
    config, published, counted = PUBLISHED_MACS[key]
    with torch.device("meta"):  # architecture only: no weights, no compute
        model = FAMILIES[config["_class_name"]].model_class.from_config(config).eval()
    total = cost_report(trace(model, verify=False)).total
    ours = total.weight_macs if counted == "weight" else total.macs
    assert abs(ours / published - 1) < 0.03, f"{key}: {ours / 1e9:.2f} G vs published {published / 1e9} G"


def test_conv_and_linear_macs_by_hand():
    # One resnet level, no attention: every MAC can be written down.
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                        down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4,
                        add_attention=False).eval()
    report = cost_report(trace(model), batch=1)
    rows = {r.name: r for r in report.rows}
    hw = 8 * 8
    conv3 = lambda cin, cout: hw * cout * cin * 9
    temb = 32  # time_embedding_dim = 4 * block_out_channels[0]
    resnet = lambda cin, cout: conv3(cin, cout) + conv3(cout,
                                                        cout) + cout * temb + (hw * cout * cin if cin != cout else 0)
    assert rows["conv_in"].cost.weight_macs == conv3(1, 8)
    assert rows["down_blocks.0"].cost.weight_macs == resnet(8, 8)
    assert rows["mid_block"].cost.weight_macs == 2 * resnet(8, 8)
    assert rows["up_blocks.0"].cost.weight_macs == resnet(16, 8) + resnet(16, 8)
    assert rows["time_embedding"].cost.weight_macs == 8 * temb + temb * temb
    assert report.total.attention_macs == 0
    assert report.total.params == sum(p.numel() for p in model.parameters())


def test_attention_macs_of_a_dit_block():
    with torch.device("meta"):
        model = FAMILIES["DiTTransformer2DModel"].model_class.from_config(TINY_DIT).eval()
    report = cost_report(trace(model, verify=False), batch=1)
    tokens, heads, head_dim = (8 // 2) ** 2, 2, 8
    per_block = 2 * heads * tokens * tokens * head_dim  # QK^T and AV
    for row in report.rows:
        if row.gateable:
            assert row.cost.attention_macs == per_block


def test_report_shares_and_units_add_up(config_dir):
    from dgo_compile import load

    report = cost_report(trace(load()), batch=1)
    assert sum(report.share(r) for r in report.rows) == pytest.approx(1.0)
    for row in report.rows:
        if row.gateable:
            assert row.units, row.name
            unit_macs = sum(c.macs for c in row.units.values())
            assert unit_macs <= row.cost.macs
            assert unit_macs >= 0.95 * row.cost.macs  # glue outside units (skip adds) is cheap
    data = json.loads(json.dumps(report.to_json()))
    assert [b["name"] for b in data["blocks"] if b["gateable"]][:2] == ["down_blocks.0", "down_blocks.1"]
    assert data["total"]["params"] == sum(p.numel() for p in load().model.parameters())


def test_macs_scale_with_batch():
    from dgo_compile import load

    t = trace(load())
    assert cost_report(t, batch=4).total.macs == 4 * cost_report(t, batch=1).total.macs


def test_compile_analyses_once_and_leaves_the_traced_graph_as_traced(tiny, tmp_path, monkeypatch):
    from dgo_compile.passes import CountCosts

    from dgo_compile.backend.artifact import compile_artifact
    from dgo_compile.schedules.schedule import builtin
    from dgo_compile.schedules.supernet import gateable_elements

    loaded, _, scheduler_config = tiny
    traced = trace(loaded, verify=False)  # its own trace: the session's may have been analysed already

    def snapshot(gm):
        return gm.code, [(n.name, tuple(n.meta)) for n in gm.graph.nodes], tuple(gm.meta)

    before = snapshot(traced.graph_module)
    counted = []
    count = CountCosts.call
    monkeypatch.setattr(CountCosts, "call", lambda self, gm: counted.append(gm) or count(self, gm))
    compile_artifact(traced, builtin("full", 2, gateable_elements(traced)), scheduler_config, tmp_path / "A",
                     sampler_steps=2)
    assert len(counted) == 1  # SuperNet, schedule closure and cost report share one analysis
    assert counted[0] is not traced.graph_module
    assert snapshot(traced.graph_module) == before
