import torch

from livetalk_ray.config import SamplerConfig
from livetalk_ray.diffusion.flow import FlowSchedule


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
