"""`dkp-pipeline bench`: throughput and peak memory, always as ratios against a baseline in the same run.

What is where:

- ``benches.py``: the benches below (``BENCHES``), ``run_bench`` (one JSON record), ``bench_command`` (the CLI);
- ``harness.py``: how everything is measured: timing, peak memory, interleaving, a case in a fresh process
  (``python -m pipeline.bench CASE PARAMS_JSON``, ``__main__.py``), ratios;
- ``training.py``: the AutoLink and distillation training-step cases, on the distill stage's step function;
- ``depth.py``: the MiDaS depth cases (random weights in the official layout, generated frames, the stage's
  model and inference call, the stage itself, run.py's loop);
- ``gpu.py``, ``gpu_model.py``, ``gpu_report.py``: the GPU suite (``bench gpu``): budget and parts, one
  model's cases, ratios/goals and markdown tables.

Absolute numbers depend on the machine and on whoever else uses it; a ratio of two cases measured
back to back on the same machine mostly does not, so every bench reports both and the ratios are
what docs/benchmarks.md compares.

=================  ================================================  =====================================
bench              cases                                             ratios (speed: interleaved rates)
=================  ================================================  =====================================
``teach``          AutoLink training step (K=16, heatmaps S/4,       width64 vs width16 (steps/s, memory);
                   l1ssim loss, AdamW) at width 16 and at            on CUDA also AMP vs fp32 at width 64
                   AutoLink's width 64; on CUDA also width 64 + AMP
``teacher-cache``  distillation step, width 64, K=16: student step   cached vs live steps/s (the speed-up
                   + live frozen teacher forward on depth, or        of ``distill.teacher_cache``)
                   student step + teacher embeddings read from an
                   HDF5 embedding cache (distill's own writer/reader)
``recon-loss``     AutoLink training step at width 16 with each       X/l1ssim for l1, mse and perceptual
                   reconstruction loss: l1ssim, l1, mse, perceptual  (steps/s, memory)
                   (VGG16 at 224 px, random weights: same cost)
``depth``          one MiDaS 3.1 model (--model, random weights in    stage / bare model and stage / run.py
                   the official layout) on --frames generated        loop frames/s, with the goals of
                   frames: (a) bare model on preprocessed batches    issue 4 (met or not)
                   on the device, (b) the whole ``depth`` stage
                   (workers, cache), (c) run.py's per-frame loop
``cache``          B*N depth maps (S x S, float32) written/read      cache vs .npy frames/s; bytes on disk
                   through the depth cache vs one ``np.save`` file
                   per frame
``gpu``            the GPU suite of issue 16 within a time budget    stage/bare, stage/run.py, device/cpu,
                   (gpu.py): depth bare/stage/run.py         workers needed, AMP/fp32, cached/live
                   per model x precision x batch, data side,
                   teach/distill fp32 vs AMP, live vs cached
=================  ================================================  =====================================

Each model case runs alone in a fresh Python process (``isolate=True``, the CLI's behaviour), so its
peak memory is its own: peak RSS from ``getrusage`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA,
reported both absolute and as growth over the process's footprint just before the first step. The
timed loop runs ``steps`` steps after one untimed warm-up step and times each; rates come from the
median step (min and max are kept), so a neighbour's burst on a shared machine moves them less.
Inputs are random tensors already on the device: data loading is not part of any model case
(except in ``depth``, whose point is to measure it: see ``depth.case_depth_abc``, one process, no interleaving
step by step, but the bare-model and run.py cases are timed in halves before and after the stage).
Then all cases of a bench are built in one more process and timed step by step in alternating
order (ABBA...), so they share whatever load the machine has; speed ratios come from these
``interleaved`` rates (on a shared 2-core machine, runs minutes apart differed by up to 2x).
``teacher-cache`` also times the target alone (``target_s``: teacher forward vs embedding lookup).
"""
from pipeline.bench.benches import BENCHES, RECON_LOSSES, WHATS, bench_command, run_bench
from pipeline.bench.depth import DEPTH_FRAMES, DEPTH_GOALS, DEPTH_MODEL
from pipeline.bench.harness import BenchError

__all__ = ["BENCHES", "RECON_LOSSES", "WHATS", "bench_command", "run_bench", "DEPTH_FRAMES", "DEPTH_GOALS",
           "DEPTH_MODEL", "BenchError"]
