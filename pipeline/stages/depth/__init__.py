"""Stage 1 `depth`: every frame of the manifest -> relative inverse depth in the HDF5 depth cache.

Providers:
- ``midas``: MiDaS 3.1 from the official checkpoint the user names; frames decoded and preprocessed
  (run.py-identical) in DataLoader workers, batched by resized shape, ``inference_mode``, autocast
  (bf16/fp16; a batch with non-finite fp16 output is recomputed in fp32 — Swin's and the head's known
  overflow), channels_last on CUDA, optional ``torch.compile``; with ``depth.preprocess: device`` JPEGs are
  decoded on the model's device (nvJPEG on CUDA) and every frame is resized + normalised there (float32 torch
  ops, :func:`device_batch`), leaving the workers only file reads (and non-JPEG decodes);
- ``files``: depth maps named by a ``folder``/``synthetic`` manifest, converted to inverse depth.

Every HDF5 operation runs on one background writer thread (:class:`_BackgroundWriter`): the main thread
only decodes results and queues them, so compression and fsyncs overlap the next batch's inference.

What lives here: :mod:`.identity` (what determines the output: the key's inputs and the cache spec, from one
function), :mod:`.stage` (``run_managed``: parts, locks, merge and publish), :mod:`.frames` (decoding and
preprocessing in DataLoader workers, or on the device), :mod:`.compute` (the model and the batching loop),
:mod:`.writer` (the background HDF5 writer thread).

The artifact directory *is* the cache directory (pipeline/depth_cache/). A shard is the unit of
work and atomicity: a crash loses at most the shard being written. Distributed: under torchrun each
rank writes the shards it owns (index % world == rank) and rank 0 merges after a barrier; with
``--shard i/n`` a scheduler array does the same across machines, and the last part to finish (or a
plain re-run) merges and publishes.
"""

