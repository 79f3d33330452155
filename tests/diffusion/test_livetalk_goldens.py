"""The wan presets reproduce LiveTalk's own outputs (tests/goldens): the bidirectional forward and the
released streaming inference by default, and the float32 step list with one documented setting."""

import pytest

from tests.goldens import livetalk_case_a as case

TOLERANCE = 1e-5  # relative L2; float rounding measures ~5e-7


@pytest.fixture(scope="module")
def stream_goldens():
    return case.stream()


def test_bidirectional_forward_matches_livetalk():
    net = case.model(case.config(), causal=False)
    goldens = case.bidirectional()
    for i in range(3):
        out = case.bidirectional_output(net, goldens, i)
        assert case.relative_l2(out, goldens[f"{i}.out"]) < TOLERANCE, f"t = {float(goldens[f'{i}.t'])}"


@pytest.mark.parametrize("tag", case.TAGS)
def test_streamed_blocks_match_livetalk(stream_goldens, tag):
    """`released` with the preset's defaults; `fp32steps` with `sampler.student_timestep_dtype=float32`."""
    cfg = case.config(tag)
    blocks = case.streamed_blocks(case.model(cfg, causal=True), cfg, stream_goldens, tag)
    assert len(blocks) == 7
    for b, block in enumerate(blocks):
        assert case.relative_l2(block, stream_goldens[f"{tag}.x0.{b}"]) < TOLERANCE, f"{tag} block {b}"


def test_the_two_step_lists_are_told_apart(stream_goldens):
    """The goldens can fail: the float32 step list misses the released blocks by far more than the tolerance."""
    cfg = case.config("fp32steps")
    blocks = case.streamed_blocks(case.model(cfg, causal=True), cfg, stream_goldens, "released")
    assert case.relative_l2(blocks[0], stream_goldens["released.x0.0"]) > 100 * TOLERANCE
