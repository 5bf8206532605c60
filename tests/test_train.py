"""The trainer (pipeline/training/) and checkpoint files (pipeline/store/checkpoint.py), on a tiny CPU model.

Kill -9 / resume equivalence across processes lives in tests/faults/test_train_kill.py; here
everything runs in-process except the 2-rank DDP comparison (a torchrun subprocess).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.store import checkpoint as ckpt_mod
from pipeline.store.checkpoint import check_plain, latest_checkpoint, load_safe, save_atomic
from pipeline.errors import CheckpointError, ConfigError, DkpError
from pipeline.training import (
    NonFiniteLossError,
    StepBatchSampler,
    TrainingInterrupted,
    TrainSettings,
    derive_seed,
    resolve_amp,
    sample_generator,
    train,
)
from pipeline.training.log import truncate_metrics as _truncate_metrics

REPO = Path(__file__).resolve().parents[1]
TOY_PATH = REPO / "tests" / "faults" / "train_toy.py"
_spec = importlib.util.spec_from_file_location("train_toy", TOY_PATH)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)

STEPS = 12


def _run(run_dir: Path, *, step_fn=None, settings: TrainSettings | None = None, config_hash: str = "cfg-a",
         on_eval=None, norm: str = "batch", dropout: float = 0.1):
    torch.manual_seed(0)  # same initial weights in every run
    model = toy.ToyNet(norm=norm, dropout=dropout)
    settings = settings or toy.toy_settings(steps=STEPS)
    result = train(run_dir=run_dir, model=model, dataset=toy.ToyDataset(n=24, seed=settings.seed),
                   step_fn=step_fn or toy.toy_step, settings=settings, config={"toy": True},
                   config_hash=config_hash, model_args={"width": 8, "norm": norm}, on_eval=on_eval)
    return model, result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 12-step run: (run_dir, final state_dict, metrics.jsonl text)."""
    run_dir = tmp_path_factory.mktemp("reference")
    model, result = _run(run_dir)
    assert result.steps == STEPS and result.resumed_from == 0
    return run_dir, {k: v.clone() for k, v in model.state_dict().items()}, (run_dir / "metrics.jsonl").read_text()


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


# ---- sampling and seeds -------------------------------------------------------------------------
def test_sampler_is_a_pure_function_of_seed_and_step():
    full = StepBatchSampler(dataset_len=10, batch_size=4, seed=3, start_step=0, end_step=6)
    batches = [[i for i, _ in b] for b in full]
    epochs = [{e for _, e in b} for b in full]
    assert full.steps_per_epoch == 2 and epochs == [{0}, {0}, {1}, {1}, {2}, {2}]
    for e in range(3):  # shuffle + drop_last: each epoch's batches are disjoint samples of its permutation
        pair = batches[2 * e] + batches[2 * e + 1]
        assert len(set(pair)) == 8 and pair == full.permutation(e)[:8].tolist()
    assert batches[0:2] != batches[2:4]  # a new order every epoch
    # Resuming at step 3 yields exactly the tail; a rank takes its slice of the same global batch.
    tail = StepBatchSampler(dataset_len=10, batch_size=4, seed=3, start_step=3, end_step=6)
    assert [[i for i, _ in b] for b in tail] == batches[3:]
    ranks = [StepBatchSampler(dataset_len=10, batch_size=4, seed=3, start_step=0, end_step=6, rank=r, world_size=2)
             for r in range(2)]
    for step, (b0, b1) in enumerate(zip(*ranks)):
        assert [i for i, _ in b0 + b1] == batches[step]
    other_seed = StepBatchSampler(dataset_len=10, batch_size=4, seed=4, start_step=0, end_step=6)
    assert [[i for i, _ in b] for b in other_seed] != batches


def test_sampler_refuses_bad_batch_sizes():
    with pytest.raises(ConfigError, match="not divisible by the 3 ranks"):
        StepBatchSampler(dataset_len=10, batch_size=4, seed=0, start_step=0, end_step=1, rank=0, world_size=3)
    with pytest.raises(ConfigError, match="10 samples, fewer than batch_size 16"):
        StepBatchSampler(dataset_len=10, batch_size=16, seed=0, start_step=0, end_step=1)


def test_seeds_are_deterministic_and_distinct():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 3, 2)
    a = torch.rand(4, generator=sample_generator(0, 1, 5))
    assert torch.equal(a, torch.rand(4, generator=sample_generator(0, 1, 5)))
    assert not torch.equal(a, torch.rand(4, generator=sample_generator(0, 2, 5)))  # another epoch


def test_settings_are_validated_with_the_field_named():
    with pytest.raises(ConfigError, match="'amp'.*fp8"):
        TrainSettings(amp="fp8")
    with pytest.raises(ConfigError, match="'batch_size'"):
        TrainSettings(batch_size=0)
    with pytest.raises(ConfigError, match="'device'"):
        TrainSettings(device="tpu")
    assert TrainSettings(betas=[0.5, 0.9]).betas == (0.5, 0.9)  # YAML lists become tuples
    assert "num_workers" in TrainSettings.NON_SEMANTIC and "lr" not in TrainSettings.NON_SEMANTIC


def test_amp_resolution(monkeypatch):
    from pipeline.training import runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert resolve_amp("auto", cpu) is None and resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    # fp16 autocast is emulated on a CPU (many times slower than fp32): refused, naming the fixes ...
    with pytest.raises(ConfigError, match=r"training setting 'amp': 'fp16' on cpu would train many times slower "
                                          r"than fp32: fp16 autocast on a CPU is emulated.*amp='off' \(or 'bf16'"):
        resolve_amp("fp16", cpu)
    with pytest.raises(ConfigError, match=r"config field teach.amp: .*--set teach.amp=off --set distill.amp=off "
                                          r"\(or =bf16, which this CPU.*another artifact key.*DKP_ALLOW_SLOW_AMP=1"):
        resolve_amp("fp16", cpu, section="teach")
    # ... unless asked for on purpose (tests, a GPU recipe's numerics on a laptop)
    assert resolve_amp("fp16", cpu, allow_slow=True) is torch.float16
    monkeypatch.setenv("DKP_ALLOW_SLOW_AMP", "1")
    assert resolve_amp("fp16", cpu) is torch.float16


# ---- resume ------------------------------------------------------------------------------------
class Crash(Exception):
    pass


def _crash_at(step: int):
    """The toy step function, raising :class:`Crash` at 0-based ``step`` (an in-process crash mid-run)."""
    def crashing_step(model, batch, ctx):
        if ctx.step == step:
            raise Crash
        return toy.toy_step(model, batch, ctx)

    return crashing_step


def test_crash_and_resume_in_process_matches_reference_with_other_worker_count(tmp_path, reference):
    _, ref_weights, ref_metrics = reference

    crashing_step = _crash_at(8)

    settings = toy.toy_settings(steps=STEPS, num_workers=2)  # 2 DataLoader processes vs 0 in the reference
    with pytest.raises(Crash):
        _run(tmp_path, step_fn=crashing_step, settings=settings)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000005.pt"]
    model, result = _run(tmp_path, settings=settings)
    assert result.resumed_from == 5
    _assert_same_weights(model.state_dict(), ref_weights)
    assert (tmp_path / "metrics.jsonl").read_text() == ref_metrics


def test_rerunning_a_finished_run_trains_nothing(tmp_path):
    calls = []

    def counting_step(model, batch, ctx):
        calls.append(ctx.step)
        return toy.toy_step(model, batch, ctx)

    settings = toy.toy_settings(steps=4, checkpoint_every=2, log_every=2)
    _run(tmp_path, step_fn=counting_step, settings=settings)
    first = (tmp_path / "metrics.jsonl").read_text()
    _, result = _run(tmp_path, step_fn=counting_step, settings=settings)
    assert calls == [0, 1, 2, 3] and result.resumed_from == 4
    assert (tmp_path / "metrics.jsonl").read_text() == first and result.final_loss == json.loads(
        first.splitlines()[-1])["loss"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_then_stops_and_resume_matches(tmp_path, reference, signum):
    _, ref_weights, ref_metrics = reference
    before = signal.getsignal(signum)

    def signalled_step(model, batch, ctx):
        if ctx.step == 6:
            os.kill(os.getpid(), signum)  # delivered at once: we are the main thread
        return toy.toy_step(model, batch, ctx)

    with pytest.raises(TrainingInterrupted) as info:
        _run(tmp_path, step_fn=signalled_step)
    err = info.value
    assert isinstance(err, DkpError) and err.exit_code == 128 + signum
    # The step during which the signal came is completed, then checkpointed (step index 6 = 7th step).
    assert signal.Signals(signum).name in str(err) and "step-00000007.pt" in str(err) and "after step 7/12" in str(err)
    assert signal.getsignal(signum) == before  # handlers restored
    assert load_safe(tmp_path / "checkpoints" / "step-00000007.pt")["step"] == 7
    model, result = _run(tmp_path)
    assert result.resumed_from == 7
    _assert_same_weights(model.state_dict(), ref_weights)
    assert (tmp_path / "metrics.jsonl").read_text() == ref_metrics


def test_checkpoint_of_another_config_is_refused(tmp_path):
    settings = toy.toy_settings(steps=4, checkpoint_every=2)
    _run(tmp_path, settings=settings, config_hash="a" * 64)
    with pytest.raises(CheckpointError, match=r"another config \(hash aaaaaaaaaaaa.*bbbbbbbbbbbb") as info:
        _run(tmp_path, settings=settings, config_hash="b" * 64)
    assert str(tmp_path / "checkpoints") in str(info.value)  # names the checkpoint and what to delete
    with pytest.raises(CheckpointError, match="lr: checkpoint 0.01 vs now 0.5"):
        _run(tmp_path, settings=toy.toy_settings(steps=4, checkpoint_every=2, lr=0.5), config_hash="a" * 64)


def test_nonfinite_loss_stops_naming_step_and_last_checkpoint(tmp_path):
    def exploding_step(model, batch, ctx):
        loss, metrics = toy.toy_step(model, batch, ctx)
        return (loss * float("nan") if ctx.step == 7 else loss), metrics

    with pytest.raises(NonFiniteLossError) as info:
        _run(tmp_path, step_fn=exploding_step)
    msg = str(info.value)
    assert isinstance(info.value, DkpError)
    assert "loss is nan at step 8/12" in msg and str(tmp_path / "checkpoints" / "step-00000005.pt") in msg
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000005.pt"]


def test_nonfinite_loss_is_found_before_the_checkpoint_that_would_hold_it(tmp_path):
    """The loss is read once per sync point; every checkpoint is one, so a NaN in the very step a checkpoint
    follows (step 10: a checkpoint, not a metrics line with log_every 3) stops the run before that checkpoint, and
    a NaN inside an interval (step 8) stops it at the next sync point having written nothing of steps 8 and 9."""
    def nan_at(step):
        def step_fn(model, batch, ctx):
            loss, metrics = toy.toy_step(model, batch, ctx)
            return (loss * float("nan") if ctx.step == step else loss), metrics
        return step_fn

    with pytest.raises(NonFiniteLossError, match="loss is nan at step 10/12"):
        _run(tmp_path / "a", step_fn=nan_at(9))
    assert [p.name for p in (tmp_path / "a" / "checkpoints").iterdir()] == ["step-00000005.pt"]
    assert [json.loads(line)["step"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()] == [3, 6, 9]
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 8/12"):
        _run(tmp_path / "b", step_fn=nan_at(7))
    assert [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()] == [3, 6]


def test_on_eval_runs_at_interval_and_end_in_eval_mode(tmp_path):
    seen = []

    def on_eval(step, model):
        seen.append((step, model.training, torch.is_grad_enabled()))

    _run(tmp_path, settings=toy.toy_settings(steps=7, eval_every=3), on_eval=on_eval)
    assert seen == [(3, False, False), (6, False, False), (7, False, False)]


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_on_cpu_runs(tmp_path, amp, dtype):
    dtypes = []

    def step(model, batch, ctx):
        loss, metrics = toy.toy_step(model, batch, ctx)
        dtypes.append((ctx.amp_dtype, model(batch["image"]).dtype))
        return loss, metrics

    # allow_slow_amp: fp16 (and bf16 on a CPU without bf16 units) are refused on a CPU otherwise
    _, result = _run(tmp_path, step_fn=step, settings=toy.toy_settings(steps=2, amp=amp, log_every=1,
                                                                       allow_slow_amp=True))
    assert result.amp_dtype == amp and dtypes[0] == (dtype, dtype)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # fp16 trains through a GradScaler, whose scale is logged and checkpointed; bf16 needs none.
    assert ("loss_scale" in records[0]) == (amp == "fp16")
    assert bool(load_safe(tmp_path / "checkpoints" / "step-00000002.pt")["scaler"]) == (amp == "fp16")
    # A checkpoint written under AMP cannot be resumed in fp32: the continuation would not be exact.
    with pytest.raises(CheckpointError, match=f"amp: checkpoint '{amp}' vs now 'off'"):
        _run(tmp_path, settings=toy.toy_settings(steps=3, amp="off"))


# ---- files ---------------------------------------------------------------------------------------
def test_checkpoint_and_model_load_with_weights_only(reference):
    run_dir, ref_weights, _ = reference
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-00000010.pt", "step-00000012.pt"]  # keep last 2
    ckpt = torch.load(ckpts[-1], weights_only=True)
    assert ckpt["step"] == 12 and ckpt["config"] == {"toy": True} and ckpt["config_hash"] == "cfg-a"
    assert {"model", "optimizer", "scaler", "rng", "sampler", "settings", "metrics"} <= ckpt.keys()
    assert ckpt["sampler"]["epoch"] == 2 and ckpt["sampler"]["index_in_epoch"] == 0  # 24 samples / batch 4
    assert set(ckpt["rng"]) == {"python", "numpy", "torch", "cuda"}
    final = torch.load(run_dir / "model.pt", weights_only=True)
    rebuilt = toy.ToyNet(**final["model_args"])
    rebuilt.load_state_dict(final["state_dict"])
    _assert_same_weights(rebuilt.state_dict(), ref_weights)
    assert not [p for p in run_dir.rglob("*") if ".tmp." in p.name]


class _Payload:
    """Runs open(marker, 'w') when unpickled: what a hostile "checkpoint" would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_crafted_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="not a plain-tensor checkpoint.*will not be executed"):
        load_safe(evil)
    assert not marker.exists()
    # The trainer refuses it too instead of skipping to an older checkpoint.
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(evil, run_dir / "checkpoints" / "step-00000002.pt")
    with pytest.raises(CheckpointError, match="not a plain-tensor checkpoint"):
        _run(run_dir, settings=toy.toy_settings(steps=3))
    assert not marker.exists()


def test_save_atomic_leaves_old_file_intact_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_atomic({"w": torch.ones(3)}, path)

    def failing_save(obj, f):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        save_atomic({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_safe(path)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


@pytest.mark.parametrize("value, kind", [(Path("/x"), "PosixPath"), (np.float64(1.0), "float64"),
                                         (torch.__version__, "TorchVersion")])
def test_non_plain_values_are_refused_before_writing(tmp_path, value, kind):
    with pytest.raises(TypeError, match=rf"checkpoint\.config\.root: .*{kind}"):
        save_atomic({"config": {"root": value}}, tmp_path / "c.pt")
    assert not list(tmp_path.iterdir())


def test_truncated_newest_checkpoint_falls_back_to_previous(tmp_path):
    save_atomic({"step": 1}, tmp_path / "step-00000001.pt")
    save_atomic({"step": 2}, tmp_path / "step-00000002.pt")
    newest = tmp_path / "step-00000002.pt"
    newest.write_bytes(newest.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_safe(newest)
    step, path, payload = latest_checkpoint(tmp_path)
    assert (step, path.name, payload["step"]) == (1, "step-00000001.pt", 1)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_safe(tmp_path / "missing.pt")


def test_metrics_truncation_drops_later_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 3, "loss": 1.0}\n{"step": 6, "loss": 0.5}\n{"step": 9, "lo')
    _truncate_metrics(path, 6)
    assert path.read_text() == '{"step": 3, "loss": 1.0}\n{"step": 6, "loss": 0.5}\n'
    _truncate_metrics(path, 0)
    assert path.read_text() == ""


def test_check_plain_accepts_what_checkpoints_hold():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    opt.step()
    check_plain({"optimizer": opt.state_dict(), "size": torch.Size([2]), "t": (1, 2.0, None, "x")})


# ---- DDP -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("after_depth", [False, True], ids=["alone", "after-depth-group"])
def test_ddp_two_cpu_ranks_give_the_same_loss_as_one(tmp_path, after_depth):
    """2 gloo ranks = 1 rank, also when the depth stage's process group and barrier came first (as in `run`)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists() or not torch.distributed.is_available():
        pytest.skip("torchrun / torch.distributed not available")
    steps = 8
    # GroupNorm and no dropout/mask: BatchNorm on CPU cannot be synchronised (SyncBatchNorm needs
    # CUDA) and per-rank generators draw different masks than one rank, so only a model without
    # those can match one rank up to float summation order.
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(TOY_PATH),
                           str(tmp_path / "ddp"), "--plain", "--norm", "group", "--steps", str(steps),
                           "--log-every", "1", "--ckpt-every", "4", *(["--after-depth-group"] if after_depth else [])],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _run(tmp_path / "one", settings=toy.toy_settings(steps=steps, log_every=1, checkpoint_every=4),
         step_fn=lambda m, b, c: toy.toy_step(m, b, c, mask_ratio=0.0), norm="group", dropout=0.0,
         config_hash="toy-config")
    one = [json.loads(line)["loss"] for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line)["loss"] for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == steps
    np.testing.assert_allclose(two, one, rtol=1e-5)
    assert one[-1] < one[0]  # it trained
    ckpt = load_safe(tmp_path / "ddp" / "checkpoints" / "step-00000008.pt")
    assert ckpt["world_size"] == 2 and not any(k.startswith("module.") for k in ckpt["model"])
    assert "DDP over 2 ranks on cpu, process group backend gloo" in proc.stderr


# ---- progress --------------------------------------------------------------------------------------
def test_log_lines_when_not_a_terminal(tmp_path, caplog):
    caplog.set_level("INFO", logger="pipeline.train")
    _run(tmp_path, settings=toy.toy_settings(steps=4, log_every=2))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
    assert "steps/s" in lines[0] and "ETA" in lines[0]


def test_progress_bar_renders_step_loss_rate_and_eta(capsys):
    from pipeline.training.log import Progress as _Progress

    bar = _Progress(total=10, start=2, bar=True, log_lines=True)
    for done in range(3, 6):
        bar.step(done, 0.5)
    bar.close()
    err = capsys.readouterr().err
    assert "5/10" in err and "loss 0.5000" in err and "steps/s" in err and "ETA" in err


def test_lr_factor_warmup_then_cosine_to_zero():
    from pipeline.training import TrainSettings, lr_factor

    s = TrainSettings(steps=10, warmup_steps=2, lr_schedule="cosine")
    assert [lr_factor(s, i) for i in (0, 1)] == [0.5, 1.0]
    assert lr_factor(s, 2) == pytest.approx(1.0) and lr_factor(s, 6) == pytest.approx(0.5)
    assert lr_factor(s, 10) == pytest.approx(0.0, abs=1e-12)
    c = TrainSettings(steps=10)
    assert all(lr_factor(c, i) == 1.0 for i in range(10))
    with pytest.raises(ConfigError, match="lr_schedule"):
        TrainSettings(lr_schedule="step")


def test_cosine_schedule_resumes_exactly_and_changes_the_run(tmp_path):
    """The lr is a function of the step: a crash + resume under warm-up + cosine ends with the
    uninterrupted run's weights, and the schedule really changes training."""
    settings = toy.toy_settings(steps=STEPS, lr_schedule="cosine", warmup_steps=3)
    ref_model, _ = _run(tmp_path / "ref", settings=settings)
    ref = {k: v.clone() for k, v in ref_model.state_dict().items()}

    crashing_step = _crash_at(7)

    with pytest.raises(Crash):
        _run(tmp_path / "run", step_fn=crashing_step, settings=settings)
    model, result = _run(tmp_path / "run", settings=settings)
    assert result.resumed_from == 5
    _assert_same_weights(model.state_dict(), ref)
    const, _ = _run(tmp_path / "const", settings=toy.toy_settings(steps=STEPS))
    assert any(not torch.equal(ref[k], v) for k, v in const.state_dict().items())


def test_bf16_on_a_cpu_without_bf16_units_is_refused(monkeypatch, caplog):
    """The synthetic preset asks for bf16 (fast on AVX-512 BF16 / AMX CPUs); elsewhere it is emulated, ~9x slower
    than fp32 (docs/benchmarks.md): refused with the override named, or a warning when allowed on purpose."""
    import torch

    from pipeline.training import runtime

    caplog.set_level("WARNING", logger="pipeline.train")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert runtime.resolve_amp("bf16", torch.device("cpu"), section="teach") is torch.bfloat16
    assert not caplog.records
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    with pytest.raises(ConfigError, match=r"config field teach.amp: 'bf16' on cpu .*no bf16 units.*"
                                          r"--set teach.amp=off --set distill.amp=off \(another artifact key"):
        runtime.resolve_amp("bf16", torch.device("cpu"), section="teach")
    assert runtime.resolve_amp("bf16", torch.device("cpu"), allow_slow=True) is torch.bfloat16
    assert "no bf16 units" in caplog.text


# ---- fp16 + GradScaler on CPU (the paper presets' precision; refused on a CPU unless allowed) --------------------
def _overflow_at(step: int, seen: dict):
    """The toy step; at 0-based ``step`` the loss is scaled by 1e30: finite in fp32, but its gradients overflow fp16
    under the GradScaler's 2^16, so that optimiser step must be skipped. Records the weights at each step start."""
    def step_fn(model, batch, ctx):
        seen[ctx.step] = {k: v.detach().clone() for k, v in ctx.module.state_dict().items()}
        loss, metrics = toy.toy_step(model, batch, ctx)
        return (loss * 1e30 if ctx.step == step else loss), metrics

    return step_fn


def test_fp16_gradscaler_skips_overflow_steps_and_backs_off(tmp_path):
    seen: dict = {}
    settings = toy.toy_settings(steps=6, amp="fp16", allow_slow_amp=True, log_every=1, checkpoint_every=3)
    model, result = _run(tmp_path, step_fn=_overflow_at(2, seen), settings=settings)
    assert result.amp_dtype == "fp16"
    params = [k for k, v in seen[0].items() if v.is_floating_point() and "running" not in k]
    changed = {s: any(not torch.equal(seen[s][k], seen[s + 1][k]) for k in params) for s in range(5)}
    assert changed == {0: True, 1: True, 2: False, 3: True, 4: True}  # step 2 overflowed: no update
    scales = [json.loads(line)["loss_scale"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert scales == [65536.0, 65536.0, 32768.0, 32768.0, 32768.0, 32768.0]  # backed off once, at the overflow
    assert load_safe(tmp_path / "checkpoints" / "step-00000006.pt")["scaler"]["scale"] == 32768.0


def test_fp16_gradscaler_state_survives_an_exact_resume(tmp_path):
    """Crash after an overflow step, resume: the scaler's scale and growth tracker come back from the checkpoint,
    so weights, optimiser state and metrics (loss_scale included) equal an uninterrupted run's bit for bit."""
    settings = toy.toy_settings(steps=STEPS, amp="fp16", allow_slow_amp=True)
    ref_model, _ = _run(tmp_path / "ref", step_fn=_overflow_at(3, {}), settings=settings)
    ref = {k: v.clone() for k, v in ref_model.state_dict().items()}
    overflow = _overflow_at(3, {})

    def crashing(model, batch, ctx):
        if ctx.step == 8:
            raise Crash
        return overflow(model, batch, ctx)

    with pytest.raises(Crash):
        _run(tmp_path / "run", step_fn=crashing, settings=settings)
    saved = load_safe(tmp_path / "run" / "checkpoints" / "step-00000005.pt")["scaler"]
    assert saved["scale"] == 32768.0 and saved["_growth_tracker"] == 1  # one good step since the overflow
    model, result = _run(tmp_path / "run", step_fn=overflow, settings=settings)
    assert result.resumed_from == 5
    _assert_same_weights(model.state_dict(), ref)
    a = load_safe(tmp_path / "ref" / "checkpoints" / "step-00000012.pt")
    b = load_safe(tmp_path / "run" / "checkpoints" / "step-00000012.pt")
    assert a["scaler"] == b["scaler"]
    for k, state in a["optimizer"]["state"].items():
        assert all(torch.equal(state[n], b["optimizer"]["state"][k][n]) for n in state)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()
    assert '"loss_scale": 32768.0' in (tmp_path / "ref" / "metrics.jsonl").read_text()
