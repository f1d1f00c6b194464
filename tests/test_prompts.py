"""Calibration and sampling prompts encoded by the pipeline's own text encoder."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dgo_compile.core.errors import DgoError
from dgo_compile.frontend.prompts import encode_prompts, read_prompts
from pipelines import TOKENS, write_text_pipeline
from reliability import cli, run


@pytest.fixture(scope="module")
def text_pipeline(tmp_path_factory):
    return write_text_pipeline(tmp_path_factory.mktemp("text_pipe"))


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red cat\n\n  a blue dog  \n")
    return path


def test_encoding_is_the_text_encoders_last_hidden_state(text_pipeline, prompts_file):
    from transformers import CLIPTextModel, CLIPTokenizer

    assert read_prompts(prompts_file) == ["a red cat", "a blue dog"]
    tensors = encode_prompts(text_pipeline, read_prompts(prompts_file))
    tokenizer = CLIPTokenizer.from_pretrained(text_pipeline / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(text_pipeline / "text_encoder")
    ids = tokenizer(["a red cat", "a blue dog", ""], padding="max_length", max_length=TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        expected = encoder(ids).last_hidden_state
    assert tensors["encoder_hidden_states"].shape == (2, TOKENS, 32)
    torch.testing.assert_close(tensors["encoder_hidden_states"], expected[:2])
    torch.testing.assert_close(tensors["uncond.encoder_hidden_states"], expected[2:])
    assert not torch.allclose(expected[0], expected[1])


def test_cli_encode_prompts_feeds_sample(text_pipeline, prompts_file, tmp_path):
    result = run("encode-prompts", text_pipeline, "--prompts", prompts_file, "-o", tmp_path / "embeds.safetensors")
    assert result.returncode == 0, result.stderr
    stored = load_file(str(tmp_path / "embeds.safetensors"))
    assert stored["encoder_hidden_states"].shape == (2, TOKENS, 32)
    assert stored["uncond.encoder_hidden_states"].shape == (1, TOKENS, 32)
    result = cli("sample", text_pipeline, "--prompt-embeds", tmp_path / "embeds.safetensors", "--guidance-scale",
                 "4", "-n", "3", "--steps", "2", "-o", tmp_path / "grid.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "grid.png").is_file()


def test_cli_optimize_calibrates_on_encoded_prompts(text_pipeline, prompts_file, tmp_path):
    result = cli("optimize", text_pipeline, "--prompts", prompts_file, "--guidance-scale", "3", "--steps", "3",
                 "--iters", "1", "--batch", "1", "--calibration", "3", "-o", tmp_path / "p")
    assert result.returncode == 0, result.stderr
    state = json.loads((tmp_path / "p" / "pruner.json").read_text())
    assert state["config"]["prompts"] == str(prompts_file.resolve())
    assert state["iterations_done"] == 1


def test_conditions_cycle_prompts_over_the_images(text_pipeline):
    from dgo_compile.backend.sampling import conditions_for

    tensors = encode_prompts(text_pipeline, ["a cat", "a dog"])
    conditions, _ = conditions_for(("sample", "timestep", "encoder_hidden_states"), 5, tensors=tensors)
    index = torch.tensor([0, 1, 0, 1, 0])
    torch.testing.assert_close(conditions["encoder_hidden_states"], tensors["encoder_hidden_states"][index])


@pytest.mark.parametrize("case, message", [
    ("no_encoder", "has no text_encoder/ and tokenizer/ to encode prompts with"),
    ("sdxl", "has two text encoders (SDXL-style)"),
    ("empty", "holds no prompts: write one prompt per line"),
])
@pytest.mark.slow
def test_bad_prompt_input_is_one_line_and_writes_nothing(text_pipeline, tmp_path, case, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n" if case == "empty" else "a cat\n")
    pipeline = text_pipeline
    if case != "empty":
        pipeline = tmp_path / "pipe"
        for part in ("unet", "scheduler"):
            shutil.copytree(text_pipeline / part, pipeline / part)
        (pipeline / "model_index.json").write_text((text_pipeline / "model_index.json").read_text())
        if case == "sdxl":
            (pipeline / "text_encoder_2").mkdir()
    # the real command for one case (exit code, stderr); the others in this process (the same entry point)
    command = run if case == "empty" else cli
    for args in (["encode-prompts", pipeline, "--prompts", prompts, "-o", tmp_path / "out.safetensors"],
                 ["optimize", pipeline, "--prompts", prompts, "--steps", "2", "-o", tmp_path / "p"]):
        result = command(*args)
        assert result.returncode == 1
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "p").exists()
    with pytest.raises(DgoError, match=re.escape(message)):
        encode_prompts(pipeline, read_prompts(prompts))
