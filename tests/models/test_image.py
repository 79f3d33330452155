"""Viewable frames: the [-1, 1] → uint8 conversion and the sample grid of training reports and eval."""

import numpy as np
import torch

from livetalk_ray.models.image import frame_grid, tensor_to_uint8


def test_tensor_to_uint8_maps_the_range_and_moves_channels_last():
    video = torch.tensor([-1.5, -1.0, 0.0, 1.0]).view(1, 4, 1, 1).expand(3, 4, 2, 5)
    frames = tensor_to_uint8(video)
    assert frames.shape == (4, 2, 5, 3) and frames.dtype == np.uint8
    assert frames[:, 0, 0, 0].tolist() == [0, 0, 128, 255]


def test_frame_grid_puts_each_reference_before_every_other_frame_of_its_clip():
    refs = np.stack([np.full((4, 6, 3), 10 * (b + 1), np.uint8) for b in range(2)])
    frames = np.stack([np.stack([np.full((4, 6, 3), 100 + 10 * b + t, np.uint8) for t in range(5)]) for b in range(2)])
    grid = frame_grid(frames, refs)
    # Rows: clip, 4-pixel white gap, clip. Columns: reference, 4-pixel white gap, frames 0, 2, 4.
    assert grid.shape == (4 + 4 + 4, 6 + 4 + 3 * 6, 3)
    assert (grid[4:8] == 255).all() and (grid[:, 6:10] == 255).all()
    assert grid[0, 0, 0] == 10 and grid[8, 0, 0] == 20
    assert [grid[0, 10 + 6 * k, 0] for k in range(3)] == [100, 102, 104]
    assert [grid[8, 10 + 6 * k, 0] for k in range(3)] == [110, 112, 114]
