"""VideoCrafter2Pipeline: DDIM sampling against the original, save/load, hooks, loading, video export."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from customcrafter.convert import convert_checkpoint
from customcrafter.loading import base_model_signature, load_base_pipeline
from customcrafter.pipeline import VideoCrafter2Pipeline
from customcrafter.video_io import export_gif, export_mp4, read_video

SMALL = {"num_inference_steps": 3, "num_frames": 4, "height": 64, "width": 64, "progress": False}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def tiny():
    return load_base_pipeline("tiny")


@pytest.mark.parametrize("eta", [0, 1])
def test_golden_ddim_sampling(eta, fixtures_dir, tmp_path):
    folder = convert_checkpoint(fixtures_dir / "tiny_lvdm_checkpoint.safetensors", tmp_path / "conv",
                                config=fixtures_dir / "tiny_lvdm_config.yaml", components=["unet"])
    pipe = VideoCrafter2Pipeline.from_pretrained(folder)  # vae and text encoder not converted: None
    assert pipe.vae is None and pipe.text_encoder is None
    g = load_file(str(fixtures_dir / "tiny_lvdm_goldens.safetensors"))
    k = f"ddim_eta{eta}."
    steps = []
    samples = pipe(prompt_embeds=g[k + "cond"], negative_prompt_embeds=g[k + "uncond"], num_inference_steps=5,
                   guidance_scale=12.0, eta=float(eta), fps=28, num_frames=4, height=128, width=192,
                   latents=g[k + "x_T"], noise_sampler=lambda i, shape: g[k + "step_noise"][i], output_type="latent",
                   on_step_begin=lambda p, i, t: steps.append((i, t)), progress=False).frames
    assert [t for _, t in steps] == sorted(g[k + "timesteps"].tolist(), reverse=True)
    assert [i for i, _ in steps] == list(range(5))
    err = rel_err(samples, g[k + "samples"])
    print(f"ddim eta={eta} golden rel err {err:.2e}")
    assert err <= 1e-4


def test_outputs_are_reproducible_and_typed(tiny):
    run = lambda **kw: tiny("a dog", generator=torch.Generator().manual_seed(0), **SMALL, **kw).frames  # noqa: E731
    video = run()
    assert video.dtype == np.uint8 and video.shape == (1, 4, 64, 64, 3) and video.std() > 1
    assert np.array_equal(video, run())
    pt = run(output_type="pt")
    assert pt.shape == (1, 3, 4, 64, 64) and pt.min() >= -1 and pt.max() <= 1
    assert run(output_type="latent").shape == (1, 4, 4, 8, 8)
    other = tiny("a cat", generator=torch.Generator().manual_seed(0), **SMALL).frames
    assert not np.array_equal(video, other)


def _step_by_step(generators, shape, steps):
    from diffusers.utils.torch_utils import randn_tensor

    return [randn_tensor(shape, generator=generators, device=torch.device("cpu"), dtype=torch.float32)
            for _ in range(steps)]


@pytest.mark.parametrize("videos", [1, 2])
def test_host_step_noise_draws_what_step_by_step_draws_and_leaves_the_generators_as_it(videos):
    """The background thread's draws are the step-by-step draws, in order (one generator, or one per video), and
    after close() the generators are where step-by-step drawing leaves them."""
    from customcrafter.pipeline import HostStepNoise

    shape, steps = (videos, 4, 3, 8, 8), 7
    seeded = lambda: [torch.Generator().manual_seed(10 + v) for v in range(videos)]  # noqa: E731
    ours_generators, ref_generators = seeded(), seeded()
    pick = (lambda g: g[0]) if videos == 1 else (lambda g: g)
    noise = HostStepNoise(pick(ours_generators), shape, steps, torch.device("cpu"))
    ours = [noise(step, shape).clone() for step in range(steps)]
    noise.close()
    expected = _step_by_step(pick(ref_generators), shape, steps)
    assert all(torch.equal(a, b) for a, b in zip(ours, expected, strict=True))
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(ours_generators, ref_generators, strict=True))
    with pytest.raises(ValueError, match="shape"):
        noise(0, (videos, 4, 3, 8, 9))


def test_host_step_noise_reraises_a_draw_error_at_its_step(monkeypatch):
    from customcrafter import pipeline

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("draw failed")
        return torch.zeros(args[0])

    monkeypatch.setattr(pipeline, "randn_tensor", failing)
    noise = pipeline.HostStepNoise(torch.Generator(), (1, 2), 4, torch.device("cpu"))
    assert torch.equal(noise(1, (1, 2)), torch.zeros(1, 2))
    with pytest.raises(RuntimeError, match="draw failed"):
        noise(2, (1, 2))
    noise.close()


def test_the_loop_takes_host_step_noise_and_closes_it_even_when_it_fails(tiny, monkeypatch):
    """With host generators and an accelerator the pipeline draws the step noise with HostStepNoise (what the CPU
    cannot show directly: here the CPU run is given one), gets the same video as drawing step by step, and closes
    the sampler after the loop, also when the loop raises."""
    from customcrafter.pipeline import HostStepNoise

    closed = []

    class Recorded(HostStepNoise):
        def close(self):
            closed.append(True)
            super().close()

    def step_noise(generator, shape, num_steps, noise_sampler):
        return Recorded(generator, shape, num_steps, torch.device("cpu"))

    run = lambda: tiny("a dog", generator=torch.Generator().manual_seed(0), eta=1.0, output_type="latent",  # noqa: E731
                       **SMALL).frames
    expected = run()
    monkeypatch.setattr(tiny, "_step_noise", step_noise)
    assert torch.equal(run(), expected) and closed == [True]

    def boom(pipe, step, timestep):
        if step == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        tiny("a dog", generator=torch.Generator().manual_seed(0), eta=1.0, on_step_begin=boom, **SMALL)
    assert closed == [True, True]


def test_accelerator_with_host_generators_takes_host_step_noise(tiny, monkeypatch):
    from customcrafter import pipeline

    made = []
    monkeypatch.setattr(pipeline.VideoCrafter2Pipeline, "_compute_device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(pipeline, "HostStepNoise", lambda *args: made.append(args) or "host noise")
    generator = torch.Generator().manual_seed(0)
    assert tiny._step_noise(generator, (1, 4, 2, 8, 8), 5, None) == "host noise"
    assert made == [(generator, (1, 4, 2, 8, 8), 5, torch.device("cuda"))]


def test_cfg_is_one_call_with_the_latents_once_and_skipped_at_scale_one(tiny, monkeypatch):
    """CFG: one UNet call per step with the latents once and the (negative, positive) contexts (the UNet repeats
    the latents after what sees no context)."""
    batches = []
    forward = tiny.unet.forward

    def spy(sample, timestep, encoder_hidden_states, *args, **kwargs):
        batches.append((sample.shape[0], timestep.shape[0], kwargs["fps"].shape[0], encoder_hidden_states.shape[0]))
        return forward(sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(tiny.unet, "forward", spy)
    tiny(["a", "b"], **SMALL, output_type="latent")
    assert batches == [(2, 2, 2, 4)] * 3
    batches.clear()
    tiny("a", guidance_scale=1.0, **SMALL, output_type="latent")
    assert batches == [(1, 1, 1, 1)] * 3


def test_prompt_and_negative_prompt_are_encoded_in_one_pass_with_the_same_result(tiny, monkeypatch):
    calls = []
    encode = tiny.encode_prompt
    monkeypatch.setattr(tiny, "encode_prompt", lambda prompts: calls.append(list(prompts)) or encode(prompts))
    g = torch.Generator().manual_seed(3)
    from_text = tiny(["a dog", "a cat"], negative_prompt="blurry", generator=g, **SMALL, output_type="latent")
    assert calls == [["blurry", "blurry", "a dog", "a cat"]]
    cond, uncond = encode(["a dog", "a cat"]), encode(["blurry"])
    g = torch.Generator().manual_seed(3)
    from_embeds = tiny(prompt_embeds=cond, negative_prompt_embeds=uncond, generator=g, **SMALL, output_type="latent")
    torch.testing.assert_close(from_text, from_embeds, rtol=1e-5, atol=1e-6)
    g = torch.Generator().manual_seed(3)
    one_listed = tiny(["a dog", "a cat"], negative_prompt=["blurry"], generator=g, **SMALL, output_type="latent")
    torch.testing.assert_close(one_listed, from_text, rtol=0, atol=0)  # a one-element list is repeated
    with pytest.raises(ValueError, match="3 negative prompts for 2 prompts"):
        tiny(["a dog", "a cat"], negative_prompt=["x", "y", "z"], **SMALL)


def test_save_and_load_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} >= {"model_index.json", "unet", "vae", "text_encoder",
                                                                "tokenizer", "scheduler"}
    loaded = load_base_pipeline(str(tmp_path / "saved"))
    assert base_model_signature(loaded) == base_model_signature(tiny)
    assert loaded.base_model_id == str(tmp_path / "saved")
    kw = dict(SMALL, output_type="pt")
    a = tiny("a dog", generator=torch.Generator().manual_seed(1), **kw).frames
    b = loaded("a dog", generator=torch.Generator().manual_seed(1), **kw).frames
    assert torch.equal(a, b)


def test_tiny_is_the_same_model_in_another_process(tiny):
    code = ("from customcrafter.loading import load_base_pipeline; import torch; p = load_base_pipeline('tiny');"
            "print(sum(float(v.double().sum()) for v in p.unet.state_dict().values()))")
    other = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
                  .stdout.split()[-1])
    here = sum(float(v.double().sum()) for v in tiny.unet.state_dict().values())
    assert other == here
    assert tiny.base_model_id == "tiny"
    # the zero-initialised layers of diffusers were given values, so every path contributes
    zero = [k for k, v in tiny.unet.state_dict().items() if v.ndim >= 2 and not v.any()]
    assert not zero


def test_tiny_video_exports_to_mp4_and_gif(tiny, tmp_path):
    frames = tiny("a dog", generator=torch.Generator().manual_seed(0), **SMALL).frames[0]
    mp4 = export_mp4(frames, tmp_path / "v.mp4", fps=8)
    back = read_video(mp4)
    assert back.shape == frames.shape and np.abs(back.astype(float) - frames).mean() < 12
    gif = read_video(export_gif(frames, tmp_path / "v.gif"))
    assert gif.shape == frames.shape
    with pytest.raises(ValueError, match="uint8"):
        export_mp4(frames.astype(np.float32), tmp_path / "bad.mp4")
    assert not (tmp_path / "bad.mp4").exists()


def test_loading_a_checkpoint_converts_once_and_caches(tmp_path, monkeypatch, tiny):
    import customcrafter.convert as convert

    calls = []

    def fake_convert(checkpoint, target, **_):  # the conversion itself is tested elsewhere; here: the cache
        calls.append(checkpoint)
        tiny.save_pretrained(target)
        return target

    monkeypatch.setattr(convert, "convert_checkpoint", fake_convert)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"weights")
    first = load_base_pipeline(str(ckpt), cache_dir=tmp_path / "cache")
    second = load_base_pipeline(str(ckpt), cache_dir=tmp_path / "cache")
    assert len(calls) == 1 and base_model_signature(first) == base_model_signature(second)


def test_loading_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_base_pipeline(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_base_pipeline(str(tmp_path / "missing.ckpt"))
    with pytest.raises(FileNotFoundError, match="hub"):
        load_base_pipeline("nobody-here/not-a-model", cache_dir=tmp_path)


def test_hub_file_form_is_downloaded_not_taken_for_a_local_path(tmp_path, monkeypatch, tiny):
    """``repo_id:filename`` ends in .ckpt like a local checkpoint, but is fetched from the hub."""
    import customcrafter.convert as convert
    import customcrafter.loading as loading

    fetched = []

    def fake_download(model):
        fetched.append(model)
        (tmp_path / "hub.ckpt").write_bytes(b"weights")
        return tmp_path / "hub.ckpt"

    monkeypatch.setattr(loading, "_download", fake_download)
    monkeypatch.setattr(convert, "convert_checkpoint", lambda checkpoint, target, **_: tiny.save_pretrained(target))
    pipe = load_base_pipeline("VideoCrafter/VideoCrafter2:model.ckpt", cache_dir=tmp_path / "cache")
    assert fetched == ["VideoCrafter/VideoCrafter2:model.ckpt"] and pipe.unet is not None


def test_a_folder_with_only_some_components_loads(tmp_path, tiny):
    """convert.py can write a folder with the UNet alone; loading it leaves the others None."""
    import copy

    partial = copy.deepcopy(tiny)
    partial.register_modules(vae=None, text_encoder=None)
    partial.save_pretrained(tmp_path / "unet_only")
    pipe = load_base_pipeline(str(tmp_path / "unet_only"))
    assert pipe.vae is None and pipe.text_encoder is None and not pipe.unet.training


def test_more_steps_than_the_schedule_has_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match=r"num_inference_steps \(1000\) must be <= 999"):
        tiny("a dog", num_inference_steps=1000, **{k: v for k, v in SMALL.items() if k != "num_inference_steps"})


def test_optimize_pipeline_on_the_cpu_leaves_float32(tiny):
    import copy

    from customcrafter.performance import SpeedConfig, optimize_pipeline

    pipe = copy.deepcopy(tiny).to(dtype=torch.bfloat16)
    optimize_pipeline(pipe, SpeedConfig(dtype="bf16"))
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder)} == {torch.float32}


def test_encode_prompt_shape_and_bad_sizes(tiny):
    assert tiny.encode_prompt(["a", "b"]).shape == (2, 77, 32)
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny("a", height=60, **{k: v for k, v in SMALL.items() if k != "height"})
    with pytest.raises(ValueError, match="exactly one"):
        tiny(**SMALL)
