"""What is written to disk and how: the content-hashed artifact store (``artifacts``: keys, locks, publish,
provenance), the byte-level helpers every writer shares (``io``: canonical JSON, sha256 of files, fsync,
atomic replace), input fingerprints with their memo (``fingerprint``) and kill-safe, code-free training
checkpoints (``checkpoint``)."""
