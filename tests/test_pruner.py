"""DiP-GO's pruner: gradients through the trajectory, schedule extraction, resume, the CLI."""

import json
from dataclasses import replace

import pytest
import torch
from dgo_compile.passes import cost_of
from PIL import Image

from dgo_compile import load, trace
from dgo_compile.backend.folding import fold
from dgo_compile.backend.sampling import denoiser_timesteps, initial_noise, trajectory
from dgo_compile.schedules.schedule import Schedule, ScheduleError, builtin_for
from dgo_compile.schedules.schedule_cost import ScheduleCost, extract_schedule
from dgo_compile.schedules.supernet import (
    SuperNetRun,
    activation_bytes,
    build_supernet,
    fits_without_checkpointing,
    gateable_elements,
)
from dgo_compile.search.calibration import consistency
from dgo_compile.search.pruner import (
    OptimizeConfig,
    PrunerError,
    gated_step_fn,
    load_pruner,
    optimize,
)
from reliability import cli, run

DDIM = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "timestep_spacing": "trailing",
        "clip_sample": False}


@pytest.fixture(scope="module")
def tiny(config_dir):
    return trace(load(config_dir / "unet2d" / "config.json"))


@pytest.fixture(scope="module")
def shipped():
    loaded = load()
    return loaded, trace(loaded, verify=False)


def test_activation_estimate_bounds_what_autograd_keeps(tiny):
    """`optimize` keeps activations (no checkpointing) only where the estimate fits: it must not be
    below what autograd really holds for a call."""
    supernet = build_supernet(tiny)
    saved = []

    def keep(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    inputs = tiny.example_inputs(batch=3)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        SuperNetRun(supernet)(*[v.requires_grad_(v.is_floating_point()) for v in inputs.values()])
    estimate = activation_bytes(supernet, 3)
    assert sum(saved) <= estimate <= 3 * sum(saved)
    assert activation_bytes(supernet, 6) == 2 * estimate
    cpu = torch.device("cpu")
    assert fits_without_checkpointing(supernet, 3, 5, cpu)
    assert not fits_without_checkpointing(supernet, 3, 10**9, cpu)


def test_gate_gradients_match_finite_differences_through_later_calls(tiny):
    supernet = build_supernet(tiny)
    elements = gateable_elements(tiny)
    noise = initial_noise(2, (3, 16, 16), 5)
    with torch.no_grad():
        reference = trajectory(tiny, DDIM, noise, 5, clamp=False)  # random weights: nearly every pixel clamps

    def loss(gates, checkpointed=True):
        images = trajectory(gated_step_fn(supernet, elements, gates, checkpointed), DDIM, noise, 5, clamp=False)
        return (images - reference).pow(2).mean()

    gates = torch.ones(5, len(elements))
    gates[2, elements.index("mid_block")] = 0.3  # away from the all-keep optimum, where SSIM's gradient is 0
    gates.requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(gates), gates)
    (plain,) = torch.autograd.grad(loss(gates, checkpointed=False), gates)
    torch.testing.assert_close(grad, plain)
    assert grad[0].abs().sum() == 0  # call 0 always computes: its gates are not used
    # A gate at call 1 acts on the final image only through calls 2..4: check it numerically.
    for element in ("down_blocks.1", "up_blocks.0"):
        b = elements.index(element)
        eps = 1e-2
        with torch.no_grad():
            plus, minus = gates.clone(), gates.clone()
            plus[1, b] += eps
            minus[1, b] -= eps
            numeric = (loss(plus) - loss(minus)) / (2 * eps)
        assert grad[1, b].abs() > 1e-5
        assert grad[1, b].item() == pytest.approx(numeric.item(), rel=0.02)


def test_consistency_gradient_reaches_the_pruner_parameters(tiny, tmp_path):
    config = OptimizeConfig(keep_macs=0.5, steps=4, iters=1, batch=1, calibration=1, dim=16, layers=1)
    trained = optimize(tiny, DDIM, config, tmp_path / "p")
    pruner = trained.pruner
    with torch.no_grad():  # make calls 1-3 reuse every block, so the images clearly differ from the full model's
        pruner.head_bias[1:] = torch.tensor([2.0, 0.0])
    supernet = build_supernet(tiny)
    noise = initial_noise(1, (3, 16, 16), 0)
    with torch.no_grad():
        reference = trajectory(tiny, DDIM, noise, 4)
    gates = pruner.gates()
    assert gates[1:].detach().eq(0).all() and gates[0].detach().eq(1).all()
    images = trajectory(gated_step_fn(supernet, trained.state.elements, gates), DDIM, noise, 4)
    loss = consistency(images, reference)
    assert loss.item() > 0
    grads = dict(zip([n for n, _ in pruner.named_parameters()],
                     torch.autograd.grad(loss, list(pruner.parameters()), allow_unused=True)))
    assert grads["head_bias"][2].abs().sum() > 0  # the reused call wants its blocks back
    assert grads["queries"].abs().sum() > 0 and grads["encoder.layers.0.self_attn.in_proj_weight"].abs().sum() > 0


def test_steps_init_starts_at_the_largest_uniform_schedule_within_the_budget(tiny, tmp_path):
    config = OptimizeConfig(keep_macs=0.3, steps=10, iters=1, batch=1, calibration=1, dim=16, layers=1,
                            lr=1e-9, init="steps")
    trained = optimize(tiny, DDIM, config, tmp_path / "p")
    cost = ScheduleCost(tiny, "block")
    # the largest K whose steps:K keeps at most 30% (+ the extraction tolerance) of the MACs
    kept = {k: cost.kept_ratio(builtin_for(f"steps:{k}", 10, tiny)) for k in range(1, 11)}
    k = max(k for k, share in kept.items() if share <= 0.3 + 0.0125)
    assert kept[k + 1] > 0.3125
    gates = trained.pruner.gates().detach()  # lr 1e-9: still the starting point
    expected = builtin_for(f"steps:{k}", 10, tiny).compute
    assert gates.eq(torch.tensor([[float(any(row))] for row in expected])).all()
    assert trained.state.config.init == "steps" and trained.state.history[0]["kept"] == pytest.approx(kept[k])
    plan, _ = extract_schedule(trained.reuse_margins(), cost, kept[k], "warm")
    assert plan.compute == cost.close(builtin_for(f"steps:{k}", 10, tiny)).compute


def test_steps_searched_init_starts_at_the_k_step_search_on_the_calibration_noise(tiny, tmp_path):
    from dgo_compile.search.selection import calibration_error
    from dgo_compile.search.step_search import searched_steps

    config = OptimizeConfig(keep_macs=0.3, steps=10, iters=1, batch=1, calibration=2, dim=16, layers=1,
                            lr=1e-9, init="steps-searched")
    trained = optimize(tiny, DDIM, config, tmp_path / "p")
    cost = ScheduleCost(tiny, "block")
    k = max(k for k in range(1, 11) if cost.kept_ratio(builtin_for(f"steps:{k}", 10, tiny)) <= 0.3125)
    # the search on the optimizer's own calibration seed, at 8 samples
    expected = searched_steps(tiny, 10, k, calibration_error(tiny, DDIM, replace(config, calibration=8), None))
    gates = trained.pruner.gates().detach()
    assert gates[:, 0].tolist() == [float(c in expected.chosen) for c in range(10)]
    assert sum(gates[:, 0].tolist()) == k
    uniform = [float(any(row)) for row in builtin_for(f"steps:{k}", 10, tiny).compute]
    assert gates[:, 0].tolist() != uniform  # the search moved calls: this is not the `steps` start


@pytest.mark.parametrize("ratio", [0.2, 0.25, 0.5, 0.8])
def test_extracted_schedule_lands_within_tolerance_and_is_valid(shipped, ratio):
    _, traced = shipped
    cost = ScheduleCost(traced)
    scores = torch.rand(50, len(cost.elements), generator=torch.Generator().manual_seed(int(ratio * 100)))
    schedule, kept = extract_schedule(scores, cost, ratio, "learned")
    assert abs(kept - ratio) <= 0.0125
    assert kept == pytest.approx(cost.kept_ratio(schedule))
    assert all(schedule.compute[0]) and cost.close(schedule) == schedule  # valid and already closed
    # Reused pairs are the highest-scoring ones among those not killed by the closure.
    whole, whole_kept = extract_schedule(scores, cost, ratio, "steps", whole_calls=True)
    assert all(all(row) or not any(row) for row in whole.compute)
    assert abs(whole_kept - ratio) <= 0.0125


def test_schedule_cost_is_what_the_folded_graphs_run(shipped):
    loaded, traced = shipped
    cost = ScheduleCost(traced)
    scores = torch.rand(8, len(cost.elements), generator=torch.Generator().manual_seed(3))
    schedule, _ = extract_schedule(scores, cost, 0.6, "learned", tolerance=0.1)
    folded = fold(traced, schedule, denoiser_timesteps(loaded.scheduler_config, 8))
    folded_macs = [sum(cost_of(n).macs for n in folded.variants[key].graph.nodes if n.op == "call_function")
                   for key in folded.step_variant]
    assert cost.per_call(schedule) == folded_macs
    # Reusing the last up block kills the whole UNet but the head: DiP-GO's cascade share.
    shares = cost.cascade_shares()
    assert shares["up_blocks.3"] == pytest.approx(cost.reuse_all_share()) and shares["up_blocks.3"] > 0.95
    assert shares["down_blocks.0"] < shares["up_blocks.3"]


def test_ratio_below_the_smallest_schedule_is_refused(shipped):
    cost = ScheduleCost(shipped[1])
    with pytest.raises(ScheduleError,
                       match=r"the smallest schedule keeps 2\.\d% of the MACs .*ask for `keep_macs` 0\.02"):
        extract_schedule(torch.rand(50, len(cost.elements)), cost, 0.005, "learned")


def test_resume_reaches_the_same_pruner_as_an_uninterrupted_run(tiny, tmp_path):
    config = OptimizeConfig(keep_macs=0.4, steps=4, iters=4, batch=1, calibration=3, dim=16, layers=1,
                            checkpoint_every=1)
    straight = optimize(tiny, DDIM, config, tmp_path / "straight")

    def stop_after_two(record):
        if record["iteration"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        optimize(tiny, DDIM, config, tmp_path / "resumed", on_iteration=stop_after_two)
    with pytest.raises(PrunerError, match="stopped at iteration 2 of 4; finish it with `dgo-compile optimize"):
        load_pruner(tmp_path / "resumed")
    # a kill between the checkpoint and pruner.json writes: the checkpoint's own state wins
    readable = tmp_path / "resumed" / "pruner.json"
    readable.write_text(json.dumps({**json.loads(readable.read_text()), "iterations_done": 1}))
    resumed = optimize(tiny, DDIM, config, tmp_path / "resumed", resume=True)
    assert resumed.state.iterations_done == 4
    assert [r["kept"] for r in resumed.state.history] == [r["kept"] for r in straight.state.history]
    for (name, a), b in zip(straight.pruner.state_dict().items(),
                            load_pruner(tmp_path / "resumed").pruner.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(PrunerError, match=r"optimized with other settings \(lr\)"):
        optimize(tiny, DDIM, OptimizeConfig(**{**config.__dict__, "lr": 0.5}), tmp_path / "resumed", resume=True)
    with pytest.raises(PrunerError, match="already exists; pass `resume`"):
        optimize(tiny, DDIM, config, tmp_path / "straight")



@pytest.mark.slow
def test_cli_optimize_schedule_compile_on_the_shipped_model(tmp_path):
    result = run("optimize", "--steps", "4", "--iters", "2", "--batch", "1", "--calibration", "2", "--keep-macs", "0.5",
                 "-o", tmp_path / "pruner")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "2 iterations" in result.stdout
    state = json.loads((tmp_path / "pruner" / "pruner.json").read_text())
    assert state["complete"] and len(state["history"]) == 2 and state["elements"][0] == "down_blocks.0"
    # `schedule` and `compile` in this process (the same entry point; their own files run them as real commands)
    result = cli("schedule", tmp_path / "pruner", "--keep-macs", "0.6", "-o", tmp_path / "s.json")
    assert result.returncode == 0, result.stderr
    plan = Schedule.load(tmp_path / "s.json")
    assert plan.calls == 4 and all(plan.compute[0])
    with Image.open(tmp_path / "s.png") as heatmap:
        assert heatmap.width > 400 and heatmap.height > 200
    result = cli("compile", "--schedule", tmp_path / "s.json", "--steps", "4", "-o", tmp_path / "artifact")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert manifest["schedule"]["compute"] == [[int(c) for c in row] for row in plan.compute]


@pytest.mark.parametrize("args, message", [
    (["optimize", "--keep-macs", "1.5", "-o", "{tmp}/p"],
     "error: --keep-macs must be in (0, 1] (the kept share of the full "
                                                      "model's MACs), got 1.5"),
    (["optimize", "--granularity", "layer", "-o", "{tmp}/p"], "error: --granularity must be one of block, unit, step"),
    (["optimize", "--init", "random", "-o", "{tmp}/p"], "error: --init must be one of full, steps, steps-searched"),
    (["optimize", "--resume", "-o", "{tmp}/p"], "is not a pruner folder (needs pruner.json and checkpoint.pt)"),
    (["schedule", "{tmp}", "--keep-macs", "0.5"], "is not a pruner folder"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    result = cli(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "p").exists()


@pytest.fixture(scope="module")
def latent_pipeline(tmp_path_factory):
    """A tiny latent text-to-image pipeline folder with a VAE, and a prompt-embeddings file."""
    from safetensors.torch import save_file

    from pipelines import write_text_pipeline

    path = write_text_pipeline(tmp_path_factory.mktemp("latent_pipe"), vae=True)
    save_file({"encoder_hidden_states": torch.randn(2, 4, 32)}, str(path / "prompts.safetensors"))
    return path


@pytest.mark.slow
def test_latent_pipeline_consistency_is_on_vae_decoded_images(latent_pipeline, tmp_path):
    from dgo_compile.search.calibration import vae_decoder

    decode = vae_decoder(latent_pipeline)
    assert decode(torch.randn(2, 4, 16, 16)).shape == (2, 3, 32, 32)
    assert vae_decoder(tmp_path) is None
    result = run("optimize", latent_pipeline, "--prompt-embeds", latent_pipeline / "prompts.safetensors",
                 "--steps", "3", "--iters", "1", "--batch", "1", "--calibration", "2", "-o", tmp_path / "p")
    assert result.returncode == 0, result.stderr
    state = json.loads((tmp_path / "p" / "pruner.json").read_text())
    assert state["decoded_with_vae"] is True and state["elements"] == ["down_blocks.0", "down_blocks.1", "mid_block",
                                                                       "up_blocks.0", "up_blocks.1"]
    result = cli("optimize", latent_pipeline, "--steps", "3", "-o", tmp_path / "q")
    assert result.returncode == 1 and "--prompt-embeds" in result.stderr and not (tmp_path / "q").exists()


def test_device_and_precision_are_checked_before_anything_runs(shipped, tmp_path):
    loaded, traced = shipped
    with pytest.raises(PrunerError, match="`precision` bf16 runs on a GPU; pass `device` cuda"):
        optimize(traced, loaded.scheduler_config, OptimizeConfig(precision="bf16"), tmp_path / "p")
    with pytest.raises(PrunerError, match="`precision` must be one of fp32, bf16, got 'fp16'"):
        OptimizeConfig(precision="fp16")
    with pytest.raises(PrunerError, match="`device` gpu0 is not a torch device"):
        optimize(traced, loaded.scheduler_config, OptimizeConfig(), tmp_path / "p", device="gpu0")
    assert not (tmp_path / "p").exists()


@pytest.mark.cuda
def test_pruner_on_the_gpu_follows_the_cpu_and_runs_in_bf16(shipped, tmp_path):
    loaded, traced = shipped
    config = OptimizeConfig(keep_macs=0.3, steps=4, iters=4, batch=2, calibration=4, lr=3.0)
    user = {k: v.clone() for k, v in traced.graph_module.state_dict().items()}
    cpu = optimize(traced, loaded.scheduler_config, config, tmp_path / "cpu")
    gpu = optimize(traced, loaded.scheduler_config, config, tmp_path / "gpu", device="cuda")
    bf16 = optimize(traced, loaded.scheduler_config, replace(config, precision="bf16"), tmp_path / "bf16",
                    device="cuda")
    assert all(v.device.type == "cpu" and torch.equal(v, user[k]) for k, v in traced.graph_module.state_dict().items())
    assert [h["kept"] for h in gpu.state.history] == [h["kept"] for h in cpu.state.history]
    for a, b in zip(cpu.state.history, gpu.state.history):
        assert b["consistency"] == pytest.approx(a["consistency"], abs=1e-3)
    # Not the weights themselves: lr 3 magnifies the GPU's TF32 convolutions in them beyond 1e-2 (seen on an H100).
    # bf16 against its own bf16 targets: with every gate kept the images agree (later gates may flip otherwise)
    assert bf16.state.history[0]["kept"] == 1.0 and bf16.state.history[0]["consistency"] < 1e-2
    assert gpu.state.peak_memory_mb > 0 and load_pruner(tmp_path / "bf16").state.config.precision == "bf16"


def test_a_pruner_stored_before_init_existed_reads_as_dipgos_start():
    from dataclasses import asdict

    stored = {k: v for k, v in asdict(OptimizeConfig()).items() if k != "init"}
    assert OptimizeConfig.from_json(stored).init == "full"
    assert OptimizeConfig.from_json({**stored, "init": "steps"}).init == "steps"
    assert OptimizeConfig().init == "steps-searched"
