"""Data: from a `dataset` name to float batches on each rank's device.

source.py   which dataset a name means, its identity (fingerprint) and image column
decode.py   files -> uint8 pixels at the training size; the decoded-image cache
load.py     `load_image_data`: a dataset decoded once per node (or set up for streaming)
batches.py  the stateless batch order, and batches on the device (in memory, streamed, or
            of latents)
latent_cache.py  the data encoded once per node into latents by the node's processes (cached
            like the decoded images; resumable), mapped from disk
"""

from ddp_utils.data.batches import (
    Batch,
    BatchSource,
    LatentBatches,
    MemoryBatches,
    StreamingBatches,
    batch_indices,
    make_batches,
    to_float,
)
from ddp_utils.data.latent_cache import Encoder, LatentData, load_latents
from ddp_utils.data.load import (
    DataLoading,
    ImageData,
    StreamSource,
    hold_out_last,
    load_image_data,
    memory_bytes,
)

__all__ = [
    "Batch",
    "BatchSource",
    "DataLoading",
    "Encoder",
    "ImageData",
    "LatentBatches",
    "LatentData",
    "MemoryBatches",
    "StreamSource",
    "StreamingBatches",
    "batch_indices",
    "hold_out_last",
    "load_image_data",
    "load_latents",
    "make_batches",
    "memory_bytes",
    "to_float",
]
