"""``bench gpu``: the record's ratios and goals, and the record as markdown tables (docs/benchmarks.md's GPU section)."""
from __future__ import annotations

from typing import Any, Optional

from pipeline.bench.depth import DEPTH_GOALS
from pipeline.bench.harness import ratio, speed

GOALS_CUDA = {"frames_per_s stage/bare_model": 0.95, "frames_per_s stage/run_py_loop": 4.0}
BEIT_L_GOAL_FPS = 300.0  # dpt_beit_large_512, bf16, one H200
AMP_GOAL = 1.5  # training steps/s AMP / fp32
DATA_GOAL = 3.0  # samples/s the trainer's DataLoader delivers / samples/s the paper's fp16 step consumes (issue 23)
SYNC_GOAL = 1.0  # host reads (CUDA syncs) of the trainer's loop per log_every steps, at most (issue 23)


def ratios_and_goals(cases: dict, models, device, p_stage: str, b_stage: int) -> tuple[dict, dict]:
    def fps(name: str) -> Optional[float]:
        c = cases.get(name) or {}
        return c.get("frames_per_s")

    ratios: dict[str, Optional[float]] = {}
    goals: dict[str, dict] = {}
    goal_values = GOALS_CUDA if device.type == "cuda" else DEPTH_GOALS["cpu"]
    for m in models:
        bare = fps(f"{m}/bare/{p_stage}/b{b_stage}")
        best = max(("cpu", "device"), key=lambda pre: fps(f"{m}/stage/{pre}") or 0.0)
        for pre in ("cpu", "device"):
            s = fps(f"{m}/stage/{pre}")
            ratios[f"{m} frames_per_s stage_{pre}/bare_model"] = ratio(s, bare)
            ratios[f"{m} frames_per_s stage_{pre}/run_py_loop"] = ratio(s, fps(f"{m}/run_py_loop"))
        ratios[f"{m} frames_per_s stage_device/stage_cpu"] = ratio(fps(f"{m}/stage/device"), fps(f"{m}/stage/cpu"))
        ds = cases.get(f"{m}/data_side") or {}
        ratios[f"{m} workers needed for the bare model"] = ratio(bare, ds.get("cpu_frames_per_s_per_worker"))
        for key, g in goal_values.items():
            v = ratios[f"{m} {key.replace('stage/', f'stage_{best}/')}"]
            goals[f"{m} {key}"] = {"goal": g, "value": v, "met": v is not None and v >= g, "via": f"stage/{best}"}
    if device.type == "cuda" and "dpt_beit_large_512" in models:
        m = "dpt_beit_large_512"
        v = max([fps(f"{m}/stage/{pre}") or 0.0 for pre in ("cpu", "device")]) or None
        goals[f"{m} stage frames_per_s ({p_stage})"] = {"goal": BEIT_L_GOAL_FPS, "value": v,
                                                       "met": v is not None and v >= BEIT_L_GOAL_FPS}
    pairs = [("teach steps_per_s amp/fp32", "teach/amp", "teach/fp32"),
             ("paper steps_per_s fp16/fp32", "paper/fp16", "paper/fp32")]
    pairs += [(f"distill {mode} steps_per_s amp/fp32", f"distill/{mode}/amp", f"distill/{mode}/fp32")
              for mode in ("live", "cached")]
    pairs += [(f"distill {a} steps_per_s cached/live", f"distill/cached/{a}", f"distill/live/{a}")
              for a in ("fp32", "amp")]
    for key, a, b in pairs:
        ca, cb = cases.get(a) or {}, cases.get(b) or {}
        ratios[key] = ratio(speed(ca), speed(cb)) if "interleaved" in ca and "interleaved" in cb else None
        if device.type == "cuda" and ("amp/fp32" in key or "fp16/fp32" in key):
            goals[key] = {"goal": AMP_GOAL, "value": ratios[key], "met": ratios[key] is not None
                          and ratios[key] >= AMP_GOAL}
    # the data side against the GPU's demand: samples/s the DataLoader delivers / samples/s the paper's step uses
    data, demand = cases.get("data") or {}, cases.get("paper/fp16") or {}
    key = "data samples_per_s / paper fp16 samples_per_s"
    ratios[key] = (ratio(data["samples_per_s"], speed(demand) * data["batch"])
                   if "samples_per_s" in data and "interleaved" in demand else None)
    if device.type == "cuda":
        goals[key] = {"goal": DATA_GOAL, "value": ratios[key], "met": ratios[key] is not None
                      and ratios[key] >= DATA_GOAL, "via": f"{data.get('workers')} workers"}
    syncs = cases.get("syncs") or {}
    for key, field in (("trainer host reads per log interval (project code)", "host_reads_per_log_interval"),
                       ("trainer CUDA syncs per log interval", "cuda_syncs_per_log_interval")):
        if field == "cuda_syncs_per_log_interval" and device.type != "cuda":
            continue
        v = syncs.get(field)
        ratios[key] = v
        goals[key] = {"goal": SYNC_GOAL, "op": "<=", "value": v, "met": v is not None and v <= SYNC_GOAL}
    return ratios, goals


# --------------------------------------------------------------------------------------------------------- markdown
def _f(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 10 ** nd else f"{v:.0f}"
    return str(v)


def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(_f(v) for v in r) + " |" for r in rows]


def gpu_markdown(rec: dict) -> str:
    """The record of ``bench gpu`` as markdown tables (what docs/benchmarks.md's GPU section shows)."""
    st, cases = rec["setup"], rec["cases"]
    out = [f"## bench gpu: {rec['device_name']} ({rec['device']}), torch {rec['torch']}, {rec['time']}", "",
           f"{rec['wall_s']} s of a {rec['budget']['budget_s']:.0f} s budget (estimated >= "
           f"{rec['budget']['estimate_lower_bound_s']} s); stage precision {st['stage_precision']}, batch "
           f"{st['stage_batch']}, {st['num_workers']} workers; {st['frames']} frames of "
           f"{st['frame_size'][0]}x{st['frame_size'][1]} ({st['frame_format']}); TF32 {st['tf32']}. Peak memory: "
           f"torch.cuda.max_memory_allocated per case on CUDA; on a CPU the process's peak RSS (not per case).", ""]
    for m in st["models"]:
        rows = []
        for name, c in cases.items():
            if name.startswith(f"{m}/bare/"):
                d = c.get("vs_fp32") or {}
                rows.append([name[len(m) + 1:], c.get("precision"), c.get("batch"), c.get("memory_format"),
                             c.get("compile"), c.get("frames_per_s"), c.get("tflops_per_s"), c.get("peak_mem_mib"),
                             d.get("max_rel"), d.get("mean_rel"), c.get("compile_s"), c.get("error")])
        if rows:
            out += [f"### {m}: bare model ({st['flops_per_frame'][m] / 1e9:.1f} GFLOP/frame)", ""]
            out += _table(["case", "precision", "batch", "format", "compile", "frames/s", "TFLOP/s", "peak MiB",
                           "max rel vs fp32", "mean rel vs fp32", "compile s", "error"], rows) + [""]
    rows = []
    for m in st["models"]:
        ds = cases.get(f"{m}/data_side") or {}
        sc, sd, rp = (cases.get(f"{m}/{k}") or {} for k in ("stage/cpu", "stage/device", "run_py_loop"))
        r = rec["ratios"]
        rows.append([m, (cases.get(f"{m}/bare/{st['stage_precision']}/b{st['stage_batch']}") or {}).get("frames_per_s"),
                     sc.get("frames_per_s"), sd.get("frames_per_s"), rp.get("frames_per_s"),
                     r.get(f"{m} frames_per_s stage_cpu/bare_model"), r.get(f"{m} frames_per_s stage_device/bare_model"),
                     r.get(f"{m} frames_per_s stage_cpu/run_py_loop"), r.get(f"{m} frames_per_s stage_device/run_py_loop"),
                     (sd.get("cache_vs_cpu_cache") or {}).get("max_rel"),
                     (ds.get("device_vs_cpu_depth_fp32") or {}).get("max_rel"),
                     (ds.get("device_vs_cpu_depth_fp32") or {}).get("mean_rel"),
                     sc.get("peak_mem_mib"), sc.get("seconds_waiting_for_writer")])
    out += ["### depth stage vs bare model vs run.py loop (frames/s)", ""]
    out += _table(["model", "bare", "stage cpu", "stage device", "run.py", "cpu/bare", "device/bare", "cpu/run.py",
                   "device/run.py", "caches max rel (device vs cpu)", "depth max rel (fp32)", "depth mean rel (fp32)",
                   "stage peak MiB", "writer wait s"], rows) + [""]
    rows = []
    for m in st["models"]:
        ds = cases.get(f"{m}/data_side") or {}
        if ds and "error" not in ds:
            rows.append([m, ds["read_ms"], ds["decode_ms"], ds["cpu_preprocess_old_ms"], ds["cpu_preprocess_ms"],
                         ds["cpu_new_equals_old"], ds["cpu_old_frames_per_s_per_worker"],
                         ds["cpu_frames_per_s_per_worker"], ds["device_frames_per_s"],
                         rec["ratios"].get(f"{m} workers needed for the bare model")])
    out += ["### data side alone (one worker = one core; device: decode + resize on the device)", ""]
    out += _table(["model", "read ms", "decode ms", "preprocess old ms", "preprocess ms", "bit-identical",
                   "old frames/s/worker", "frames/s/worker", "device frames/s", "workers for bare"], rows) + [""]
    rows = [[n, c.get("amp"), c.get("recon_loss"), speed(c) if "interleaved" in c else None, c.get("peak_mem_mib"),
             c.get("host_reads_project"), c.get("cuda_syncs"), c.get("error")]
            for n, c in cases.items() if n.split("/")[0] in ("teach", "paper", "distill")]
    out += [f"### training steps/s (width {st['train']['width']}, {st['train']['size']} px, batch "
            f"{st['train']['batch']}; interleaved; host reads / CUDA syncs of one step)", ""]
    out += _table(["case", "amp", "loss", "steps/s", "peak MiB", "host reads", "CUDA syncs", "error"], rows) + [""]
    sy, da = cases.get("syncs") or {}, cases.get("data") or {}
    out += ["### the trainer's loop and its data side", ""]
    out += _table(["case", "what", "value"], [
        ["syncs", f"host reads (project) in {sy.get('steps')} steps, log_every {sy.get('log_every')}",
         sy.get("host_reads_project")],
        ["syncs", "CUDA syncs per log interval", sy.get("cuda_syncs_per_log_interval")],
        ["syncs", "trainer steps/s", sy.get("steps_per_s")],
        ["data", f"samples/s, {da.get('workers')} workers, batch {da.get('batch')}", da.get("samples_per_s")],
        ["data", "samples/s per worker", da.get("samples_per_s_per_worker")]]) + [""]
    out += ["### ratios and goals", ""]
    out += _table(["ratio", "value"], [[k, v] for k, v in rec["ratios"].items() if v is not None]) + [""]
    out += _table(["goal", "target", "value", "met"], [[k, f"{g.get('op', '>=')} {g['goal']}", g["value"], g["met"]]
                                                       for k, g in rec.get("goals", {}).items()]) + [""]
    log = rec["budget"]["log"]
    out += ["### budget: estimate vs actual per case", ""]
    out += _table(["part", "case", "estimate s", "actual s", "skipped / error"],
                  [[r["part"], r["case"], r.get("estimate_s"), r.get("actual_s"), r.get("skipped") or r.get("error")]
                   for r in log]) + [""]
    return "\n".join(out)
