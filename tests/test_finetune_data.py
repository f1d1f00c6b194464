"""`finetune --data`: image folders (resized, cropped, class sub-folders, captions, VAE-encoded once and
cached) and latents folders, on tiny models of each family, with data the tests write; bad folders."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import pipelines
from dgo_compile import load
from dgo_compile.channels import data_folder
from dgo_compile.channels.data_folder import open_data
from dgo_compile.channels.finetune import FinetuneConfig, FinetuneError, finetune, read_finetune
from dgo_compile.channels.finetune_data import data_batch, noise_schedule
from dgo_compile.frontend.families import family_of
from model_configs import TINY_DIT, TINY_UNET2D, TINY_UNET2D_CLASS_COND
from test_finetune import finetune_interrupted_at

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255)}


def _image(path, size, colour=None, seed=0):
    """An RGB image of `size` (w, h): one colour, or noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    pixels = np.full((h, w, 3), colour, np.uint8) if colour else \
        np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _colour_folder(folder, per_class=4):
    """Solid red and blue images of assorted sizes, one sub-folder per colour."""
    for name, colour in COLOURS.items():
        for i in range(per_class):
            _image(folder / name / f"{i}.png", (17 + 5 * i, 40 - 3 * i), colour)
    return folder


def _mean_loss(history, window=5):
    return sum(h["loss"] for h in history[:window]) / window, sum(h["loss"] for h in history[-window:]) / window


def _weights(folder, name=WEIGHTS):
    return load_file(folder / name)


def test_images_are_resized_centre_cropped_and_scaled(tmp_path):
    model = load(pipelines.write_model_pipeline(tmp_path / "m", TINY_UNET2D))  # 3x16x16
    # 40 wide, 20 high: black quarters left and right, white half in the middle. Resized to 32x16, the
    # centre crop of 16 is the white half.
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 10:30] = 255
    (tmp_path / "data").mkdir()
    Image.fromarray(pixels).save(tmp_path / "data" / "a.png")
    Image.fromarray(pixels[:, :, 0]).save(tmp_path / "data" / "grey.png")  # one channel: converted to RGB
    data = open_data(tmp_path / "data", model, tmp_path / "cache")
    rows = data.rows(torch.tensor([0, 1]))["latents"]
    assert rows.shape == (2, 3, 16, 16) and data.names == ("latents",)
    assert torch.equal(rows[:, :, :, 2:14], torch.ones(2, 3, 16, 12))  # away from the blurred borders
    assert rows.min() >= -1 and rows[:, :, :, 0].mean() < 1
    assert data.record["kind"] == "images" and data.record["rows"] == 2 and "class_labels" not in data.record


def test_class_folders_become_labels_and_the_model_learns_them(tmp_path):
    model = pipelines.write_model_pipeline(tmp_path / "m", TINY_UNET2D_CLASS_COND)
    data = _colour_folder(tmp_path / "data")
    source = open_data(data, load(model), tmp_path / "cache")
    rows = source.rows(torch.arange(8))
    assert rows["class_labels"].tolist() == [0] * 4 + [1] * 4  # sorted names: blue 0, red 1
    assert (rows["latents"][:4, 2] == 1).all() and (rows["latents"][4:, 0] == 1).all()
    result = finetune(model, FinetuneConfig(train_steps=30, batch=8, lr=1e-3, ema_decay=0, data=str(data)),
                      tmp_path / "out")
    first, last = _mean_loss(result.record.history)
    assert last < 0.7 * first, (first, last)  # measured: 0.50
    assert read_finetune(tmp_path / "out").data["class_labels"] == {"blue": 0, "red": 1}
    numbered = tmp_path / "numbered"
    for label in ("3", "7"):
        _image(numbered / label / "x.png", (16, 16), seed=int(label))
    assert open_data(numbered, load(model), tmp_path / "cache2").record["class_labels"] == {"3": 3, "7": 7}


def test_image_folder_run_resumes_bit_identically_and_refuses_changed_data(tmp_path):
    model = pipelines.write_model_pipeline(tmp_path / "m", TINY_UNET2D)
    data = tmp_path / "data"
    for i in range(6):
        _image(data / f"{i}.jpg", (20 + i, 18), seed=i)
    config = FinetuneConfig(train_steps=4, batch=2, checkpoint_every=2, data=str(data))
    straight = finetune(model, config, tmp_path / "straight")
    finetune_interrupted_at(3, model, config, tmp_path / "resumed")
    resumed = finetune(model, config, tmp_path / "resumed", resume=True)
    assert resumed.record.history == straight.record.history
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a.keys() == _weights(model).keys() and any(not torch.equal(a[k], v) for k, v in _weights(model).items())
    _image(data / "0.jpg", (20, 18), seed=99)
    with pytest.raises(FinetuneError, match="files of `data` .* changed since"):
        finetune(model, config, tmp_path / "resumed", resume=True)


def _caption_folder(folder, n=4):
    lines = []
    for i in range(n):
        _image(folder / f"{i}.png", (40, 36 + i), seed=i)
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a picture number {'abcd'[i]}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_text_to_image_pipeline_encodes_images_and_captions_once(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    from dgo_compile.frontend.prompts import prompt_encoder

    sd = pipelines.write_text_pipeline(tmp_path / "sd", vae=True)  # latent 4x16x16, 32x32 pixels
    data = _caption_folder(tmp_path / "data")
    calls = []
    encode = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: calls.append(len(x)) or encode(self, x))
    config = FinetuneConfig(train_steps=3, batch=2, ema_decay=0, data=str(data))
    first = finetune(sd, config, tmp_path / "out")
    assert sum(calls) == 4  # every image once
    record = read_finetune(tmp_path / "out").data
    assert record["captions"] and record["rows"] == 4
    cached = open_data(data, load(sd), tmp_path / "out.work" / "data")
    rows = cached.rows(torch.arange(4))
    captions = [f"a picture number {c}" for c in "abcd"]
    torch.testing.assert_close(rows["encoder_hidden_states"], prompt_encoder(sd)(captions))
    vae = AutoencoderKL.from_pretrained(sd / "vae")
    # 40x36: the shorter side to 32 (the longer to int(40 * 32 / 36) = 35, as torchvision's Resize), centre crop
    image = Image.open(data / "0.png").convert("RGB").resize((35, 32), Image.BILINEAR).crop((2, 0, 34, 32))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    with torch.no_grad():
        expected = vae.encode(pixels[None]).latent_dist.mode() * vae.config.scaling_factor
    torch.testing.assert_close(rows["latents"][:1], expected, atol=1e-4, rtol=1e-4)

    shutil.rmtree(tmp_path / "out")  # a rerun on the same -o reads the cache: no VAE, no text encoder
    monkeypatch.setattr(data_folder, "_load_vae", lambda *a: pytest.fail("the VAE was loaded again"))
    monkeypatch.setattr("dgo_compile.frontend.prompts.prompt_encoder", lambda *a: pytest.fail("captions encoded again"))
    second = finetune(sd, config, tmp_path / "out")
    assert second.record.history == first.record.history
    before = [p.name for p in (tmp_path / "out.work" / "data").iterdir() if not p.name.startswith(".")]
    _image(data / "0.png", (40, 36), seed=50)  # other images: encoded again, the old cache replaced
    monkeypatch.undo()
    shutil.rmtree(tmp_path / "out")
    finetune(sd, config, tmp_path / "out")
    after = [p.name for p in (tmp_path / "out.work" / "data").iterdir() if not p.name.startswith(".")]
    assert len(after) == 1 and after != before


def _latent_file(path, n, size=8, labels=True, seed=0):
    """n latents, each one of 10 fixed patterns (its class label) plus a little noise."""
    patterns = torch.randn(10, 4, size, size, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, 10, (n,), generator=generator)
    tensors = {"latents": patterns[classes] + 0.1 * torch.randn(n, 4, size, size, generator=generator)}
    if labels:
        tensors["class_labels"] = classes
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def test_latent_folder_trains_a_dit(tmp_path):
    dit = pipelines.write_model_pipeline(tmp_path / "dit", TINY_DIT)
    _latent_file(tmp_path / "data" / "a.safetensors", 6)
    _latent_file(tmp_path / "data" / "part" / "b.safetensors", 10, seed=1)
    source = open_data(tmp_path / "data", load(dit), tmp_path / "cache")
    assert len(source) == 16 and source.record["kind"] == "latents" and not (tmp_path / "cache").exists()
    b = load_file(tmp_path / "data" / "part" / "b.safetensors")
    rows = source.rows(torch.tensor([7, 0, 15]))
    assert torch.equal(rows["latents"][0], b["latents"][1])
    assert torch.equal(rows["class_labels"][2], b["class_labels"][9])
    # DiT's label dropout: about 10% of the labels become the null class (10), which guidance needs trained
    batch = data_batch(source, noise_schedule(load(dit).scheduler_config, ""), 400, torch.Generator().manual_seed(0),
                       null_label=TINY_DIT["num_embeds_ada_norm"])
    labels = batch.inputs[2]
    assert 0.05 < (labels == 10).float().mean() < 0.15 and labels.max() == 10
    finetune(dit, FinetuneConfig(train_steps=30, batch=8, lr=3e-3, ema_decay=0, checkpoint_every=30,
                                 data=str(tmp_path / "data")), tmp_path / "out")
    before, after = _held_out_loss(dit, source), _held_out_loss(tmp_path / "out", source)
    assert after < 0.8 * before, (before, after)  # measured: 0.63


def _held_out_loss(model_path, source):
    """The data loss of the model at `model_path` on one fixed batch of 64 noisings of `source`'s rows."""
    loaded = load(model_path)
    batch = data_batch(source, noise_schedule(loaded.scheduler_config, ""), 64, torch.Generator().manual_seed(123))
    with torch.no_grad():
        prediction = family_of(loaded.model).call(loaded.model, *batch.inputs)
    return torch.nn.functional.mse_loss(prediction[:, :batch.target.shape[1]], batch.target).item()


def test_data_with_distillation_pairs_only_the_same_architecture(tmp_path):
    dit = pipelines.write_model_pipeline(tmp_path / "dit", TINY_DIT)
    _latent_file(tmp_path / "data" / "a.safetensors", 4)
    config = FinetuneConfig(train_steps=1, batch=2, ema_decay=0, distill=0.5, data=str(tmp_path / "data"))
    result = finetune(dit, config, tmp_path / "out", teacher=dit)
    assert result.record.history[0]["distill"] < 1e-10  # the student starts as the teacher
    unet = pipelines.write_model_pipeline(tmp_path / "unet", TINY_UNET2D)
    with pytest.raises(FinetuneError, match="differ in class, sample shape or inputs"):
        finetune(dit, config, tmp_path / "other", teacher=unet)


def _bad_case(tmp_path, case):
    """(model, data folder) for one kind of bad --data."""
    unet = lambda config=TINY_UNET2D: pipelines.write_model_pipeline(tmp_path / "m", config)  # noqa: E731
    data = tmp_path / "data"
    data.mkdir()
    if case == "empty":
        (data / "notes.txt").write_text("no images here")
        return unet(), data
    if case == "unreadable image":
        _image(data / "good.png", (16, 16), seed=0)
        (data / "bad.png").write_bytes(b"not a png at all")
        return unet(), data
    if case == "loose image":
        _colour_folder(data, per_class=1)
        _image(data / "loose.png", (16, 16), seed=0)
        return unet(TINY_UNET2D_CLASS_COND), data
    if case == "float labels":
        save_file({"latents": torch.zeros(2, 4, 8, 8), "class_labels": torch.zeros(2)}, str(data / "a.safetensors"))
        return pipelines.write_model_pipeline(tmp_path / "m", TINY_DIT), data
    if case in ("mixed latents", "missing labels", "wrong channels", "both kinds"):
        _latent_file(data / "a.safetensors", 2)
        if case == "mixed latents":
            _latent_file(data / "b.safetensors", 2, size=16)
        if case == "missing labels":
            _latent_file(data / "b.safetensors", 2, labels=False)
        if case == "both kinds":
            _image(data / "x.png", (8, 8), seed=0)
        return pipelines.write_model_pipeline(tmp_path / "m", TINY_DIT if case != "wrong channels" else
                                              {**TINY_DIT, "in_channels": 3, "out_channels": 6}), data
    sd = pipelines.write_text_pipeline(tmp_path / "m", vae=True)
    _caption_folder(data)
    if case == "no captions":
        (data / "metadata.jsonl").unlink()
    else:  # one image without a caption
        _image(data / "extra.png", (32, 32), seed=9)
    return sd, data


@pytest.mark.parametrize("case, message", [
    ("empty", r"holds no images \(.png, .jpg, .jpeg, .webp, .bmp\) and no .safetensors latents"),
    ("unreadable image", r"cannot read the image .*bad.png \(cannot identify image file"),
    ("loose image", "is class-conditional and .*loose.png is not in a class sub-folder"),
    ("mixed latents", "holds latents rows of 4x8x8 and .*b.safetensors of 4x16x16: one size per folder"),
    ("missing labels", "b.safetensors lacks class_labels; a latents file for this DiTTransformer2DModel holds "
                       "exactly latents, class_labels"),
    ("wrong channels", "the latents in .* are 4x8x8; .* denoises 3x8x8 samples"),
    ("both kinds", "holds both images and .safetensors latents"),
    ("float labels", "a.safetensors: class_labels must be integers, got F32"),
    ("no captions", "takes text conditions and .* has no metadata.jsonl"),
    ("missing caption", r"1 of 5 images have no caption in .*metadata.jsonl \(first: extra.png\)"),
])
def test_bad_data_folders_are_refused_in_one_line_writing_nothing(tmp_path, case, message):
    model, data = _bad_case(tmp_path, case)
    with pytest.raises(FinetuneError, match=message) as info:
        finetune(model, FinetuneConfig(train_steps=1, batch=2, data=str(data)), tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()


def run(*args):
    return subprocess.run([sys.executable, "-m", "dgo_compile.cli", "finetune", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_cli_finetune_on_a_data_folder(tmp_path):
    model = pipelines.write_model_pipeline(tmp_path / "m", TINY_UNET2D_CLASS_COND)
    data = _colour_folder(tmp_path / "data", per_class=1)
    result = run(model, "--data", data, "--train-steps", "2", "--batch", "2", "--timestep-sampling", "logit_normal",
                 "--logit-mean", "0.5", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    config = read_finetune(tmp_path / "out").config
    assert config.data == str(data) and (config.timestep_sampling, config.logit_mean) == ("logit_normal", 0.5)
    (data / "blue" / "0.png").write_bytes(b"broken")
    result = run(model, "--data", data, "-o", tmp_path / "other")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot read the image" in result.stderr and not (tmp_path / "other").exists()
