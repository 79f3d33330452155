"""Caption rewriters that fail on purpose, run inside Ray workers via `data.caption_rewriter`."""

import os


def fail_on_marker(caption: str) -> str:
    if "EXPLODE" in caption:
        raise RuntimeError("rewriter exploded")
    if "CRASH" in caption:
        os._exit(1)  # the whole worker process dies, as a segfaulting decoder would
    return caption
