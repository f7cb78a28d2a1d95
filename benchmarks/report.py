#!/usr/bin/env python3
"""Render pytest-benchmark JSON from benchmarks/ as markdown tables.

    python benchmarks/report.py out.json [more.json ...] [-o table.md]

Definitions (as in benchmarks/README.md):
- patterns/s = batch / median latency of one batch call (a "pattern" is one batch item:
  C = gridsize² diffraction frames; frames/s = patterns/s × C);
- p50 / p99 = percentiles of the per-call latency (one call = one batch);
- ratios are taken within one JSON file (one run), never across runs;
- share of peak = patterns/s × FLOPs per pattern / the run's measured fp32 matmul peak.

Plain Python (json, argparse, statistics); no third-party imports.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional

PATH_ORDER = ["eager", "eager_channels_last", "torchscript", "ort_cpu", "eager_cuda", "ort_cuda", "ort_tensorrt_fp16",
              "runtime_cpu", "runtime_cuda", "stitch", "eager_cpu"]

# Published figures, from shared/reference/anchors.md (not measured here). µs per pattern as published.
PUBLISHED = [
    # source, model, input, hardware / precision, batch, µs per pattern, N for matching, note
    ("edgePtychoNN (Babu et al., Nat. Commun. 14:7059, 2023, Table 2)", "PtychoNN 2.0, 0.7 M params", 128,
     "RTX A6000, TensorRT (TF32)", 1, 370.0, "preprocessing excluded"),
    ("edgePtychoNN (ibid.)", "PtychoNN 2.0, 0.7 M params", 128, "RTX A6000, TensorRT (TF32)", 2, 220.0, ""),
    ("edgePtychoNN (ibid.)", "PtychoNN 2.0, 0.7 M params", 128, "RTX A6000, TensorRT (TF32)", 4, 130.0, ""),
    ("edgePtychoNN (ibid.)", "PtychoNN 2.0, 0.7 M params", 128, "RTX A6000, TensorRT (TF32)", 8, 90.0, ""),
    ("edgePtychoNN (ibid.)", "PtychoNN 2.0, 0.7 M params", 128, "RTX A6000, TensorRT (TF32)", 16, 70.0, ""),
    ("edgePtychoNN (ibid.)", "PtychoNN 2.0, 0.7 M params", 128, "Jetson AGX Xavier, TensorRT", 1, 2300.0, ""),
    ("edgePtychoNN (ibid.)", "PtychoNN 2.0, 0.7 M params", 128, "Jetson AGX Xavier, TensorRT", 16, 680.0, ""),
    ("PtychoPINN (arXiv 2602.21361)", "PtychoPINN U-Net (≈2.3 M params at N=64)", 64, "single GPU (model not stated)",
     None, 1e6 / 6100, "≈6.1k patterns/s, stitching excluded; batch and precision not stated"),
    ("PtychoPINN (arXiv 2602.21361)", "PtychoPINN U-Net", 128, "single GPU (model not stated)", None, 1e6 / 2600,
     "≈2.6k patterns/s, stitching excluded"),
    ("LSQ-ML iterative baseline (pty-chi), ibid.", "iterative, 128×128", 128, "GPU", None, 1.444e6 / 10304,
     "1.444 s per pass over 10,304 frames: one iteration, not a reconstruction"),
]


# --------------------------------------------------------------------------- loading


class Entry:
    def __init__(self, run: str, raw: dict[str, Any]) -> None:
        self.run = run
        self.raw = raw
        self.group = raw.get("group") or ""
        self.name = raw.get("name", "")
        self.info: dict[str, Any] = raw.get("extra_info") or {}
        self.stats: dict[str, Any] = raw.get("stats") or {}
        self.kind = self.info.get("kind", "")
        self.path = self.info.get("path", self.name)

    @property
    def median(self) -> Optional[float]:
        return self.stats.get("median")

    @property
    def pps(self) -> Optional[float]:
        return self.info.get("patterns_per_s")


def load(paths: Iterable[str]) -> tuple[list[Entry], list[dict[str, Any]]]:
    entries, runs = [], []
    names = [Path(p).stem for p in paths]
    for p, name in zip(paths, names, strict=True):
        tag = name if names.count(name) == 1 else p
        data = json.loads(Path(p).read_text())
        runs.append({"tag": tag, "file": p, "datetime": data.get("datetime"), "machine": data.get("machine_info", {}),
                     "commit": data.get("commit_info", {})})
        for raw in data.get("benchmarks", []):
            entries.append(Entry(tag, raw))
    return entries, runs


# --------------------------------------------------------------------------- formatting


def num(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "—"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.{digits}g}"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def order(path: str) -> int:
    return PATH_ORDER.index(path) if path in PATH_ORDER else len(PATH_ORDER)


def peak_of(entries: list[Entry], run: str, kind: str = "peak") -> Optional[float]:
    """Best GFLOP/s of the run's peak benchmark: "peak" (torch.mm) or "peak_conv" (one 3×3 convolution)."""
    vals = [e.info.get("gflops") for e in entries if e.run == run and e.kind == kind and e.info.get("gflops")]
    return max(vals) if vals else None


def shares(e: Entry, entries: list[Entry]) -> str:
    mm = share(e, peak_of(entries, e.run, "peak"))
    conv = share(e, peak_of(entries, e.run, "peak_conv"))
    if mm is None and conv is None:
        return "—"
    return f"{pct(mm)} / {pct(conv)}"


def load_flag(e: Entry) -> str:
    load = e.info.get("loadavg_1m")
    if load is None:
        return "—"
    busy = load > (e.info.get("cpu_count") or 1) + 0.5
    return f"{load:.1f}{' ⚠' if busy else ''}"


def share(e: Entry, peak_gflops: Optional[float]) -> Optional[float]:
    if e.info.get("device") != "cpu" or not peak_gflops or not e.pps or not e.info.get("flops_per_pattern"):
        return None
    return e.pps * e.info["flops_per_pattern"] / (peak_gflops * 1e9)


# --------------------------------------------------------------------------- sections


def section_header(runs: list[dict[str, Any]], entries: list[Entry]) -> list[str]:
    out = []
    for r in runs:
        m = r["machine"]
        cpu = m.get("cpu", {}) if isinstance(m.get("cpu"), dict) else {}
        mine = [e for e in entries if e.run == r["tag"]]
        info = next((e.info for e in mine if e.info.get("versions")), {})
        flags = []
        if any(e.info.get("smoke") for e in mine):
            flags.append("SMOKE settings (n_filters_scale=1): not the default model")
        tuned = {e.info.get("malloc_tuned") for e in mine if "malloc_tuned" in e.info}
        if tuned:
            flags.append("malloc tuned (MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ set)" if tuned == {True}
                         else "malloc NOT tuned (eager NCHW may collapse at batch ≥ 64)" if tuned == {False}
                         else "malloc tuning mixed")
        loads = [e.info["loadavg_1m"] for e in mine if e.info.get("loadavg_1m") is not None]
        if loads:
            ncpu = info.get("cpu_count") or 1
            busy = sum(1 for x in loads if x > ncpu + 0.5)
            flags.append(f"host load {min(loads):.1f}–{max(loads):.1f} (1-min average; {busy}/{len(loads)} cases "
                         f"above the {ncpu} CPUs: contended)")
        versions = ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items())
        out.append(f"- **{r['tag']}** (`{r['file']}`): {r['datetime'] or '?'}; "
                   f"{cpu.get('brand_raw') or m.get('processor') or '?'}, {cpu.get('count', '?')} logical CPUs; "
                   f"torch threads {info.get('torch_threads', '?')}"
                   + (f" (PTYCHO_BENCH_THREADS={info['bench_threads']})" if info.get('bench_threads') else "")
                   + f"; {versions}"
                   + (f"; {'; '.join(flags)}" if flags else ""))
    return out + [""]


def section_inference(entries: list[Entry]) -> list[str]:
    inf = [e for e in entries if e.kind == "inference" and e.pps]
    if not inf:
        return []
    out = ["## Inference: diffraction_to_obj", "",
           "patterns/s = batch / median batch latency; × eager and × best eager are within the same run and group "
           "(best eager = fastest of the `eager*` paths); % of peak = patterns/s × FLOPs/pattern / this run's "
           "measured fp32 peak, torch.mm / 3×3 conv (CPU paths only); host load = 1-minute load average during "
           "the case (⚠: above the CPU count, i.e. other processes competed for the cores).", ""]
    # overview: per run and size, paths × batches
    by_size: dict[tuple, list[Entry]] = defaultdict(list)
    for e in inf:
        by_size[(e.run, e.info["N"], e.info["gridsize"])].append(e)
    out += ["### Throughput overview (patterns/s)", ""]
    for (run, N, g), es in sorted(by_size.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        batches = sorted({e.info["batch"] for e in es})
        paths = sorted({e.path for e in es}, key=order)
        cell = {(e.path, e.info["batch"]): e for e in es}
        rows = [[f"`{p}`"] + [num(cell[(p, b)].pps) if (p, b) in cell else "—" for b in batches] for p in paths]
        out += [f"**N={N}, gridsize {g}** ({run})", ""]
        out += table(["path"] + [f"batch {b}" for b in batches], rows)

    groups: dict[tuple, list[Entry]] = defaultdict(list)
    for e in inf:
        groups[(e.run, e.info["N"], e.info["gridsize"], e.info["batch"])].append(e)
    out += ["### Per group", ""]
    for (run, N, g, b), es in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][3], kv[0][0])):
        es.sort(key=lambda e: order(e.path))
        eager = next((e.pps for e in es if e.path == "eager"), None)
        best_eager = max((e.pps for e in es if e.path.startswith("eager")), default=None)
        frames = g > 1
        header = ["path", "device / provider", "precision", "patterns/s"] + (["frames/s"] if frames else []) + \
                 ["µs/pattern", "p50 ms", "p99 ms", "rounds", "× eager", "× best eager", "% of peak (mm / conv)",
                  "host load"]
        rows = []
        for e in es:
            i = e.info
            rows.append([f"`{e.path}`", f"{i.get('device', '?')} / {i.get('provider', '?')}", i.get("precision", "?"),
                         num(e.pps)] + ([num(i.get("frames_per_s"))] if frames else []) +
                        [num(i.get("us_per_pattern")), num(i.get("p50_ms")), num(i.get("p99_ms")),
                         str(i.get("rounds", "?")), ratio(e.pps, eager), ratio(e.pps, best_eager),
                         shares(e, entries), load_flag(e)])
        flops = es[0].info.get("flops_per_pattern")
        out += [f"**{es[0].group}** — N={N}, gridsize {g}, batch {b}; {num(flops / 1e6 if flops else None)} "
                f"MFLOP/pattern ({run})", ""]
        out += table(header, rows)
    return out


def section_cold(entries: list[Entry]) -> list[str]:
    cold = [e for e in entries if e.kind == "cold_start"]
    if not cold:
        return []
    out = ["## Cold start (fresh process: import + load + first inference of 1 pattern)", "",
           "Wall = parent's `subprocess.run` time (median of rounds, includes interpreter start and exit); the "
           "phases are the child's own `perf_counter` timings; peak RSS = the child's own VmHWM (`ru_maxrss` would "
           "report the parent's high-water mark).", ""]
    groups: dict[tuple, list[Entry]] = defaultdict(list)
    for e in cold:
        groups[(e.run, e.info["N"], e.info["gridsize"], e.info["device"])].append(e)
    for (run, N, g, dev), es in sorted(groups.items()):
        es.sort(key=lambda e: 0 if e.path == "runtime" else 1)
        rows = []
        for e in es:
            i = e.info
            rows.append([f"`{e.path}`", i.get("provider", "?"), num(i.get("wall_s")), num(i.get("import_s")),
                         num(i.get("load_s")), num(i.get("first_inference_s")), num(i.get("total_s")),
                         num(i.get("peak_rss_mib")), str(i.get("rounds", "?"))])
        by = {e.path: e.info for e in es}
        if "runtime" in by and "eager" in by:
            r, q = by["runtime"], by["eager"]
            rows.append(["**runtime / eager**", "", ratio(r.get("wall_s"), q.get("wall_s")),
                         ratio(r.get("import_s"), q.get("import_s")), ratio(r.get("load_s"), q.get("load_s")),
                         ratio(r.get("first_inference_s"), q.get("first_inference_s")),
                         ratio(r.get("total_s"), q.get("total_s")),
                         ratio(r.get("peak_rss_mib"), q.get("peak_rss_mib")), ""])
        out += [f"**N={N}, gridsize {g}, {dev}** ({run})", ""]
        out += table(["path", "provider", "wall s", "import s", "load s", "first inference s", "in-process total s",
                      "peak RSS MiB", "rounds"], rows)
    return out


def section_reconstruct(entries: list[Entry]) -> list[str]:
    rec = [e for e in entries if e.kind in ("reconstruct", "stitch") and e.median]
    if not rec:
        return []
    out = ["## End-to-end reconstruction (preprocess + infer + stitch)", "",
           "Stitching share = median of `stitch_patches` alone / median of the whole path (same run, same scan).", ""]
    groups: dict[tuple, list[Entry]] = defaultdict(list)
    for e in rec:
        groups[(e.run, e.group)].append(e)
    for (run, group), es in sorted(groups.items()):
        es.sort(key=lambda e: order(e.path))
        stitch = next((e.median for e in es if e.path == "stitch"), None)
        eager = {e.info.get("device"): e.median for e in es if e.path.startswith("eager")}
        rows = []
        for e in es:
            i = e.info
            ref = eager.get(i.get("device"))
            rows.append([f"`{e.path}`", f"{i.get('device', '?')} / {i.get('provider', '?')}",
                         str(i.get("n_positions", "?")), num(e.pps), num(e.median), num(i.get("p99_ms", 0) / 1e3),
                         str(i.get("rounds", "?")),
                         "—" if e.path == "stitch" or ref is None else ratio(ref, e.median),
                         "—" if e.path == "stitch" or not stitch else pct(stitch / e.median)])
        i0 = es[0].info
        out += [f"**{group}** — N={i0.get('N')}, {i0.get('n_positions')} positions, batch {i0.get('batch')}, "
                f"object {i0.get('object_side')}² px ({run})", ""]
        out += table(["path", "device / provider", "patterns", "patterns/s", "median s", "p99 s", "rounds",
                      "speed-up vs eager (same device)", "stitching share"], rows)
    return out


def section_refine(entries: list[Entry]) -> list[str]:
    ref = [e for e in entries if e.kind == "refine" and e.median]
    if not ref:
        return []
    out = ["## Refinement sweeps (benchmarks/test_refinement.py)", "",
           "One sweep = every frame's object update once. Ratio = the `epie_loop` median (refine_epie, one frame at "
           "a time) / this path's median, same run.", ""]
    groups: dict[tuple, list[Entry]] = defaultdict(list)
    for e in ref:
        groups[(e.run, e.group)].append(e)
    refine_order = ["epie_loop", "numpy", "numba", "numba_1thread", "onnx_cpu", "onnx_cpu_1thread", "onnx_dft_floor",
                    "torch_cpu", "torch_cuda", "onnx_cuda", "amplitude_prior", "phase_field"]
    for (run, group), es in sorted(groups.items()):
        es.sort(key=lambda e: refine_order.index(e.path) if e.path in refine_order else len(refine_order))
        loop = next((e.median for e in es if e.path == "epie_loop"), None)
        rows = [[f"`{e.path}`", f"{e.info.get('device', '?')} / {e.info.get('provider', e.info.get('backend', '?'))}",
                 str(e.info.get("batches", "?")), num(e.info.get("sweeps_per_s")), num(e.median),
                 str(e.info.get("rounds", "?")), "—" if loop is None else ratio(loop, e.median), load_flag(e)]
                for e in es]
        i0 = es[0].info
        out += [f"**{group}** — N={i0.get('N')}, {i0.get('frames')} frames ({run})", ""]
        out += table(["path", "device / backend", "batches per sweep", "sweeps/s", "median s per sweep", "rounds",
                      "speed-up vs epie_loop", "load"], rows)
    return out


def section_end_to_end(entries: list[Entry]) -> list[str]:
    e2e = [e for e in entries if e.kind == "end_to_end" and e.info.get("wall_s")]
    if not e2e:
        return []
    out = ["## The whole path on the held-out scan (benchmarks/test_end_to_end.py)", "",
           "Wall time of one reconstruction of the same scan on the same cores, its quality against the true object, "
           "and the ratio of its wall time to `network_refined` (the network + the default refinement), same run.", ""]
    groups: dict[tuple, list[Entry]] = defaultdict(list)
    for e in e2e:
        groups[(e.run, e.group)].append(e)
    e2e_order = ["network", "network_refined", "ptychi_epie", "ptychi_lsqml"]
    for (run, group), es in sorted(groups.items()):
        es.sort(key=lambda e: e2e_order.index(e.path) if e.path in e2e_order else len(e2e_order))
        base = next((e.info["wall_s"] for e in es if e.path == "network_refined"), None)
        rows = [[f"`{e.path}`", str(e.info.get("epochs", "?")), num(e.info["wall_s"]),
                 num(e.info.get("phase_ssim")), num(e.info.get("amplitude_ssim")),
                 "—" if base is None else ratio(e.info["wall_s"], base), load_flag(e)] for e in es]
        out += [f"**{group}** ({run})", ""]
        out += table(["path", "sweeps / epochs", "wall s", "phase SSIM", "amplitude SSIM",
                      "wall / network_refined", "load"], rows)
    return out


def section_export(entries: list[Entry]) -> list[str]:
    exp = [e for e in entries if e.kind == "export"]
    if not exp:
        return []
    names = sorted({n for e in exp for n in e.info.get("graphs", {})})
    rows = []
    for e in sorted(exp, key=lambda e: (e.run, e.info["N"], e.info["gridsize"])):
        i = e.info
        g = i.get("graphs", {})
        per_round = " / ".join(num(x) for x in i.get("export_s_per_round", []))
        rows.append([f"N={i['N']} g{i['gridsize']}", e.run, f"{i.get('params', 0):,}", num(e.median),
                     per_round or "—", num(i.get("graphs_compile_s")), num(i.get("bundle_mib"))] +
                    [f"{num(g[n]['mib'])} MiB / {num(g[n]['export_s'])} s" if n in g else "—" for n in names])
    return ["## Export (`add_graphs_to_bundle(force=True)` on a copy)", "",
            "Time includes reading the bundle, rebuilding the models, parity inputs, TorchScript + ONNX export of "
            "both models, parity checks and the atomic rewrite; graph compile s = the sum of the four graphs' own "
            "export times (the rest is reading, rebuilding, parity inputs and checks, writing). Per graph: size / "
            "its own export time.", ""] + \
        table(["model", "run", "params", "export s (median)", "export s per round", "graph compile s",
               "bundle MiB"] + [f"`{n}`" for n in names], rows)


def section_flops(entries: list[Entry]) -> list[str]:
    fl = [e for e in entries if e.kind == "flops"]
    peaks = [e for e in entries if e.kind in ("peak", "peak_conv") and e.info.get("gflops")]
    if not fl and not peaks:
        return []
    out = ["## Work per pattern and share of peak", ""]
    for p in peaks:
        i = p.info
        out.append(f"- Peak ({p.run}): `{i.get('path')}` with {i.get('torch_threads', '?')} threads: "
                   f"**{num(i['gflops'])} GFLOP/s** best round, {num(i.get('gflops_median'))} GFLOP/s median "
                   f"({i.get('rounds', '?')} rounds).")
    out.append("")
    inf = [e for e in entries if e.kind == "inference" and e.pps]
    rows = []
    for f in sorted(fl, key=lambda e: (e.run, e.info["N"], e.info["gridsize"])):
        i = f.info
        mine = [e for e in inf if e.run == f.run and e.info["N"] == i["N"] and e.info["gridsize"] == i["gridsize"]]
        cpu = [e for e in mine if e.info.get("device") == "cpu"]
        gpu = [e for e in mine if e.info.get("device") == "cuda"]
        best_cpu = max(cpu, key=lambda e: e.pps, default=None)
        best_gpu = max(gpu, key=lambda e: e.pps, default=None)
        fpp = i["flops_per_pattern"]
        rows.append([
            f"N={i['N']} g{i['gridsize']}", f.run, f"{i.get('params', 0):,}", num(fpp / 1e9),
            f"`{best_cpu.path}` b{best_cpu.info['batch']}: {num(best_cpu.pps)}" if best_cpu else "—",
            num(best_cpu.pps * fpp / 1e9) if best_cpu else "—", shares(best_cpu, entries) if best_cpu else "—",
            f"`{best_gpu.path}` b{best_gpu.info['batch']}: {num(best_gpu.pps)} ({num(best_gpu.pps * fpp / 1e12)} "
            "TFLOP/s)" if best_gpu else "—",
        ])
    out += table(["model", "run", "params", "GFLOP/pattern", "best CPU path: patterns/s", "achieved GFLOP/s",
                  "share of peak (mm / conv)", "best GPU path"], rows)
    out += ["FLOPs: `torch.utils.flop_counter.FlopCounterMode` on one forward (convolutions; 2 FLOPs per "
            "multiply-add).", ""]
    return out


def section_published(entries: list[Entry]) -> list[str]:
    inf = [e for e in entries if e.kind == "inference" and e.pps and e.info.get("gridsize") == 1]

    def best_here(N: int, batch: Optional[int]) -> str:
        cands = [e for e in inf if e.info["N"] == N and (batch is None or e.info["batch"] == batch)]
        if not cands:
            return "—"
        e = max(cands, key=lambda e: e.pps)
        return f"{num(e.pps)} (`{e.path}`, b{e.info['batch']}, {e.run})"

    rows = []
    for source, model, N, hw, batch, us, note in PUBLISHED:
        rows.append([source, model, f"{N}×{N}", hw, "—" if batch is None else str(batch), num(us), num(1e6 / us),
                     note, best_here(N, batch)])
    return ["## Published references (NOT measured here)", "",
            "Figures as published (shared/reference/anchors.md), converted to µs/pattern and patterns/s. Different "
            "models, hardware and precision: context, not a like-for-like comparison. The last column is this "
            "report's best measured gridsize-1 path at the same N (and batch, where the source gives one).", ""] + \
        table(["source", "model", "input", "hardware / engine", "batch", "µs/pattern", "patterns/s", "note",
               "best measured here (patterns/s)"], rows)


def render(paths: list[str]) -> str:
    entries, runs = load(paths)
    out = ["# ptycho_export / ptycho_runtime benchmark report", ""]
    out += section_header(runs, entries)
    for section in (section_inference, section_cold, section_reconstruct, section_refine, section_end_to_end,
                    section_export, section_flops, section_published):
        out += section(entries)
    return "\n".join(out).rstrip() + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Render pytest-benchmark JSON from benchmarks/ as markdown.")
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json output file(s)")
    parser.add_argument("-o", "--output", help="write the markdown here (default: stdout)")
    args = parser.parse_args(argv)
    text = render(args.json)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
