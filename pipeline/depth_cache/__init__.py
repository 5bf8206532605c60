"""The HDF5 depth cache: what MiDaS computed for every frame, sharded, resumable after ``kill -9``, verifiable
and shareable as one file.

``format`` (constants, layout/index files, spec checks), ``writer`` (shard by shard, resume, ``finalize``),
``reader`` (random access by frame index), ``verify`` (end-to-end re-check), ``transfer`` (export/import as one
file) and ``cli`` (`dkp-pipeline cache ...`). See docs/cache-format.md for the format and how to read a cache
with plain h5py. The names below are the package's public API, what stages and tests import.
"""
from __future__ import annotations

from pipeline.depth_cache.format import SCHEMA_VERSION, check_spec, progress, read_index
from pipeline.depth_cache.reader import DepthCacheReader
from pipeline.depth_cache.transfer import export_cache, import_cache
from pipeline.depth_cache.verify import VerifyReport, damage, verify
from pipeline.depth_cache.writer import CacheWriter, ShardPlan, ShardWriter, finalize, forget_damaged

__all__ = ["SCHEMA_VERSION", "CacheWriter", "DepthCacheReader", "ShardPlan", "ShardWriter", "VerifyReport",
           "check_spec", "damage", "export_cache", "finalize", "forget_damaged", "import_cache", "progress",
           "read_index", "verify"]
