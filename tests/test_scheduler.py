"""VideoCrafter2DDIMScheduler: schedule and forward noising against the original; DDIM step behaviour."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from customcrafter.scheduler import VideoCrafter2DDIMScheduler


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture
def goldens(fixtures_dir):
    return load_file(str(fixtures_dir / "tiny_lvdm_goldens.safetensors"))


def test_golden_schedule_and_scale(goldens):
    s = VideoCrafter2DDIMScheduler()
    errors = {"betas": rel_err(s.betas, goldens["schedule.betas"]),
              "alphas_cumprod": rel_err(s.alphas_cumprod, goldens["schedule.alphas_cumprod"]),
              "scale_arr": rel_err(s.scale_arr, goldens["schedule.scale_arr"])}
    print("schedule golden rel errs", errors)
    assert s.scale_arr.shape == goldens["schedule.scale_arr"].shape == (1400,)
    assert all(e <= 1e-4 for e in errors.values())


def test_golden_q_sample_is_add_noise(goldens):
    s = VideoCrafter2DDIMScheduler()
    xt = s.add_noise(goldens["q_sample.x0"], goldens["q_sample.noise"], goldens["q_sample.t"])
    err = rel_err(xt, goldens["q_sample.xt"])
    print(f"q_sample golden rel err {err:.2e}")
    assert err <= 1e-4


def test_timesteps_are_the_originals():
    s = VideoCrafter2DDIMScheduler()
    s.set_timesteps(50)
    assert s.timesteps[0] == 981 and s.timesteps[-1] == 1 and len(s.timesteps) == 50
    s.set_timesteps(5, device="meta")  # stays on the CPU whatever the device: indexing never syncs
    assert s.timesteps.tolist() == [801, 601, 401, 201, 1] and s.timesteps.device.type == "cpu"


def _stock():
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def test_without_scale_the_step_is_stock_ddim_and_with_scale_only_late_steps_change():
    g = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(1, 4, 2, 4, 4, generator=g) for _ in range(3))
    plain, scaled, stock = VideoCrafter2DDIMScheduler(use_scale=False), VideoCrafter2DDIMScheduler(), _stock()
    for s in (plain, scaled, stock):
        s.set_timesteps(50)
    for t in (981, 501, 401, 21, 1):
        ref = stock.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(plain.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample, ref)
        with_scale = scaled.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
        if t - 20 >= 400:  # s(t) = s(t-20) = 0.7: the scale cancels
            torch.testing.assert_close(with_scale, ref)
        else:
            assert rel_err(with_scale, ref) > 1e-4


def test_add_noise_scales_x0():
    s = VideoCrafter2DDIMScheduler()
    x0 = torch.ones(3, 4, 2, 2, 2)
    xt = s.add_noise(x0, torch.zeros_like(x0), torch.tensor([0, 399, 999]))
    expected = s.alphas_cumprod[[0, 399, 999]].sqrt() * torch.tensor([1.0, 0.7, 0.7])
    torch.testing.assert_close(xt[:, 0, 0, 0, 0], expected)


def test_low_precision_samples_keep_their_dtype_and_float32_arithmetic():
    s = VideoCrafter2DDIMScheduler()
    s.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(1, 4, 2, 4, 4, generator=g), torch.randn(1, 4, 2, 4, 4, generator=g)
    full = s.step(eps, 1, x, eta=0.0).prev_sample
    half = s.step(eps.bfloat16(), 1, x.bfloat16(), eta=0.0).prev_sample
    assert half.dtype == torch.bfloat16
    assert rel_err(half.float(), full) < 1e-2
    assert s.add_noise(x.bfloat16(), eps.bfloat16(), torch.tensor([5])).dtype == torch.bfloat16


def test_eta_noise_comes_from_the_generator_or_the_given_noise():
    s = VideoCrafter2DDIMScheduler()
    s.set_timesteps(10)
    x, eps = torch.zeros(1, 4, 1, 2, 2), torch.zeros(1, 4, 1, 2, 2)
    a = s.step(eps, 501, x, eta=1.0, generator=torch.Generator().manual_seed(3)).prev_sample
    b = s.step(eps, 501, x, eta=1.0, generator=torch.Generator().manual_seed(3)).prev_sample
    c = s.step(eps, 501, x, eta=1.0, generator=torch.Generator().manual_seed(4)).prev_sample
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="variance_noise"):
        s.step(eps, 501, x, eta=1.0, variance_noise=torch.zeros(2))


def test_config_round_trip_and_errors(tmp_path):
    s = VideoCrafter2DDIMScheduler(scale_b=0.6, mid_step=300)
    s.save_pretrained(tmp_path)
    loaded = VideoCrafter2DDIMScheduler.from_pretrained(tmp_path)
    assert torch.equal(loaded.scale_arr, s.scale_arr) and loaded.scale_arr[299] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="num_inference_steps"):
        VideoCrafter2DDIMScheduler().step(torch.zeros(1), 1, torch.zeros(1))
    with pytest.raises(ValueError, match="mid_step"):
        VideoCrafter2DDIMScheduler(mid_step=0)
