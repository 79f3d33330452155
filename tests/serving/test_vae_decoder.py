"""The VAEDecoder's core: a session's decoder state exported from one replica and imported on another decodes
the next blocks exactly as the first replica would have, with the full VAE and with the tiny decoder."""

import pickle

import numpy as np
import pytest

from livetalk_ray.config import load_config
from livetalk_ray.serving.denoiser import DenoiserCore
from livetalk_ray.serving.vae_decoder import DecoderCore
from tests.serving.test_session import png_bytes


@pytest.fixture(scope="module")
def latents():
    core = DenoiserCore(load_config("toy", overrides=["model.num_layers=2"]), None)
    needed = core.open("s", png_bytes(np.full((64, 64, 3), 120, np.uint8)), "A person talks.", seed=2)
    blocks, pushed = [], 0
    for _ in range(4):
        block, later = core.next_block("s", np.zeros(needed - pushed, np.float32))
        blocks.append(block.latents)
        needed, pushed = later, needed
    return blocks


@pytest.mark.parametrize("decoder", ["full", "tiny"])
def test_a_decoder_state_moved_to_another_replica_decodes_the_same_frames(latents, decoder):
    cfg = load_config("toy", overrides=[f"vae.decoder={decoder}"])
    here, there, alone = DecoderCore(cfg), DecoderCore(cfg), DecoderCore(cfg)
    for k in range(2):
        assert here.decode("s", k, latents[k]) == alone.decode("s", k, latents[k])
    there.import_session("s", pickle.loads(pickle.dumps(here.export_session("s"))))
    here.close("s")
    for k in range(2, 4):
        assert there.decode("s", k, latents[k]) == alone.decode("s", k, latents[k])


def test_a_decoder_state_from_the_other_decoder_kind_is_refused():
    full, tiny = DecoderCore(load_config("toy")), DecoderCore(load_config("toy", overrides=["vae.decoder=tiny"]))
    with pytest.raises(ValueError, match="another decoder"):
        tiny.import_session("s", full.vae.stream().snapshot())
