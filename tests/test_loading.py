"""dgo_compile.load: every accepted layout, and one clear line for each bad input."""

import json
import shutil

import pytest
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from dgo_compile import ModelLoadError, UnsupportedModelError, load
from model_configs import TINY, TINY_UNET2D


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe")
    unet = UNet2DModel.from_config(TINY_UNET2D)
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler(clip_sample=False)).save_pretrained(path)
    return path


@pytest.mark.parametrize("name", sorted(TINY))
def test_bare_config_builds_each_family_with_random_weights(config_dir, name):
    loaded = load(config_dir / name / "config.json")
    assert loaded.random_weights and loaded.scheduler_config is None
    assert loaded.class_name == TINY[name]["_class_name"]
    assert not loaded.model.training


def test_pipeline_folder_takes_unet_and_keeps_scheduler(pipeline_dir):
    loaded = load(pipeline_dir)
    assert loaded.class_name == "UNet2DModel" and not loaded.random_weights
    assert loaded.scheduler_config["_class_name"] == "DDIMScheduler"
    assert loaded.scheduler_config["clip_sample"] is False


def test_model_folder_loads_the_saved_weights(pipeline_dir):
    saved = UNet2DModel.from_pretrained(pipeline_dir / "unet")
    loaded = load(pipeline_dir / "unet")
    for (name, a), b in zip(saved.state_dict().items(), loaded.model.state_dict().values()):
        assert (a == b).all(), name


def test_default_is_the_shipped_model():
    loaded = load()
    assert loaded.class_name == "UNet2DModel" and not loaded.random_weights
    assert loaded.scheduler_config["_class_name"] == "DDIMScheduler"


def test_hub_id_is_refused_without_network():
    with pytest.raises(ModelLoadError, match=r"^'runwayml/stable-diffusion-v1-5' is not a local folder; "
                                             r"dgo-compile never downloads"):
        load("runwayml/stable-diffusion-v1-5")


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="^no such file or folder: .*nowhere$"):
        load(tmp_path / "nowhere")


def test_unsupported_class_names_what_is_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(UnsupportedModelError, match="describes AutoencoderKL, which dgo-compile does not compile; "
                                                    "supported: UNet2DModel, UNet2DConditionModel, "
                                                    "DiTTransformer2DModel, PixArtTransformer2DModel"):
        load(tmp_path / "config.json")


def test_truncated_weights(pipeline_dir, tmp_path):
    broken = tmp_path / "unet"
    shutil.copytree(pipeline_dir / "unet", broken)
    weights = broken / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"^could not read the weights in .*unet \(corrupt or truncated\?\)"):
        load(broken)


def test_folder_without_weights_points_at_the_config(pipeline_dir, tmp_path):
    shutil.copy(pipeline_dir / "unet" / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match=r"has config.json but no weights .* pass .*config.json itself"):
        load(tmp_path)


def test_weights_of_another_architecture(pipeline_dir, tmp_path):
    shutil.copytree(pipeline_dir / "unet", tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    config["block_out_channels"] = [16, 64]
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="could not read the weights|do not match its config"):
        load(tmp_path / "unet")


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is not readable JSON"):
        load(tmp_path / "config.json")


def test_pipeline_without_denoiser(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(UnsupportedModelError, match=r"has no unet/ or transformer/ folder"):
        load(tmp_path)


def test_loading_does_not_touch_the_network(pipeline_dir, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert load(pipeline_dir).class_name == "UNet2DModel"
