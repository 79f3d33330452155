"""The versioned parquet schema of training shards, built from the resolved config.

Tensor columns are Arrow's canonical fixed-shape tensor type, so any Arrow reader (Ray Data, pyarrow,
pandas) sees their shape. The schema's metadata holds the version, preset and every shape; readers
check it on open and refuse shards written for another model or by an incompatible version.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from livetalk_ray.config import LiveTalkConfig

SCHEMA_VERSION = 1
QUARANTINE_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("path", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


def tensor_shapes(cfg: LiveTalkConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Column → (shape, numpy dtype) for one clip."""
    t = cfg.data.num_frames
    f_lat = cfg.latent_frames(t)
    z, h, w = cfg.vae.z_dim, cfg.latent_height, cfg.latent_width
    feat = cfg.data.feature_dtype
    return {
        "latents": ((z, f_lat, h, w), feat),
        "ref_latent": ((z, 1, h, w), feat),
        "audio_features": ((t, cfg.audio.feature_dim), feat),
        "text_embedding": ((cfg.text.max_length, cfg.text.d_model), feat),
        "audio": ((round(t * cfg.audio.sample_rate / cfg.video.fps),), "float32"),
        "ref_image": ((cfg.video.height, cfg.video.width, 3), "uint8"),
    }


SCALAR_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("clip_id", pa.string()),
    ("source", pa.string()),
    ("caption", pa.string()),
    ("raw_caption", pa.string()),
    ("ref_source", pa.string()),
    ("text_len", pa.int32()),
    ("quality", pa.string()),
]


def shard_schema(cfg: LiveTalkConfig) -> pa.Schema:
    shapes = tensor_shapes(cfg)
    fields = [pa.field(n, t) for n, t in SCALAR_COLUMNS] + [
        pa.field(name, pa.fixed_shape_tensor(pa.from_numpy_dtype(np.dtype(dtype)), list(shape)))
        for name, (shape, dtype) in shapes.items()
    ]
    meta = {
        "livetalk.schema_version": str(SCHEMA_VERSION),
        "livetalk.preset": cfg.preset,
        "livetalk.fps": str(cfg.video.fps),
        "livetalk.shapes": json.dumps({k: list(v[0]) for k, v in shapes.items()}),
    }
    return pa.schema(fields, metadata=meta)


def rows_to_table(rows: list[dict], cfg: LiveTalkConfig) -> pa.Table:
    schema = shard_schema(cfg)
    shapes = tensor_shapes(cfg)
    columns = []
    for f in schema:
        if f.name in shapes:
            shape, dtype = shapes[f.name]
            stacked = (
                np.stack([np.asarray(r[f.name], dtype=dtype).reshape(shape) for r in rows])
                if rows
                else (np.zeros((0, *shape), dtype))
            )
            columns.append(pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(stacked)))
        else:
            columns.append(pa.array([r[f.name] for r in rows], type=f.type))
    return pa.Table.from_arrays(columns, schema=schema)


class SchemaError(ValueError):
    """A shard that does not match the model it is read for; the message says what differs."""


def check_schema(found: pa.Schema, cfg: LiveTalkConfig, where: str) -> None:
    meta = {k.decode(): v.decode() for k, v in (found.metadata or {}).items()}
    version = meta.get("livetalk.schema_version")
    if version != str(SCHEMA_VERSION):
        raise SchemaError(
            f"{where}: schema version {version!r}, this reader understands {SCHEMA_VERSION}: "
            "prepare the shards again with this version (`livetalk data prepare`)"
        )
    expected = shard_schema(cfg)
    for f in expected:
        if f.name not in found.names:
            raise SchemaError(
                f"{where}: column {f.name!r} is missing: prepare the shards again (`livetalk data prepare`)"
            )
        if not found.field(f.name).type.equals(f.type):
            raise SchemaError(
                f"{where}: column {f.name!r} is {found.field(f.name).type}, expected {f.type} "
                f"(shards written for preset {meta.get('livetalk.preset')!r}, reading as {cfg.preset!r}): "
                "read them with the config they were prepared with (its config.yaml), or prepare them for this one"
            )
