"""Every reader against every hostile bundle (tests/hostile/hostile_bundles.py), in capped subprocesses.

Each reader runs in its own child process (address space capped in
``preexec_fn`` and again after the legitimate load, wall-clock limit): the
legitimate bundle first, then every case. Per case the reader must end in a
``BundleError`` (library calls) or exit 2/3/4 with one stderr line (CLIs)
where the case is in its ``must_reject``, must never raise anything else,
must refuse within 2 s (what it accepts, or a complete ``verify`` run: 3× the legitimate load), must
not grow its peak memory by more than 2× the legitimate bundle's size, and
must not read a canary file. A few cases per class also go through the real
CLI entry points in a fresh subprocess.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))
import hostile_bundles as gen  # noqa: E402

HERE = Path(__file__).parent
READERS = (gen.READ, gen.LOAD, gen.LOAD_TS, gen.TORCH, gen.INFO, gen.INSPECT, gen.VERIFY)
AS_CAP = 8 * 2**30
CASE_LIMIT_S = 2.0
# the parsing process's base time limit: a case that makes libhdf5 loop must be refused within CASE_LIMIT_S
PARSE_LIMIT = {"PTYCHO_RUNTIME_PARSE_SECONDS": "1"}


def _cap() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_CAP, AS_CAP))


@pytest.fixture(scope="module")
def legit(bundle_cache, tmp_path_factory) -> Path:
    """The session's cached default bundle (tests/conftest.py make_bundle), copied: trained once per session."""
    import shutil

    from ptycho_export.testing import make_test_bundle

    key = ()  # make_bundle()'s key: the defaults, N=64, gridsize=1, with graphs
    if key not in bundle_cache:
        bundle_cache[key] = make_test_bundle(tmp_path_factory.mktemp("bundle"))
    dst = tmp_path_factory.mktemp("legit") / "wts.h5"
    shutil.copyfile(bundle_cache[key], dst)
    return dst


@pytest.fixture(scope="module")
def cases(legit, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("hostile")
    yield gen.make_cases(legit, root / "cases", root / "canaries")
    shutil.rmtree(root, ignore_errors=True)  # ~70 copies of the bundle


@pytest.fixture(scope="module")
def results(legit, cases, tmp_path_factory) -> dict[str, dict[str, dict]]:
    """reader → case name → the child's record (the legitimate bundle under the name "legit")."""
    work = tmp_path_factory.mktemp("runs")
    spec = [{"name": "legit", "path": str(legit), "cwd": str(work)}]
    spec += [{"name": c.name, "path": str(c.path), "cwd": str(c.cwd or work)} for c in cases]
    spec_file = work / "cases.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, **PARSE_LIMIT, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    out: dict[str, dict[str, dict]] = {}
    for reader in READERS:
        gen.reset_canaries([p for c in cases for p in c.canaries])
        proc = subprocess.run([sys.executable, str(HERE / "_child.py"), reader, str(spec_file)], capture_output=True,
                              text=True, timeout=600, preexec_fn=_cap, env=env)
        records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        out[reader] = {r["case"]: r for r in records}
        out[reader]["__canaries_read__"] = [str(p) for p in gen.canaries_read([p for c in cases for p in c.canaries])]
        out[reader]["__stderr__"] = proc.stderr[-3000:]
    return out


def _rejected(reader: str, rec: dict) -> bool:
    if reader in (gen.INFO, gen.INSPECT, gen.VERIFY):
        lines = [ln for ln in rec["stderr"].splitlines() if ln.strip()]
        return rec["outcome"] == "ok" and rec["exit"] in (2, 3, 4) and len(lines) == 1
    return rec["outcome"].startswith("bundle:")


@pytest.mark.parametrize("reader", READERS)
def test_reader_handles_every_hostile_case(reader, cases, results, legit):
    recs = results[reader]
    assert "legit" in recs, f"the child died: {recs['__stderr__']}"
    base = recs["legit"]
    assert base["outcome"] == "ok" and base["exit"] in (None, 0), base
    problems = []
    for c in cases:
        rec = recs.get(c.name)
        if rec is None:
            problems.append(f"{c.name}: no result (child crashed or hung): {recs['__stderr__'][-500:]}")
            continue
        if rec["outcome"].startswith("other:"):
            problems.append(f"{c.name}: non-library exception {rec['stderr'][:200]}")
        elif reader in c.must_reject and not _rejected(reader, rec):
            problems.append(f"{c.name}: not rejected ({rec['outcome']}, exit {rec['exit']}, {rec['stderr'][:200]!r})")
        elif reader in (gen.INFO, gen.INSPECT, gen.VERIFY) and rec["exit"] == 1:
            problems.append(f"{c.name}: exit 1 (an internal bug) {rec['stderr'][:200]!r}")
        # a refusal within 2 s; a case the reader accepts (it never looks at the edited part) or a complete
        # verify run that ends in a parity mismatch may take as long as the legitimate bundle, with margin
        refused = _rejected(reader, rec) and not (reader == gen.VERIFY and rec["exit"] == 3)
        limit = CASE_LIMIT_S if refused else max(CASE_LIMIT_S, 3 * base["elapsed"])
        if rec["elapsed"] > limit:
            problems.append(f"{c.name}: took {rec['elapsed']:.2f} s (limit {limit:.1f} s)")
        if rec["rss_growth_kb"] * 1024 > 2 * legit.stat().st_size + 64 * 2**20:
            problems.append(f"{c.name}: peak memory grew by {rec['rss_growth_kb'] // 1024} MiB")
        if re.search(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{12,}\b", rec["stderr"]):
            problems.append(f"{c.name}: the message shows a hash: {rec['stderr'][:200]!r}")
    assert not recs["__canaries_read__"], f"{reader} read files outside the bundle: {recs['__canaries_read__']}"
    assert not problems, f"{reader}:\n" + "\n".join(problems)


def test_every_class_is_covered(cases):
    classes = {c.cls for c in cases}
    assert classes >= {"links", "external", "vds", "fifo", "bombs", "attributes", "dtypes", "params", "shadowing",
                       "onnx", "torchscript", "rehash", "checksum", "graphs", "metadata"}


def test_outcome_table(cases, results, capsys):
    """Not an assertion of its own: prints the per-class outcome table (pytest -s) for the closing note."""
    by_class: dict[str, list[gen.Case]] = {}
    for c in cases:
        by_class.setdefault(c.cls, []).append(c)
    lines = [f"{'class':12} {'cases':>5} " + " ".join(f"{r:>17}" for r in READERS)]
    for cls, cs in sorted(by_class.items()):
        cells = []
        for r in READERS:
            rej = sum(_rejected(r, results[r][c.name]) for c in cs if c.name in results[r])
            ok = sum(results[r][c.name]["outcome"] == "ok" and not _rejected(r, results[r][c.name])
                     for c in cs if c.name in results[r])
            cells.append(f"{rej:>3} rej {ok:>3} ok")
        lines.append(f"{cls:12} {len(cs):>5} " + " ".join(f"{x:>17}" for x in cells))
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert len(lines) == len(by_class) + 1


# the real entry points, in fresh processes: a representative case of the main classes, each CLI (every case
# already went through each CLI's main() in the capped children above)
CLI_CASES = ("external_link_params", "external_storage_probe", "virtual_dataset", "bundle_is_fifo",
             "gzip_bomb_graph", "params_scale_nan", "onnx_loop", "bitflip_unhashed", "global_heap_loop")
CLIS = {"runtime_info": ["-m", "ptycho_runtime.cli", "info"], "export_inspect": ["-m", "ptycho_export.cli", "inspect"]}


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_cli_entry_points_exit_2_with_one_line(cli, cases, tmp_path):
    by_name = {c.name: c for c in cases}
    env = {**os.environ, **PARSE_LIMIT, "CUDA_VISIBLE_DEVICES": ""}
    for name in CLI_CASES:
        c = by_name[name]
        proc = subprocess.run([sys.executable, *CLIS[cli], str(c.path)], capture_output=True, text=True,
                              timeout=60, preexec_fn=_cap, env=env, cwd=c.cwd or tmp_path)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        if cli in c.must_reject:
            assert proc.returncode in (2, 4) and len(lines) == 1, (name, proc.returncode, proc.stderr[-500:])
        else:
            assert proc.returncode in (0, 2, 4), (name, proc.returncode, proc.stderr[-500:])


def test_verify_entry_point_on_tampered_scale(cases):
    """A consistently re-hashed bundle with intensity_scale × 2 fails ``ptycho-export verify`` (exit 3)."""
    c = {c.name: c for c in cases}["rehash_scale_x2_everywhere"]
    proc = subprocess.run([sys.executable, "-m", "ptycho_export.cli", "verify", str(c.path), "--backend",
                           "onnxruntime-cpu"], capture_output=True, text=True, timeout=120, preexec_fn=_cap,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 3, proc.stderr[-500:]
    assert "parity mismatch" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
