"""Long-stream scoring: the truth scores as its own person in sync with its speech, another person does not, a
lost face is counted, and the table marks read the right second."""

import numpy as np
import pytest

from livetalk_ray.config import load_config
from livetalk_ray.eval.longform import OTHER_PERSON, StreamScores, held_out_talk, score_stream


@pytest.fixture(scope="module")
def talks():
    cfg = load_config("toy")
    return cfg, held_out_talk(cfg, "ada", 11, 6.0, seed=1), held_out_talk(cfg, "bo", 23, 6.0, seed=2)


def test_truth_is_its_own_person_every_second_and_in_sync(talks):
    cfg, ada, _ = talks
    assert ada.reference.shape == (64, 64, 3) and len(ada.truth) == 96
    assert len(ada.speech) == 6 * cfg.audio.sample_rate
    scores = score_stream(ada.truth, ada, cfg.video.fps, cfg.audio.sample_rate)
    assert len(scores.identity) == 6 and len(scores.lipsync) == 1  # 6 s: one 5 s window (the tail is short)
    assert max(scores.identity) < 0.1, scores.identity  # a second of head motion: 0.03 to 0.07
    assert scores.lipsync[0] > 0.95
    assert scores.summary()["seconds_other_person"] == 0


def test_another_person_and_a_lost_face_are_counted(talks):
    cfg, ada, bo = talks
    other = score_stream(bo.truth, ada, cfg.video.fps, cfg.audio.sample_rate)
    assert min(other.identity) > OTHER_PERSON, other.identity
    assert other.lipsync[0] < 0.5  # bo's mouth does not follow ada's speech
    blank = ada.truth.copy()
    blank[32:64] = 128  # seconds 2 and 3: grey frames, no face
    scores = score_stream(blank, ada, cfg.video.fps, cfg.audio.sample_rate)
    assert np.isinf(scores.identity[2]) and np.isinf(scores.identity[3]) and np.isfinite(scores.identity[1])
    summary = scores.summary()
    assert summary["seconds_face_lost"] == 2 and summary["seconds_other_person"] == 2
    assert summary["identity_max"] < 0.1  # over the seconds with a face


def test_marks_read_the_second_that_ends_there():
    scores = StreamScores(identity=[0.1 * s for s in range(1, 61)], lipsync=[float(w) for w in range(12)])
    assert scores.identity_at(1) == pytest.approx(0.1) and scores.identity_at(60) == pytest.approx(6.0)
    assert scores.identity_at(10) == pytest.approx(1.0)
    assert scores.lipsync_at(1) == 0.0 and scores.lipsync_at(10) == 1.0 and scores.lipsync_at(60) == 11.0
