"""The Denoiser's core: sessions denoised in one batch each get their own blocks; a session the replica does
not hold is `SessionLost` for that request alone."""

from livetalk_ray.serving.sessions import SessionLost


def test_sessions_denoised_in_one_batch_get_their_own_blocks():
    """Two sessions batched (one joining two blocks late) equal the same sessions run alone, and a request
    for a session the replica does not hold fails alone."""
    import numpy as np
    import torch

    from livetalk_ray.config import load_config
    from livetalk_ray.serving.denoiser import DenoiserCore

    core = DenoiserCore(load_config("toy", overrides=["model.num_layers=2"]), None)
    from tests.serving.test_session import png_bytes

    images = [png_bytes(np.full((64, 64, 3), v, np.uint8)) for v in (90, 180)]
    silence = {
        sid: core.open(sid, img, "A person talks.", seed=i)
        for i, (sid, img) in enumerate(zip("ab", images, strict=True))
    }
    alone = {sid: [] for sid in "ab"}
    for sid in "ab":
        needed, pushed = silence[sid], 0
        for _ in range(4):
            block, later = core.next_block(sid, np.zeros(needed - pushed, np.float32))
            alone[sid].append(block.latents)
            assert block.audio.size == 0  # the relay slices each block's sound from what it pushed: none comes back
            needed, pushed = later, needed
    for i, (sid, img) in enumerate(zip("ab", images, strict=True)):
        core.open(sid, img, "A person talks.", seed=i)
    needed, pushed, together = dict(silence), {"a": 0, "b": 0}, {sid: [] for sid in "ab"}
    for round_ in range(6):
        live = ["a"] * (round_ < 4) + ["b"] * (round_ >= 2)
        requests = [(sid, np.zeros(needed[sid] - pushed[sid], np.float32)) for sid in live]
        *results, lost = core.next_blocks([*requests, ("gone", np.zeros(10, np.float32))])
        assert isinstance(lost, SessionLost)
        for sid, (block, later) in zip(live, results, strict=True):
            assert block.timings["batch"] == len(live)
            together[sid].append(block.latents)
            needed[sid], pushed[sid] = later, needed[sid]
    for sid in "ab":
        assert len(together[sid]) == 4
        for x, y in zip(together[sid], alone[sid], strict=True):
            assert torch.allclose(x, y, atol=1e-4)


def test_a_session_exported_from_one_replica_goes_on_exactly_on_another():
    import pickle

    import numpy as np
    import torch

    from livetalk_ray.config import load_config
    from livetalk_ray.serving.denoiser import DenoiserCore
    from tests.serving.test_session import png_bytes

    cfg = load_config("toy", overrides=["model.num_layers=2"])
    here, there, alone = DenoiserCore(cfg, None), DenoiserCore(cfg, None), DenoiserCore(cfg, None)
    image = png_bytes(np.full((64, 64, 3), 120, np.uint8))
    speech = (0.3 * np.sin(np.arange(10 * 16000) / 7)).astype(np.float32)
    cores, needed, pushed = {"moved": here, "alone": alone}, {}, {"moved": 0, "alone": 0}
    for name, core in cores.items():
        needed[name] = core.open("s", image, "A person talks.", seed=4)

    def step(name: str) -> torch.Tensor:
        block, later = cores[name].next_block("s", speech[pushed[name] : needed[name]])
        pushed[name], needed[name] = needed[name], later
        return block.latents

    for _ in range(3):
        assert torch.equal(step("moved"), step("alone"))
    snapshot = pickle.loads(pickle.dumps(here.export_session("s")))
    assert there.import_session("s", snapshot) == needed["moved"]  # the relay goes on where it was
    here.close("s")
    cores["moved"] = there
    for _ in range(3):
        assert torch.equal(step("moved"), step("alone"))
