"""Reliability, "writes NaN silently": a NaN is caught where it first appears, and the message names the
tensor and where it came from (never "nan > nan")."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dgo_compile import load, trace
from dgo_compile.backend.ort_runner import OrtArtifact
from dgo_compile.core.finite import NonFiniteError, check_finite
from dgo_compile.frontend.loading import DEFAULT_MODEL
from reliability import assert_one_line_error, cli

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """The shipped pipeline with one NaN row in its time embedding: it used to compile and sample black."""
    copy = shutil.copytree(DEFAULT_MODEL, tmp_path_factory.mktemp("nan") / "mnist")
    weights = load_file(str(copy / "unet" / WEIGHTS))
    weights["time_embedding.linear_1.weight"][3] = float("nan")
    save_file(weights, str(copy / "unet" / WEIGHTS))
    return copy


class TestNaNIsCaught:
    def test_a_model_with_a_nan_row_does_not_load(self, nan_model):
        with pytest.raises(NonFiniteError, match=r"^parameter time_embedding.linear_1.weight of .*unet has 32 NaN "
                                                 r"values; the weights are corrupt"):
            load(nan_model)

    @pytest.mark.parametrize("command", ["compile", "sample", "prune", "finetune"])
    def test_every_command_names_it_in_one_line(self, nan_model, tmp_path, command):
        output = tmp_path / "out"
        assert_one_line_error(cli(command, nan_model, "-o", output), "parameter time_embedding.linear_1.weight",
                              "NaN values")
        assert not output.exists()

    def test_tracing_blames_the_eager_model_not_tracing(self, tiny):
        loaded, _, _ = tiny
        model = type(loaded.model).from_config(loaded.model.config).eval()
        with torch.no_grad():
            model.conv_in.weight[0] = float("nan")
        with pytest.raises(NonFiniteError) as info:
            trace(model)
        message = str(info.value)
        assert message.startswith("the eager model itself (UNet2DModel) produced an output that has ")
        assert "NaN values" in message and "not a tracing problem" in message and "nan >" not in message

    def test_finetune_stops_at_the_first_non_finite_loss_and_keeps_its_checkpoint(self, tmp_path):
        output = tmp_path / "F"
        result = cli("finetune", "--train-steps", "20", "--batch", "2", "--lr", "1e6", "--ema-decay", "0",
                     "--checkpoint-every", "100", "-o", output)
        # The progress bar's last state comes first (as in a terminal); the error is one line after it.
        result.stderr = result.stderr.strip().splitlines()[-1]
        message = assert_one_line_error(result, "the training loss at step ", "training stopped; ",
                                        "keeps its last checkpoint (step 0): lower --lr (now 1e+06)")
        assert "NaN" in message or "infinite" in message
        record = json.loads((output / "finetune.json").read_text())
        assert record["steps_done"] == 0 and record["final_loss"] is None  # never "final loss nan"
        check_finite(load(output).model, "the kept checkpoint")

    def test_an_artifact_with_a_nan_timestep_constant_does_not_open(self, artifact, tmp_path):
        copy = shutil.copytree(artifact, tmp_path / "A")
        constants = load_file(str(copy / "timestep_constants.safetensors"))
        key = sorted(constants)[1]
        constants[key][0, 0] = float("nan")
        save_file(constants, str(copy / "timestep_constants.safetensors"))
        _record(copy, "timestep_constants.safetensors")  # a consistent artifact, as a buggy compile would write
        with pytest.raises(NonFiniteError, match=rf"^timestep constant {key} of .*A has 1 NaN value; "
                                                 "the artifact is damaged: recompile the model$"):
            OrtArtifact.open(copy)
        assert_one_line_error(cli("sample", copy, "-n", "1", "-o", tmp_path / "g.png"), f"timestep constant {key}")
        assert not (tmp_path / "g.png").exists()

    def test_sampled_images_with_nan_are_not_written(self, artifact, tmp_path):
        """A NaN weight inside the ONNX graph (which no load check reads): caught in the images."""
        import onnx
        from onnx import numpy_helper

        copy = shutil.copytree(artifact, tmp_path / "A")
        graph = onnx.load(str(copy / "variant_000.onnx"))
        for tensor in graph.graph.initializer:
            values = numpy_helper.to_array(tensor)
            if values.dtype == np.float32 and values.ndim == 4:  # a conv weight
                tensor.CopyFrom(numpy_helper.from_array(np.full_like(values, np.nan), tensor.name))
                break
        onnx.save(graph, str(copy / "variant_000.onnx"))
        _record(copy, "variant_000.onnx")
        result = cli("sample", copy, "-n", "2", "-o", tmp_path / "g.png")
        assert_one_line_error(result, f"the image batch sampled from {copy} has ", "NaN values",
                              "the model or artifact is broken; nothing was written")
        assert not (tmp_path / "g.png").exists()


def _record(folder, name):
    """Record a changed file's size and checksum in the manifest, so the artifact's own checks pass."""
    from dgo_compile.backend.artifact_files import file_record

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = file_record(folder / name)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_check_finite_names_the_tensor_and_counts():
    with pytest.raises(NonFiniteError, match=r"^tensor b of x has 1 NaN value and 2 infinite values \(and 1 more "
                                             r"tensor\)$"):
        check_finite({"a": torch.ones(2), "b": torch.tensor([float("nan"), float("inf"), -float("inf")]),
                      "c": torch.tensor([float("nan")])}, "x")
    check_finite({"ints": torch.arange(3), "fine": torch.zeros(2)}, "y")
