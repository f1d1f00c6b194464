"""`finetune --data DIR`: the user's own training data, as rows of a latents folder read by memory map.

DIR is one of two kinds:

- **Images** (.png .jpg .jpeg .webp .bmp): at the top level, or one sub-folder per class. For a
  class-conditional model the sub-folders are the class labels: folders named by whole numbers
  use that number (so ImageNet ids stay ImageNet ids), otherwise sorted names map to 0, 1, ...;
  the map is recorded in `finetune.json`. A text-conditional model needs captions: a
  `metadata.jsonl` with `file_name` (relative to DIR) and `text` per image, the diffusers /
  `datasets` image-folder convention.
- **Latents**: `*.safetensors` files, each holding `latents` (N, C, H, W) and one N-row tensor
  per condition the denoiser takes, named as its input: `class_labels` (N,) integers,
  `encoder_hidden_states` (N, tokens, dim), SDXL's `text_embeds` and `time_ids`, PixArt's
  `resolution` and `aspect_ratio`. Read with safetensors (never pickle).

Images are prepared once, as diffusers' training scripts do (examples/unconditional_image_generation,
examples/text_to_image): resize the shorter side to the model's resolution (bilinear), centre
crop, scale to [-1, 1]. This uses PIL, which diffusers already depends on; torchvision's transforms
do the same but add a large dependency, and `datasets`' image-folder loader adds pyarrow and a
second cache. A pipeline with a `vae/` encodes them with its own VAE (the posterior mean, times
`scaling_factor`), captions go through its own text encoder, and PixArt's resolution and aspect
ratio come from the image size. The result is written in the latents format above, in shards, to
`<output>.work/data/<digest>/`, keyed by a digest of the image files, captions, VAE and text
encoder, so a rerun on the same -o skips encoding. Preparing and training stream: no step holds
more than a shard of the dataset in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from dgo_compile.core.configs import FinetuneError
from dgo_compile.core.files import file_digest
from dgo_compile.core.outputs import exclusive, make_staging
from dgo_compile.frontend.families import config_size, family_of
from dgo_compile.frontend.loading import LoadedModel

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
SAMPLE = "latents"  # the tensor of a latents file that is the denoiser's sample
PREPARED_FORMAT = "dgo-compile-data-1"  # part of the cache key: bump when preparation changes
SHARD_BYTES = 64 << 20  # a cache shard holds about this much
ENCODE_BATCH = 8  # images through the VAE at once
COMPUTED = ("resolution", "aspect_ratio")  # PixArt's size conditions, computed for image folders


@dataclass
class DataSource:
    """Training rows: a list of latents files (the user's, or the prepared cache) and what the run records."""

    files: list[tuple[Path, int]]  # (safetensors file, rows)
    names: tuple[str, ...]  # the tensors read per row: SAMPLE, then the model's conditions
    record: dict = field(default_factory=dict)  # for finetune.json: path, kind, digest, rows, class map

    def __len__(self) -> int:
        return sum(rows for _, rows in self.files)

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows at `index` (positions in the whole dataset), each tensor float32 but class labels."""
        from safetensors import safe_open

        starts, start = [], 0
        for _, rows in self.files:
            starts.append(start)
            start += rows
        where = torch.bucketize(index, torch.tensor(starts), right=True) - 1
        picked: dict[str, list[torch.Tensor | None]] = {name: [None] * len(index) for name in self.names}
        for file_number in where.unique().tolist():
            path = self.files[file_number][0]
            with safe_open(str(path), framework="pt") as handle:
                for name in self.names:
                    tensor = handle.get_slice(name)
                    for position in (where == file_number).nonzero().flatten().tolist():
                        row = int(index[position]) - starts[file_number]
                        picked[name][position] = tensor[row:row + 1]
        out = {name: torch.cat(parts) for name, parts in picked.items()}
        return {k: v if k == "class_labels" else v.float() for k, v in out.items()}


def conditions(loaded: LoadedModel) -> tuple[str, ...]:
    """The denoiser's inputs besides sample and timestep: what every training row must carry."""
    return tuple(n for n in family_of(loaded.model).input_names(loaded.model) if n not in ("sample", "timestep"))


def open_data(folder: str | os.PathLike, loaded: LoadedModel, cache_root: Path, prepare: bool = True,
              on_image: Callable[[int, int], None] | None = None) -> DataSource:
    """The training rows of `folder` for `loaded`'s denoiser; images are prepared into `cache_root` first
    (only with `prepare`: other processes of a distributed run wait for process 0's cache)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FinetuneError(f"`data` {folder} is not a folder; pass a folder of images or of .safetensors latents",
                            field="data")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p, folder))
    latents = [p for p in files if p.suffix == ".safetensors"]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if latents and images:
        raise FinetuneError(f"`data` {folder} holds both images and .safetensors latents; keep one kind per folder",
                            field="data")
    if latents:
        return _latent_folder(folder, latents, loaded)
    if not images:
        raise FinetuneError(f"`data` {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no .safetensors "
                            "latents", field="data")
    return _image_folder(folder, images, loaded, cache_root, prepare, on_image)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _latent_folder(folder: Path, paths: list[Path], loaded: LoadedModel) -> DataSource:
    from safetensors import safe_open

    wanted = (SAMPLE, *conditions(loaded))
    files, row_shapes = [], {}
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as handle:
                shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
                dtypes = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise FinetuneError(f"cannot read {path} as safetensors ({first_line}); replace or remove it") from exc
        missing = [n for n in wanted if n not in shapes]
        extra = sorted(set(shapes) - set(wanted))
        if missing or extra:
            what = (f"lacks {', '.join(missing)}" if missing
                    else f"holds {', '.join(extra)}, which the model does not take")
            raise FinetuneError(f"{path} {what}; a latents file for this {loaded.class_name} holds exactly "
                                f"{', '.join(wanted)}")
        rows = {shapes[n][0] if shapes[n] else None for n in wanted}
        if len(rows) != 1 or None in rows or len(shapes[SAMPLE]) != 4:
            raise FinetuneError(f"{path}: latents must be (N, C, H, W) and every tensor must have the same N rows; "
                                f"got {', '.join(f'{n} {list(shapes[n])}' for n in wanted)}")
        if "class_labels" in wanted and not dtypes["class_labels"].startswith(("I", "U")):  # I64, U8, ...
            raise FinetuneError(f"{path}: class_labels must be integers, got {dtypes['class_labels']}")
        for name in wanted:
            row_shapes.setdefault(name, (path, shapes[name][1:]))
            first, shape = row_shapes[name]
            if shapes[name][1:] != shape:
                raise FinetuneError(f"{first} holds {name} rows of {_shape(shape)} and {path} of "
                                    f"{_shape(shapes[name][1:])}: one size per folder")
        files.append((path, shapes[SAMPLE][0]))
    _check_sample(row_shapes[SAMPLE][1], loaded, f"the latents in {folder}")
    source = DataSource(files, wanted, {"path": str(folder.resolve()), "kind": "latents",
                                        "files": len(files)})
    if not len(source):
        raise FinetuneError(f"`data` {folder}: its latents files hold no rows", field="data")
    if "class_labels" in wanted:
        _check_labels(source, loaded, folder)
    source.record.update(rows=len(source), digest=file_digest_of(paths, folder))
    return source


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def _check_sample(shape: tuple[int, ...], loaded: LoadedModel, what: str) -> None:
    cfg = loaded.model.config
    expected = (cfg.in_channels, *config_size(loaded.model))
    if tuple(shape) != expected:
        raise FinetuneError(f"{what} are {_shape(shape)}; {loaded.source} ({loaded.class_name}) denoises "
                            f"{_shape(expected)} samples")


def _check_labels(source: DataSource, loaded: LoadedModel, folder: Path) -> None:
    from safetensors import safe_open

    top = _label_limit(loaded)
    for path, _ in source.files:
        with safe_open(str(path), framework="pt") as handle:
            labels = handle.get_tensor("class_labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= top):
            raise FinetuneError(f"{path}: class_labels must be in 0..{top - 1} for {loaded.source}, got "
                                f"{int(labels.min())}..{int(labels.max())}")


def _label_limit(loaded: LoadedModel) -> int:
    """How many class labels the model embeds (DiT's null class included)."""
    null = family_of(loaded.model).null_class_label(loaded.model)
    return null + 1 if null is not None else loaded.model.config.num_class_embeds


def file_digest_of(paths: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + file_digest(path).encode())
    return digest.hexdigest()


# --- image folders ----------------------------------------------------------------------------


def _image_folder(folder: Path, images: list[Path], loaded: LoadedModel, cache_root: Path, prepare: bool,
                  on_image: Callable[[int, int], None] | None) -> DataSource:
    wanted = conditions(loaded)
    unknown = [n for n in wanted if n not in ("class_labels", "encoder_hidden_states", *COMPUTED)]
    if unknown:
        raise FinetuneError(f"{loaded.source} takes {', '.join(unknown)}, which an image folder cannot give: pass "
                            "`data` a folder of .safetensors latents that holds them", field="data")
    pipeline = loaded.source if loaded.source.is_dir() else None
    vae = pipeline / "vae" if pipeline is not None and (pipeline / "vae" / "config.json").is_file() else None
    if loaded.model.config.get("in_channels") not in (1, 3) and vae is None:
        raise FinetuneError(f"{loaded.source} denoises {loaded.model.config.get('in_channels')}-channel samples and "
                            "has no vae/ to encode images with; pass its pipeline folder, or `data` a folder of "
                            ".safetensors latents", field="data")
    if vae is not None:
        latent_channels = json.loads((vae / "config.json").read_text()).get("latent_channels")
        if latent_channels != loaded.model.config.get("in_channels"):
            raise FinetuneError(f"{vae} makes {latent_channels}-channel latents; {loaded.source} denoises "
                                f"{loaded.model.config.get('in_channels')} channels")
    labels, class_map = _class_labels(folder, images, loaded, "class_labels" in wanted)
    captions = _captions(folder, images, loaded) if "encoder_hidden_states" in wanted else None
    parts = [PREPARED_FORMAT, json.dumps(config_size(loaded.model)), file_digest_of(images, folder),
             json.dumps(labels), json.dumps(captions)]
    parts += [file_digest(vae)] if vae is not None else [str(loaded.model.config.get("in_channels"))]
    parts += [file_digest(pipeline / "text_encoder"), file_digest(pipeline / "tokenizer")] if captions else []
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    cache = cache_root / digest[:32]
    if not (cache / "data.json").is_file() and prepare:
        with exclusive(cache_root):
            if not (cache / "data.json").is_file():
                _prepare(folder, images, labels, captions, loaded, vae, wanted, cache, on_image)
    try:
        index = json.loads((cache / "data.json").read_text())
    except (OSError, ValueError) as exc:
        raise FinetuneError(f"the prepared data in {cache} is missing or damaged ({exc}); remove it and "
                            "fine-tune again") from exc
    files = [(cache / name, rows) for name, rows in index["shards"]]
    record = {"path": str(folder.resolve()), "kind": "images", "rows": len(images), "digest": digest,
              "cache": str(cache.resolve())}
    if class_map is not None:
        record["class_labels"] = class_map
    if captions is not None:
        record["captions"] = True
    return DataSource(files, (SAMPLE, *wanted), record)


def _class_labels(folder: Path, images: list[Path], loaded: LoadedModel,
                  conditional: bool) -> tuple[list[int] | None, dict[str, int] | None]:
    """Per image its class label, from its sub-folder; and the folder-name -> label map."""
    if not conditional:
        return None, None
    classes = [p.relative_to(folder).parts[0] if len(p.relative_to(folder).parts) > 1 else None for p in images]
    if None in classes:
        loose = images[classes.index(None)]
        raise FinetuneError(f"{loaded.source} is class-conditional and {loose} is not in a class sub-folder: put "
                            f"the images of each class in their own sub-folder of {folder}")
    names = sorted(set(classes))
    numbered = all(n.isdigit() for n in names)
    class_map = {n: int(n) for n in names} if numbered else {n: i for i, n in enumerate(names)}
    top = _label_limit(loaded)
    null = family_of(loaded.model).null_class_label(loaded.model)
    if max(class_map.values()) >= (null if null is not None else top):
        raise FinetuneError(f"{folder} has {len(names)} class sub-folders (labels up to {max(class_map.values())}); "
                            f"{loaded.source} embeds {null if null is not None else top} classes")
    return [class_map[c] for c in classes], class_map


def _captions(folder: Path, images: list[Path], loaded: LoadedModel) -> list[str]:
    """Per image its caption from metadata.jsonl; refused when the model's pipeline cannot encode them."""
    pipeline = loaded.source
    if not (pipeline / "text_encoder" / "config.json").is_file() or not (pipeline / "tokenizer").is_dir():
        raise FinetuneError(f"{loaded.source} takes text conditions but has no text_encoder/ and tokenizer/ to "
                            "encode captions with; pass its pipeline folder, or `data` a folder of latents with "
                            "encoder_hidden_states", field="data")
    if (pipeline / "text_encoder_2").is_dir():
        raise FinetuneError(f"{loaded.source} has two text encoders (SDXL-style); pass `data` a folder of "
                            "latents with encoder_hidden_states, text_embeds and time_ids", field="data")
    metadata = folder / METADATA_FILE
    if not metadata.is_file():
        raise FinetuneError(f"{loaded.source} takes text conditions and {folder} has no {METADATA_FILE}: add one "
                            'line {"file_name": ..., "text": ...} per image')
    by_file: dict[str, str] = {}
    try:
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                entry = json.loads(line)
                if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or \
                        not isinstance(entry.get("text"), str):
                    raise ValueError(f"line {number} needs string file_name and text")
                by_file[os.path.normpath(entry["file_name"])] = entry["text"]
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FinetuneError(f"cannot read {metadata}: {exc}") from exc
    missing = [p for p in images if str(p.relative_to(folder)) not in by_file]
    if missing:
        raise FinetuneError(f"{len(missing)} of {len(images)} images have no caption in {metadata} (first: "
                            f"{missing[0].relative_to(folder)}); add a line for each")
    return [by_file[str(p.relative_to(folder))] for p in images]


def _prepare(folder: Path, images: list[Path], labels: list[int] | None, captions: list[str] | None,
             loaded: LoadedModel, vae_folder: Path | None, wanted: tuple[str, ...], cache: Path,
             on_image: Callable[[int, int], None] | None) -> None:
    """Write `images` (and their conditions) as latents shards into `cache`, atomically."""
    from safetensors.torch import save_file

    from dgo_compile.frontend.prompts import prompt_encoder

    vae = _load_vae(vae_folder) if vae_folder is not None else None
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    height, width = (side * scale for side in config_size(loaded.model))
    mode = "L" if (vae.config.in_channels if vae is not None else loaded.model.config.in_channels) == 1 else "RGB"
    encode_text = prompt_encoder(loaded.source) if captions is not None else None
    staging = make_staging(cache)
    shards, pending, done = [], [], 0
    try:
        def flush() -> None:
            rows = {name: torch.cat([p[name] for p in pending]).contiguous() for name in pending[0]}
            name = f"shard-{len(shards):05d}.safetensors"
            save_file(rows, str(staging / name))
            shards.append((name, len(rows[SAMPLE])))
            pending.clear()

        for chunk in _chunks(list(range(len(images))), ENCODE_BATCH):
            pixels = torch.stack([_read_image(images[i], mode, height, width) for i in chunk])
            rows = {SAMPLE: _encode(vae, pixels) if vae is not None else pixels}
            if labels is not None:
                rows["class_labels"] = torch.tensor([labels[i] for i in chunk])
            if encode_text is not None:
                rows["encoder_hidden_states"] = encode_text([captions[i] for i in chunk])
            if "resolution" in wanted:
                rows["resolution"] = torch.tensor([[float(height), float(width)]] * len(chunk))
                rows["aspect_ratio"] = torch.tensor([[height / width]] * len(chunk))
            pending.append({n: rows[n] for n in (SAMPLE, *wanted)})
            done += len(chunk)
            if on_image is not None:
                on_image(done, len(images))
            if sum(t.numel() * t.element_size() for p in pending for t in p.values()) >= SHARD_BYTES:
                flush()
        if pending:
            flush()
        (staging / "data.json").write_text(json.dumps({"format": PREPARED_FORMAT, "source": str(folder.resolve()),
                                                       "shards": shards}, indent=1))
        if cache.parent.is_dir():  # one prepared dataset per output: an older one is out of date
            for old in cache.parent.iterdir():
                if old.is_dir() and not old.name.startswith("."):
                    shutil.rmtree(old, ignore_errors=True)
        os.rename(staging, cache)
    except OSError as exc:
        raise FinetuneError(f"cannot write the prepared data to {cache}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _read_image(path: Path, mode: str, height: int, width: int) -> torch.Tensor:
    """diffusers' training transform: shorter side resized to cover (height, width) bilinearly, centre crop,
    [-1, 1]; (channels, height, width)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            scale = max(height / image.height, width / image.width)
            # torchvision's Resize(shorter side), which diffusers' scripts use: the longer side rounds down
            size = (max(width, int(image.width * scale)), max(height, int(image.height * scale)))
            image = image.resize(size, Image.BILINEAR)
            left, top = int(round((size[0] - width) / 2.0)), int(round((size[1] - height) / 2.0))
            image = image.crop((left, top, left + width, top + height))
            array = np.asarray(image, dtype=np.float32)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FinetuneError(f"cannot read the image {path} ({first_line}); replace or remove it") from exc
    tensor = torch.from_numpy(array / 127.5 - 1.0)
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def _load_vae(folder: Path):
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval().requires_grad_(False)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FinetuneError(f"cannot load the VAE in {folder} to encode images: {first_line}") from exc


@torch.no_grad()
def _encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Latents as the pipeline's denoiser sees them: the posterior mean, shifted and scaled as configured."""
    latents = vae.encode(pixels).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor
