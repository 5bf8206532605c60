"""`dkp-pipeline`: thin click commands over the Python API in `pipeline/`.

Heavy imports (torch, timm, h5py) happen inside the commands that need them, so `--help` is instant.
User errors (:class:`pipeline.errors.DkpError`) print one clear message and exit 2. The stage commands
(depth, teach, distill, eval) are made from :mod:`pipeline.stages.registry`. One module, not a package: every
command is a few lines over a function elsewhere, and the whole surface reads best in one file.
"""
from __future__ import annotations

import sys

import click

from pipeline.bench.gpu import BUDGET_S, FRAME_SIZES, GPU_BATCHES, GPU_FRAMES, GPU_MODELS, TRAIN_BATCH  # no torch
from pipeline.stages import registry  # no torch

CONFIG_HELP = "A preset name (synthetic, synthetic-puppets, human36m, human36m_wobg, taichi, deepfashion) or an experiment YAML."
SET_HELP = "Override one config field, e.g. --set teach.lr=3e-4 (repeatable)."
JOBS_HELP = ("Trainings that do not read each other (the student and the baseline) run side by side, this many "
             "processes at once; default: one per training on a CPU (with torch's threads shared out), one after "
             "the other on a GPU or with OMP_NUM_THREADS=1. --jobs 1: always one after the other.")


def _config_options(f):
    f = click.option("--store", envvar="DKP_STORE", default="dkp-store", show_default=True,
                     help="Artifact store directory (env DKP_STORE).")(f)
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)(f)
    f = click.argument("config", metavar="CONFIG")(f)
    return f


def _load(config: str, overrides):
    from pipeline.config import load_config

    return load_config(config, overrides)


def _plan(cfg, store):
    """The plan of ``cfg`` over the store ``store`` (a path or None: DKP_STORE, then ./dkp-store)."""
    from pipeline.graph import build_plan
    from pipeline.store.artifacts import Store

    return build_plan(cfg, Store.from_option(store), progress=False)


def _cluster_options(f):
    """Options of commands that can submit their work as submitit jobs (pipeline/cluster.py, the slurm extra)."""
    for opt in reversed((
        click.option("--executor", type=click.Choice(["slurm", "local"]), default=None,
                     help="Submit the work as jobs through submitit: slurm (sbatch) or local (processes on this "
                          "machine). Default: run here, in this process."),
        click.option("--partition", default=None, help="Slurm partition of each job."),
        click.option("--time", "time", default=60, show_default=True, type=click.IntRange(min=1),
                     help="Time limit of each job, minutes."),
        click.option("--gpus", default=0, show_default=True, type=click.IntRange(min=0), help="GPUs per job."),
        click.option("--cpus", default=1, show_default=True, type=click.IntRange(min=1), help="CPUs per job."),
        click.option("--mem-gb", default=None, type=click.IntRange(min=1), help="Memory per job, GB."),
        click.option("--jobs-folder", default=None, type=click.Path(file_okay=False),
                     help="submitit's logs and pickles (default STORE/jobs; on shared storage)."),
    )):
        f = opt(f)
    return f


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


class DkpGroup(click.Group):
    """Turns DkpError into a one-line message and exit code 2; so too a write the file system refused (full,
    over quota, read-only, I/O error) wherever it happened, with the file, the space and the fix (issue 24)."""

    def invoke(self, ctx):
        from pipeline.errors import DkpError

        try:
            try:
                return super().invoke(ctx)
            except (OSError, RuntimeError) as e:  # RuntimeError: torch.save's, raised over a failed write
                from pipeline.store.io import storage_cause, storage_error

                cause = storage_cause(e)
                if cause is None or isinstance(e, DkpError):
                    raise
                raise storage_error(cause) from None
        except DkpError as e:
            from pipeline.errors import printable  # a file name's undecodable bytes would not print

            _console(stderr=True).print(f"[bold red]error:[/] {printable(str(e))}", markup=True, soft_wrap=True)
            sys.exit(e.exit_code)


@click.group(cls=DkpGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="distill-dkp")
def main() -> None:
    """Distill-DKP: self-supervised human keypoints from video frames.

    \b
    Pipeline (each box is a command; `run` walks them all, reusing what is fresh):
      manifest -> depth (MiDaS 3.1 -> HDF5 depth cache) -> teach (depth teacher)
               -> distill (RGB student + frozen teacher) -> eval (paper protocols)

    Every stage's output is an artifact in the store, keyed by the hash of everything that
    determines it; `status CONFIG` says which are fresh, stale (and why) or missing.
    Quick start:  dkp-pipeline run synthetic
    """


# --------------------------------------------------------------------------------------------------
# status / run


VERIFY_HELP = ("Also re-hash every file of each finished artifact against its record (depth: every shard and frame "
               "checksum), not only its size; reads everything once.")


@main.command()
@_config_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--verify", is_flag=True, help=VERIFY_HELP)
def status(config, overrides, store, as_json, verify):
    """Print every stage of CONFIG as fresh / stale (and why) / missing / in progress / damaged, with its key.

    A finished artifact whose files are not all there with their recorded sizes is damaged (the file named);
    `run` rebuilds it."""
    from pipeline.store.artifacts import Store
    from pipeline.graph import build_plan, dumps, print_plan

    cfg = _load(config, overrides)
    plan = build_plan(cfg, Store.from_option(store), progress=not as_json, verify=verify)
    if as_json:
        click.echo(dumps(plan))
        for w in plan.warnings:  # stdout stays one JSON document
            _console(stderr=True).print(f"warning: {w}", markup=False, soft_wrap=True)
    else:
        print_plan(plan, _console())


@main.command()
@_config_options
@click.option("--dry-run", is_flag=True, help="Print the resolved config and the plan; run nothing.")
@click.option("--until", type=click.Choice(registry.stage_names()), default="eval",
              show_default=True, help="Stop after this stage.")
@click.option("--jobs", type=click.IntRange(min=1), default=None, envvar="DKP_JOBS", help=JOBS_HELP + " (env DKP_JOBS)")
@click.option("--verify", is_flag=True, help=VERIFY_HELP + " Damaged artifacts are rebuilt.")
def run(config, overrides, store, dry_run, until, jobs, verify):
    """Build whatever is stale, missing or damaged for CONFIG (manifest -> depth -> teach -> distill -> eval).

    Fresh stages are reused; a second run does nothing and says so. Ends with the path of the
    experiment's HTML page (see `report`)."""
    import errno

    from pipeline.process import this_process
    from pipeline.runner import run_pipeline

    cfg = _load(config, overrides)
    console = _console()
    plan = run_pipeline(cfg, store, dry_run=dry_run, until=until, console=console, jobs=jobs, verify=verify)
    if not dry_run and this_process().is_main:  # under torchrun, rank 0 writes the page
        from pipeline.report.experiment import write_experiment_report

        try:  # a run that built something: the plan again (states changed), over the manifest it used (not walked
            # twice); a no-op run: its plan is what `status` would say
            path = write_experiment_report(cfg, store, source=config, overrides=overrides,
                                           plan=plan if plan is not None and not plan.built else None,
                                           manifest=plan.manifest if plan is not None else None)
        except OSError as e:
            from pipeline.store.io import is_storage_error

            if is_storage_error(e) and e.errno != errno.EROFS:
                raise  # a full disk: the one error message, exit 2; the same command then writes it
            # a read-only store: the run itself succeeded (or had nothing to do)
            console.print(f"report not written ({e.strerror or e}: {e.filename}); `dkp-pipeline report {config} -o "
                          "FILE` writes it elsewhere", markup=False, soft_wrap=True)
        else:
            console.print(f"report: {path}", markup=False, soft_wrap=True)


@main.command()
@_config_options
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="The HTML file to write (default: STORE/reports/<name>.html, or <name>-sweep.html).")
@click.option("--sweep", "--vary", "vary", multiple=True, metavar="KEY[+KEY...]=V1,V2,...",
              help="Report the sweep over this grid axis instead (repeatable; the axes and --seeds of `sweep`).")
@click.option("--seeds", default=None, metavar="S1,S2,...", help="With --sweep: the sweep's seeds.")
@click.option("--reruns", type=click.IntRange(min=0), default=0, help="With --sweep: the sweep's --reruns.")
def report(config, overrides, store, output, vary, seeds, reruns):
    """Write one self-contained HTML page for CONFIG from the store (runs nothing).

    \b
    The page: every stage fresh / stale (why) / missing with its key, wall and CPU time, device and
    versions; eval's table (floor, baseline, student, teacher, ratios, the protocol's unit); the
    training curves of teach and distill on common axes; the keypoint pictures; the depth preview;
    the provenance (the config against its preset, command lines, git SHAs). Missing stages show as
    missing. Pictures are embedded: the file opens offline, anywhere.
    With --sweep/--seeds (as given to `sweep`): the sweep's table (mean ± sd over seeds), one plot
    per metric against the varied value with each seed's run, and a page per run, linked.
    """
    if vary or seeds or reruns:
        from pipeline.report.sweep import write_sweep_report
        from pipeline.sweep import parse_axis, parse_seeds

        path = write_sweep_report(config, overrides, [parse_axis(v) for v in vary], parse_seeds(seeds), store, output,
                                  reruns=reruns)
    else:
        from pipeline.report.experiment import write_experiment_report

        path = write_experiment_report(_load(config, overrides), store, output, source=config, overrides=overrides)
    _console().print(f"report: {path}", markup=False, soft_wrap=True)


def _stage_command(name: str, doc: str):
    @click.option("--dry-run", is_flag=True, help="Print the resolved config and this stage's key; run nothing.")
    @_config_options
    def cmd(config, overrides, store, dry_run, **opts):
        from pipeline.runner import run_pipeline

        if opts.get("executor"):  # depth --executor slurm --shards N: an array of shard jobs
            from pipeline.cluster import job_options, submit_depth_shards

            if dry_run or opts.get("shard"):
                raise click.UsageError("--executor submits every shard itself: drop --dry-run / --shard")
            submit_depth_shards(config, overrides, store, opts.get("shards") or 1, job_options(opts),
                                bool(opts.get("skip_bad_frames")), _console())
            return
        opts = {k: v for k, v in opts.items() if k not in ("executor", "partition", "time", "gpus", "cpus", "mem_gb",
                                                             "jobs_folder", "shards")}
        cfg = _load(config, overrides)
        run_pipeline(cfg, store, dry_run=dry_run, until=name, only=name, console=_console(), stage_options=opts)

    cmd.__doc__ = doc
    return cmd


# Extra options of a stage's command, applied in this order (--dry-run and the config options every stage command has).
STAGE_OPTIONS = {
    "depth": (
        click.option("--shard", default=None, metavar="I/N",
                     help="Process only part I of N of the frames (scheduler arrays); merge by re-running without it."),
        click.option("--skip-bad-frames", is_flag=True,
                     help="Mark unreadable frames invalid in the cache instead of failing."),
        click.option("--shards", default=None, type=click.IntRange(min=1),
                     help="With --executor: submit this many shard jobs (an array), each `--shard i/N`."),
        _cluster_options,
    ),
}

for _stage in registry.STAGES:
    if _stage.help is not None:  # one command per stage that has one (the manifest is built by every command)
        _cmd = _stage_command(_stage.name, _stage.help)
        for _option in STAGE_OPTIONS.get(_stage.name, ()):
            _cmd = _option(_cmd)
        main.command(_stage.name)(_cmd)


# --------------------------------------------------------------------------------------------------
# data


@main.group()
def manifest():
    """Dataset manifests: frame lists with splits, annotations and content fingerprints."""


@manifest.command("build")
@click.argument("name")
@click.option("--root", required=True, type=click.Path(file_okay=False), help="Dataset root directory.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Where to write the manifest (default: <root>/<name>.manifest.json).")
@click.option("--frame-stride", default=1, show_default=True, type=click.IntRange(min=1),
              help="Videos (folder layout's videos/): keep every k-th frame of each (data.frame_stride).")
def manifest_build(name, root, output, frame_stride):
    """Walk dataset NAME (see data_manifests/) under --root, fingerprint every frame, write a manifest."""
    from pathlib import Path

    from pipeline.data.build import build_manifest

    m = build_manifest(name, root, progress=True, frame_stride=frame_stride)
    out = Path(output) if output else Path(root) / f"{name}.manifest.json"
    m.save(out)
    _console().print(f"{len(m.frame_ids)} frames, fingerprint {m.fingerprint} -> {out}")


@manifest.command("list")
def manifest_list():
    """List the dataset descriptions shipped in data_manifests/."""
    from pipeline.data.spec import list_datasets

    for n in list_datasets():
        click.echo(n)


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--n", "n", default=600, show_default=True, help="Number of frames.")
@click.option("--seed", default=0, show_default=True)
@click.option("--size", default=128, show_default=True, help="Image size (square).")
@click.option("--clip-length", default=32, show_default=True,
              help="Consecutive frames showing the same figure and walls (1 = every frame a new scene).")
@click.option("--family", default="figures", show_default=True, type=click.Choice(["figures", "puppets"]),
              help="Scene family: figures (H36M-like humans) or puppets (another figure model, clutter and light).")
def synth(out, n, seed, size, clip_length, family):
    """Write the built-in synthetic dataset (folder layout, with GT depth and keypoints) to OUT."""
    from pathlib import Path

    from pipeline.data.synth import write_synthetic

    info = write_synthetic(Path(out), n=n, seed=seed, image_size=size, clip_length=clip_length, progress=True,
                           family=family)
    _console().print(f"wrote {n} frames to {out}", info if isinstance(info, dict) else "")


# --------------------------------------------------------------------------------------------------
# cache


@main.group()
def cache():
    """Depth caches: verify, export one shareable file, import a colleague's."""


@cache.command("info")
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def cache_info(cache_dir, as_json):
    """Frames, validity, size and the spec (model, weights sha256, resize rule, ...) of a depth cache."""
    from pipeline.stages.depth.share import info_command

    info_command(cache_dir, _console(), as_json)


@cache.command("verify")
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False))
def cache_verify(cache_dir):
    """Re-check every shard's checksum, every chunk and every frame hash of a depth cache."""
    from pipeline.stages.depth.share import verify_command

    verify_command(cache_dir, _console())


@cache.command("export")
@_config_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .h5 file to write.")
def cache_export(config, overrides, store, output):
    """Write CONFIG's depth cache as ONE HDF5 file a colleague can `cache import`."""
    from pipeline.stages.depth.share import export_command

    export_command(_plan(_load(config, overrides), store), output, _console())


@cache.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--store", envvar="DKP_STORE", default="dkp-store", show_default=True)
@click.option("--config", "config", default=None, metavar="CONFIG",
              help="Refuse the file unless it is the depth cache CONFIG needs (spec and frame hashes checked).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def cache_import(file, store, config, overrides):
    """Verify a shared depth-cache file and place it in the store under its key (no MiDaS needed)."""
    from pipeline.stages.depth.share import import_command

    import_command(file, store, _console(), plan=_plan(_load(config, overrides), store) if config else None)


# --------------------------------------------------------------------------------------------------
# inference / benchmarks


@main.command()
@click.argument("student", type=click.Path(exists=True))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--device", default="auto", show_default=True)
@click.option("--overlay", is_flag=True, help="Videos: also write <stem>.overlay.mp4 with the keypoints drawn.")
@click.option("--batch", default=16, show_default=True, type=click.IntRange(min=1), help="Frames per forward pass.")
def predict(student, inputs, output, device, overlay, batch):
    """Detect keypoints with a trained STUDENT (model.pt or its artifact dir) on images, videos or folders.

    \b
    Images: keypoints.json (pixels, (x, y)) and one overlay PNG per image.
    Videos (.mp4 .mkv .mov .avi): <stem>.csv (frame, x0, y0, x1, y1, ... in pixels of the
    original frame), <stem>.coco.json (COCO keypoints) and, with --overlay, <stem>.overlay.mp4."""
    from pipeline.predict import predict_command

    predict_command(student, inputs, output, device, _console(), overlay=overlay, batch=batch)


@main.command()
@click.argument("student", type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@click.option("--opset", default=None, type=int, help="ONNX opset (default: the exporter's).")
@click.option("--no-check", is_flag=True, help="Skip the onnxruntime-vs-torch comparison on random images.")
def export(student, output, opset, no_check):
    """Write the trained STUDENT's detector as ONE ONNX file (dynamic batch) with its conventions in the metadata.

    \b
    Input `image` (batch, 3, S, S) float32 RGB in [-1, 1] (shorter side to S, centre crop);
    outputs `keypoints` (batch, K, 2) (x, y) in [-1, 1] and `heatmaps`. Needs the onnx extra:
    pip install -e '.[onnx]'. See docs/conventions.md "Exported detector"."""
    from pipeline.export import export_onnx

    export_onnx(student, output, opset=opset, check=not no_check, console=_console())


@main.command()
@_config_options
@click.option("--vary", "vary", multiple=True, metavar="KEY[+KEY...]=V1,V2,...",
              help="One grid axis (repeatable; the grid is every combination). Keys joined by '+' take the "
                   "same value, e.g. --vary teach.recon_loss+distill.recon_loss=l1ssim,l1")
@click.option("--seeds", default=None, metavar="S1,S2,...",
              help="Run every grid point once per seed (sets teach.seed and distill.seed); "
                   "default: the config's seeds, one run per point.")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Write the table here (markdown) and every run's numbers beside it (.json).")
@click.option("--dry-run", is_flag=True, help="List the runs and which of their stages are fresh; run nothing.")
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the sweep's HTML page here (as `report CONFIG --sweep ...` does).")
@click.option("--jobs", type=click.IntRange(min=1), default=None, envvar="DKP_JOBS", help=JOBS_HELP + " (env DKP_JOBS)")
@click.option("--reruns", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also train the first seed of every grid point N more times (teach.rerun/distill.rerun = 1..N: "
                   "new keys, the same settings) and report the spread of those runs beside the spread over seeds.")
@_cluster_options
def sweep(config, overrides, store, vary, seeds, output, dry_run, report_path, jobs, reruns, **cluster):
    """Run CONFIG over a grid of config values and seeds; tabulate eval's numbers (mean ± sd over seeds).

    \b
    Each run is an ordinary `run` in the same store: stages shared between runs are built once,
    and running an interrupted or failed sweep again continues where it stopped. Example, the
    reconstruction-loss study of docs/results.md:
      dkp-pipeline sweep synthetic --vary teach.recon_loss+distill.recon_loss=l1ssim,l1,mse \\
          --seeds 0,1,2 -o recon-loss.md
    """
    from pipeline.sweep import parse_axis, parse_seeds, run_sweep

    if not vary and not seeds and not reruns:
        raise click.UsageError("give at least one --vary axis, --seeds or --reruns")
    axes, seed_list, console = [parse_axis(v) for v in vary], parse_seeds(seeds), _console()
    executor = None
    if cluster.get("executor"):  # each run a submitit job; the table when they have ended
        from pipeline.cluster import job_options

        executor = job_options(cluster)
    run_sweep(config, overrides, axes, seed_list, store, console, dry_run=dry_run, output=output, jobs=jobs,
              executor=executor, reruns=reruns)
    if report_path:  # the page only reads the store: with --dry-run too
        from pipeline.report.sweep import write_sweep_report

        console.print(f"report: {write_sweep_report(config, overrides, axes, seed_list, store, report_path, reruns=reruns)}",
                      markup=False, soft_wrap=True)


@main.command()
@click.argument("what", type=click.Choice(["teach", "train-step", "side-by-side", "depth", "depth-overlap",
                                           "depth-precision", "depth-writer", "cache", "teacher-cache", "recon-loss",
                                           "gpu", "precision", "video", "frames", "scale"]))
@click.option("--batch", default=16, show_default=True, help="Batch size (gpu: of the training steps; 64 when not "
                                                            "given, AutoLink's).")
@click.option("--size", default=128, show_default=True)
@click.option("--steps", default=10, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Append the result (JSON line) to this file (gpu: and write its tables beside it, X.md).")
@click.option("--model", default="dpt_levit_224", show_default=True,
              help="depth only: MiDaS 3.1 model type (random weights).")
@click.option("--frames", default=256, show_default=True,
              help="depth: frames generated (--size px squares) and run through each case; gpu: JPEG frames "
                   "of each --frame-sizes side through the stage (512 when not given); depth-precision: frames "
                   "(4 when not given).")
@click.option("--models", default=",".join(GPU_MODELS), show_default=True,
              help="gpu, depth-precision: comma-separated MiDaS 3.1 model types (depth-precision: the three "
                   "small ones when not given).")
@click.option("--batches", default=",".join(map(str, GPU_BATCHES)), show_default=True,
              help="gpu only: comma-separated inference batch sizes (a batch that runs out of memory ends its row).")
@click.option("--frame-sizes", default=",".join(map(str, FRAME_SIZES)), show_default=True,
              help="gpu only: comma-separated sides of the generated JPEG frames (128: AutoLink's size, 256: Taichi, "
                   "1000: Human3.6M); the stage, its data side and its writer run at each.")
@click.option("--budget-s", default=BUDGET_S, show_default=True,
              help="gpu only: time budget; cases whose estimate would overrun it are skipped (and recorded).")
@click.option("--scale-frames", default="10000,100000", show_default=True, metavar="N1,N2,...",
              help="scale only: dataset sizes (frames) generated and measured, e.g. 10000,100000,1000000.")
@click.option("--scale-depth", is_flag=True, help="scale only: depth files too, and time their import.")
@click.option("--work", default=None, type=click.Path(file_okay=False),
              help="scale only: where the datasets are generated (default: a temporary folder; 1M frames ~4 GB).")
@click.pass_context
def bench(ctx, what, batch, size, steps, device, output, model, frames, models, batches, frame_sizes, budget_s,
          scale_frames, scale_depth, work):
    """Measure a stage's throughput as ratios against a baseline in the same run (results: docs/benchmarks.md)."""
    from pipeline.bench import bench_command

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT

    kw = {"model": model, "frames": frames} if what == "depth" else {"frames": frames} if what in ("video", "frames") \
        else {}
    if what == "depth-overlap":  # stand-ins: 8-frame batches, 30 of them per case unless given
        batch, steps = (batch if given("batch") else 8), (steps if given("steps") else 30)
    if what == "depth-precision":  # --models (default: the three small ones), --frames (default 4) at --size
        kw = {"models": models if given("models") else "dpt_levit_224,dpt_swin2_tiny_256,dpt_beit_base_384",
              "frames": frames if given("frames") else 4}
    if what == "scale":
        try:
            counts = [int(v) for v in scale_frames.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"{scale_frames!r} is not a comma-separated list of frame counts",
                                     param_hint="--scale-frames") from None
        kw = {"scale_frames": counts, "depth": scale_depth, "work": work}
    if what == "gpu":
        batch = batch if given("batch") else TRAIN_BATCH
        kw = {"models": models, "batches": batches, "frame_sizes": frame_sizes, "budget_s": budget_s,
              "frames": frames if given("frames") else GPU_FRAMES}
    bench_command(what, batch=batch, size=size, steps=steps, device=device, output=output, console=_console(), **kw)


if __name__ == "__main__":  # pragma: no cover
    main()
