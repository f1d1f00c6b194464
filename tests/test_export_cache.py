"""The export cache (dgo_compile.backend.export_cache): a graph exported once is copied, byte for byte,
when the same graph with the same weights and options is exported again; anything else exports afresh."""

import json
import logging

import onnx
import pytest
import torch
from torch import fx, nn

from dgo_compile.backend import export as export_module
from dgo_compile.backend.export import export_onnx
from dgo_compile.backend.export_cache import ENTRY
from dgo_compile.core.cache import ENV


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x)) * 2.0


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache folder for this test, and a count of the real exports."""
    monkeypatch.setenv(ENV, str(tmp_path / "cache"))
    root = tmp_path / "cache" / "onnx"
    exports, real = [], export_module._export
    monkeypatch.setattr(export_module, "_export", lambda *a, **k: exports.append(a[3].name) or real(*a, **k))
    return root, exports


def graph(seed=0):
    torch.manual_seed(seed)
    return fx.symbolic_trace(Small())


INPUTS = {"x": torch.randn(2, 3, 8, 8)}


def test_an_export_names_nothing_of_this_machine_and_repeats_byte_for_byte(tmp_path, monkeypatch):
    """torch.onnx records every node's stack (this checkout's paths, a per-process counter): dropped."""
    monkeypatch.delenv(ENV, raising=False)
    first = export_onnx(graph(), INPUTS, tmp_path / "a" / "m.onnx")
    second = export_onnx(graph(), INPUTS, tmp_path / "b" / "m.onnx")
    assert first[0].read_bytes() == second[0].read_bytes()
    assert str(tmp_path).encode() not in first[0].read_bytes() and b"export_cache" not in first[0].read_bytes()


def test_the_same_graph_is_exported_once_and_copied_byte_for_byte(cache, tmp_path):
    root, exports = cache
    first = export_onnx(graph(), INPUTS, tmp_path / "a" / "m.onnx", external_data_bytes=0)
    second = export_onnx(graph(), INPUTS, tmp_path / "b" / "m.onnx", external_data_bytes=0)
    assert exports == ["m.onnx"]
    assert [p.name for p in first] == [p.name for p in second] == ["m.onnx", "m.onnx.data"]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second))
    entry, = [p for p in root.iterdir()]  # one entry, no staging folder left
    assert sorted(p.name for p in entry.iterdir()) == [ENTRY, "m.onnx", "m.onnx.data"]
    onnx.checker.check_model(str(second[0]))


@pytest.mark.parametrize("change", ["weight", "input_shape", "file_name", "max_batch", "code"])
def test_anything_the_export_reads_is_part_of_the_key(cache, tmp_path, change):
    _, exports = cache
    export_onnx(graph(), INPUTS, tmp_path / "a" / "m.onnx")
    module, inputs, name, options = graph(), INPUTS, "m.onnx", {}
    if change == "weight":
        with torch.no_grad():
            module.conv.weight[0, 0, 0, 0] += 1e-3
    elif change == "input_shape":
        inputs = {"x": torch.randn(2, 3, 16, 8)}
    elif change == "file_name":
        name = "n.onnx"
    elif change == "max_batch":
        options = {"max_batch": 8}
    else:
        relu = next(n for n in module.graph.nodes if n.target is torch.relu)
        relu.target = torch.sigmoid
        module.recompile()
    export_onnx(module, inputs, tmp_path / "b" / name, **options)
    assert exports == ["m.onnx", name]


@pytest.mark.parametrize("damage", ["bytes", "record", "outside"])
def test_a_damaged_entry_is_exported_afresh_and_replaced(cache, tmp_path, caplog, damage):
    root, exports = cache
    reference = export_onnx(graph(), INPUTS, tmp_path / "a" / "m.onnx", external_data_bytes=0)
    entry, = root.iterdir()
    if damage == "bytes":
        data = entry / "m.onnx.data"
        data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\1")
    elif damage == "record":
        (entry / ENTRY).write_text("{")
    else:  # a graph whose weights point out of the entry, with a record that matches it
        model = onnx.load(str(entry / "m.onnx"), load_external_data=False)
        for tensor in model.graph.initializer:
            for field in tensor.external_data:
                if field.key == "location":
                    field.value = "../elsewhere.data"
        onnx.save(model, str(entry / "m.onnx"))
        from dgo_compile.backend.artifact_files import file_record

        record = json.loads((entry / ENTRY).read_text())
        record["files"]["m.onnx"] = file_record(entry / "m.onnx")
        (entry / ENTRY).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
        again = export_onnx(graph(), INPUTS, tmp_path / "b" / "m.onnx", external_data_bytes=0)
    assert exports == ["m.onnx", "m.onnx"] and "is damaged" in caplog.text
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(reference, again))
    export_onnx(graph(), INPUTS, tmp_path / "c" / "m.onnx", external_data_bytes=0)  # the replaced entry is used
    assert len(exports) == 2


def test_without_the_variable_nothing_is_cached(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    exports, real = [], export_module._export
    monkeypatch.setattr(export_module, "_export", lambda *a, **k: exports.append(1) or real(*a, **k))
    export_onnx(graph(), INPUTS, tmp_path / "a" / "m.onnx")
    export_onnx(graph(), INPUTS, tmp_path / "b" / "m.onnx")
    assert len(exports) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_an_unwritable_cache_only_costs_the_export(cache, tmp_path, caplog):
    root, exports = cache
    root.parent.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        written = export_onnx(graph(), INPUTS, tmp_path / "a" / "m.onnx")
    assert [p.name for p in written] == ["m.onnx"] and exports == ["m.onnx"]
    assert "cannot be written" in caplog.text and "damaged" not in caplog.text
    assert root.parent.read_text() == "not a folder"


def test_an_fp16_compile_after_an_fp32_one_exports_nothing(cache, tiny, tmp_path):
    """The artifact writer exports each variant in fp32 and converts after: the second precision is all hits."""
    from dgo_compile.backend.artifact import compile_artifact
    from dgo_compile.schedules.schedule import builtin_for

    _, exports = cache
    _, traced, scheduler_config = tiny
    plan = builtin_for("deepcache:2", 2, traced)
    compile_artifact(traced, plan, scheduler_config, tmp_path / "fp32", sampler_steps=2)
    assert len(exports) == 2  # the full and the cached variant
    compile_artifact(traced, plan, scheduler_config, tmp_path / "fp16", sampler_steps=2, precision="fp16")
    assert len(exports) == 2
    manifest = json.loads((tmp_path / "fp16" / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and len(manifest["variants"]) == 2
