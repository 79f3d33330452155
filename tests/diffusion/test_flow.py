import pytest
import torch

from livetalk_ray.config import SamplerConfig, load_config
from livetalk_ray.diffusion.flow import FlowSchedule, student_steps


def test_student_and_teacher_grids():
    flow = FlowSchedule(SamplerConfig())
    assert torch.allclose(flow.timesteps(4), torch.tensor([1000, 937.5, 833.3333, 625], dtype=torch.float64))
    # the 48-step teacher grid passes through the student's timesteps (ODE trajectories keep them)
    assert torch.allclose(flow.timesteps(48)[[0, 12, 24, 36]], flow.timesteps(4))


def test_noise_and_prediction_round_trip():
    flow = FlowSchedule(SamplerConfig())
    x0, eps = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 16, 3, 4, 4)
    sigma = torch.tensor([[0.3, 0.5, 0.9], [1.0, 0.1, 0.2]])  # per frame
    xt = flow.add_noise(x0, eps, sigma)
    v = flow.velocity_target(x0, eps)
    assert torch.allclose(flow.x0_from_v(xt, v, sigma), x0, atol=1e-5)
    assert torch.allclose(flow.v_from_x0(xt, x0, sigma), v, atol=1e-4)
    assert torch.allclose(flow.add_noise(x0, eps, torch.ones(2)), eps)


def test_train_timesteps_are_shifted_and_clamped():
    flow = FlowSchedule(SamplerConfig())
    t = flow.sample_train_timesteps((10000,), torch.Generator().manual_seed(0), 20, 980)
    assert t.min() >= 20 and t.max() <= 980
    assert t.median() > 700  # shift 5 pushes mass towards high noise


def test_student_steps_as_released_inference_feeds_them():
    """wan presets: LiveTalk's bf16 inference tells the model [1000, 936, 832, 624] while σ stays on the grid."""
    released = student_steps(load_config("wan-1.3b").sampler)
    assert released.timesteps == (1000.0, 936.0, 832.0, 624.0)
    assert released.sigmas == pytest.approx((1.0, 0.9375, 0.8333333, 0.625))
    assert released.timestep_dtype is torch.bfloat16
    toy = student_steps(load_config("toy").sampler)
    assert toy.timesteps == pytest.approx((1000.0, 937.5, 833.3333, 625.0)) and toy.timestep_dtype is torch.float32
    explicit = student_steps(load_config("toy", overrides=["sampler.student_timesteps=[999,500]"]).sampler)
    assert explicit.sigmas == (0.999, 0.5) and explicit.timesteps == (999.0, 500.0)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_training_timesteps_are_drawn_on_the_generators_device(device):
    """DMD trainers pass a generator on the model's device: the draw must happen there, whatever the default
    device (under a meta default, a draw that ignores the generator's device comes back on meta)."""
    flow = FlowSchedule(SamplerConfig())
    with torch.device("meta"):
        t = flow.sample_train_timesteps((64,), generator=torch.Generator(device=device).manual_seed(3), min_t=20)
    assert t.device.type == device
    again = flow.sample_train_timesteps((64,), generator=torch.Generator(device=device).manual_seed(3), min_t=20)
    assert torch.equal(t, again) and t.min() >= 20 and t.max() <= 1000
