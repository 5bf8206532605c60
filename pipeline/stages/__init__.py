"""The pipeline's stages: :mod:`.registry` declares each once (name, schema version, upstream, typed settings,
key derivation, run); one module per stage holds how it runs (:mod:`.depth` a package: MiDaS or depth files
into the HDF5 cache; :mod:`.teach`, :mod:`.distill`, :mod:`.evaluate`), :mod:`.common` what teach and distill
share. To add a stage: a module with ``run(ctx)`` and one :class:`~.registry.Stage` in the registry.
"""
