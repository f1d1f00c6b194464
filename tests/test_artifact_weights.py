"""Artifact storage: one shared weights file for every variant, and half-precision artifacts."""

import copy

import onnx
import onnxruntime as ort
import pytest
import torch

from dgo_compile import load, trace
from dgo_compile.backend.artifact import compile_artifact, read_manifest
from dgo_compile.backend.ort_runner import OrtArtifact, session_options
from dgo_compile.schedules.schedule import Schedule
from dgo_compile.schedules.supernet import gateable_elements

SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000}
STEPS = 4
# fp16 artifact vs the fp32 PyTorch graph, one call: max |diff| / max |reference|. Measured on the tiny
# configs: 0.6e-3 to 1.6e-3, below PyTorch's own fp16 (0.8e-3 to 2.3e-3): norms and softmax stay fp32.
FP16_CALL_BOUND = 5e-3


def _schedule(traced) -> Schedule:
    """Every block at call 0 and 2; the middle block (or the second transformer block) reused at 1 and 3."""
    names = gateable_elements(traced)
    reused = "mid_block" if "mid_block" in names else names[1]
    return Schedule("manual", names, tuple(tuple(n != reused or i % 2 == 0 for n in names) for i in range(STEPS)))


@pytest.fixture(scope="module", params=["unet2d", "sd", "sdxl", "dit", "pixart"])
def compiled(request, config_dir, tmp_path_factory):
    """A tiny model of each family, compiled in fp32 and fp16 with a two-variant schedule."""
    traced = trace(load(config_dir / request.param / "config.json"), verify=False)
    schedule = _schedule(traced)
    folder = tmp_path_factory.mktemp(request.param)
    paths = {precision: compile_artifact(traced, schedule, SCHEDULER, folder / precision, sampler_steps=STEPS,
                                         guidance_scale=4.0, precision=precision) for precision in ("fp32", "fp16")}
    return traced, schedule, paths


@pytest.mark.slow
def test_variants_share_one_weights_file(compiled):
    traced, _, paths = compiled
    path = paths["fp32"]
    manifest = read_manifest(path).to_json()
    assert len(manifest["variants"]) == 2
    model_bytes = sum(p.numel() * p.element_size() for p in traced.model.parameters())
    weights = path / "weights.bin"
    # one copy: not more than the model's own weights, though the two variants reference more in all
    assert manifest["weights"]["bytes"] == weights.stat().st_size <= 1.05 * model_bytes
    assert manifest["weights"]["referenced_bytes"] > weights.stat().st_size
    for variant in manifest["variants"]:
        graph = onnx.load(str(path / variant["file"]), load_external_data=False).graph
        locations = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {"weights.bin"}
        inline = [len(t.raw_data) for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
        assert max(inline, default=0) <= 1024  # only the exporter's small constants stay in the graph
    assert sorted(p.name for p in path.iterdir() if p.suffix not in (".onnx", ".json",
                                                                     ".safetensors")) == ["weights.bin"]


def test_a_variant_opens_on_its_own_and_matches_the_shared_session(compiled):
    traced, _, paths = compiled
    path = paths["fp32"]
    manifest = read_manifest(path).to_json()
    shared = OrtArtifact.open(path, ["CPUExecutionProvider"])
    variant = manifest["variants"][0]
    # a plain session reading weights.bin itself, with the runner's session options (so the same kernels run)
    alone = ort.InferenceSession(str(path / variant["file"]), session_options(ort), providers=["CPUExecutionProvider"])
    example = traced.example_inputs(2, seed=3)
    feeds = {n: example[n].numpy() for n in variant["inputs"]}
    feeds.update({n: shared.constants[0][n].repeat(2, 0) for n in variant["constant_inputs"]})
    expected = alone.run(None, feeds)[0]
    actual = shared.sessions[0].run(None, feeds)[0]
    assert (expected == actual).all()
    # variant 0 computes every block: each attention layer is one fused node, none decomposed
    ops = [node.op_type for node in onnx.load(str(path / variant["file"]), load_external_data=False).graph.node]
    layers = sum(node.target is torch.ops.aten.scaled_dot_product_attention.default
                 for node in traced.graph_module.graph.nodes)
    assert ops.count("MultiHeadAttention") == layers > 0 and "Softmax" not in ops
    # every session got its initializers from the one map: one value per distinct tensor
    assert 0 < len(shared.weights._values) <= sum(1 for _ in traced.model.parameters()) + 8


def _torch_fp16(model: torch.nn.Module, family, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """What a diffusers user gets in half precision: the eager model in fp16."""
    half = copy.deepcopy(model).half()
    with torch.no_grad():
        return family.adapter(half)(*(v.half() if v.is_floating_point() else v for v in inputs.values())).float()


def test_fp16_artifact_call_is_as_close_to_fp32_as_pytorch_fp16(compiled):
    traced, schedule, paths = compiled
    half = OrtArtifact.open(paths["fp16"], ["CPUExecutionProvider"])
    inputs = traced.example_inputs(2, seed=1)
    inputs["timestep"] = torch.full_like(inputs["timestep"], half.manifest.scheduler.timesteps[0])
    reference = traced.graph_module(*inputs.values())
    relative = lambda y: ((y - reference).abs().max() / reference.abs().max()).item()
    ours, theirs = relative(half.new_run()(*inputs.values())), relative(_torch_fp16(traced.model, traced.family,
                                                                                    inputs))
    assert ours < FP16_CALL_BOUND and ours <= 1.5 * theirs + 2e-4, (ours, theirs)
    manifest = read_manifest(paths["fp16"]).to_json()
    assert manifest["precision"] == "fp16"
    assert manifest["inputs"][0] == {"name": "sample", "shape": ["batch", *inputs["sample"].shape[1:]],
                                     "dtype": "float16"}
    assert manifest["weights"]["bytes"] < 0.55 * read_manifest(paths["fp32"]).weights.bytes
    # On the CPU provider an fp16 artifact's sessions run without memory arenas (each would keep its
    # variant's fp32 cast of the weights); an fp32 artifact's sessions all allocate from the one arena
    # registered with onnxruntime's environment (an arena each would keep every variant's activations).
    full = OrtArtifact.open(paths["fp32"], ["CPUExecutionProvider"])
    assert [s.get_session_options().enable_cpu_mem_arena for s in half.sessions + full.sessions] == \
        [False] * len(half.sessions) + [True] * len(full.sessions)
    assert [s.get_session_options().get_session_config_entry("session.use_env_allocators")
            for s in full.sessions] == ["1"] * len(full.sessions)
    assert relative(full.new_run()(*inputs.values())) < 1e-5  # and a call through the shared arena is right
