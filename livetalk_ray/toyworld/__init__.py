"""Toy world: procedurally rendered talking heads with speech, small enough for a CPU-trained video model.

Every clip is fully determined by a seed, and its ground truth (mouth openness, blinks, head pose, identity)
is saved beside it, so lip-sync and identity preservation of *generated* video can be measured with
`measure.py` against a known answer. No Ray here: this package is plain numpy/PIL/PyAV.
"""

from livetalk_ray.toyworld.clips import (
    CORRUPTION_KINDS,
    ClipInfo,
    corruption_counts,
    load_truth,
    make_demo_dataset,
    read_clip,
    read_manifest,
    write_clip,
)
from livetalk_ray.toyworld.measure import (
    LipSync,
    face_geometry,
    identity_descriptor,
    identity_distance,
    lip_sync_score,
    lip_sync_scores,
    mouth_openness,
)
from livetalk_ray.toyworld.render import (
    HeadMotion,
    Identity,
    render_frame,
    render_frames,
    render_reference,
    sample_identity,
    sample_motion,
)
from livetalk_ray.toyworld.speech import openness_from_envelope, speech_envelope, synthesize_speech

__all__ = [
    "CORRUPTION_KINDS",
    "ClipInfo",
    "HeadMotion",
    "Identity",
    "LipSync",
    "corruption_counts",
    "face_geometry",
    "identity_descriptor",
    "identity_distance",
    "lip_sync_score",
    "lip_sync_scores",
    "load_truth",
    "make_demo_dataset",
    "mouth_openness",
    "openness_from_envelope",
    "read_clip",
    "read_manifest",
    "render_frame",
    "render_frames",
    "render_reference",
    "sample_identity",
    "sample_motion",
    "speech_envelope",
    "synthesize_speech",
    "write_clip",
]
