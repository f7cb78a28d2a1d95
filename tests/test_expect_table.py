"""The README's "What to expect" table is made from evaluate's JSON, and written only between its markers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ptycho_export import expect_table as et

README = Path(__file__).resolve().parents[1] / "README.md"


def _entry(phase: float, amp: float, rmse: float, wall: float, **extra) -> dict:
    return {"metrics": {"phase_ssim": phase, "amplitude_ssim": amp, "phase_rmse_rad": rmse}, "wall_time_s": wall,
            **extra}


def _shipped() -> dict:
    return {"network": _entry(0.2974, 0.233, 0.347, 3.3),
            "refined": _entry(0.9801, 0.948, 0.026, 1.78, sweeps=16),
            "refine_control": _entry(0.979, 0.948, 0.026, 0.80),
            "reference": _entry(0.687, 0.809, 0.114, 55.6, engine="pty-chi 2.2.0 ePIE", iterations=100,
                                probe="known (the scan's probeGuess), fixed"),
            "refined_speedup": 31.26, "network_start_gain": {"phase_ssim": 0.0003, "amplitude_ssim": -0.0002},
            "network_start_verdict": "a tie"}


def test_the_table_holds_each_method_from_the_json_with_the_readmes_header():
    brief = {"network": _entry(0.05, 0.183, 0.5, 3.3), "refined": _entry(0.979, 0.948, 0.026, 2.8, sweeps=16)}
    table = et.expect_table(_shipped(), brief)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == et.HEADER.splitlines()[0]
    assert len(rows) == 7  # header + network, refined, control, reference, brief alone, brief refined
    assert "| shipped network alone | 0.297 | 0.233 | 0.347 | 3.3 s |" in rows
    assert any(r.startswith("| shipped network + 16 refinement sweeps") and "**0.980**" in r for r in rows)
    assert any(r.startswith("| pty-chi 2.2.0 ePIE, 100 iterations, flat object, probe known | 0.687") for r in rows)
    assert "31.3× faster than the pty-chi 2.2.0 ePIE row" in table and "phase SSIM +0.000" in table
    assert "(a tie)" in table


def test_without_a_control_the_table_is_refused_with_the_command_that_makes_one():
    shipped = _shipped()
    del shipped["refine_control"]
    with pytest.raises(ValueError, match="--refine"):
        et.expect_table(shipped)


def test_the_readme_has_one_block_whose_header_is_the_generators():
    text = README.read_text(encoding="utf-8")
    assert text.count(et.START) == 1 and text.count(et.END) == 1
    block = text.split(et.START, 1)[1].split(et.END, 1)[0]
    assert et.HEADER in block


def test_only_the_block_is_replaced_and_the_file_is_written_whole(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "evaluation.json").write_text(json.dumps(_shipped()))
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{et.START}\nold table\n{et.END}\nafter\n")
    readme.chmod(0o644)
    assert et.main([str(out), "--readme", str(readme)]) == 0
    assert readme.stat().st_mode & 0o777 == 0o644  # the temporary file's private mode is not kept
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old table" not in text
    assert "| shipped network alone | 0.297 |" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "demo"]  # no temporary file left


def test_a_readme_without_markers_or_a_missing_folder_is_an_error_not_a_rewrite(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "evaluation.json").write_text(json.dumps(_shipped()))
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    assert et.main([str(out), "--readme", str(readme)]) == 2
    assert readme.read_text() == "no markers here\n"
    assert et.main([str(tmp_path / "absent")]) == 2
    assert "run scripts/demo.sh" in capsys.readouterr().err
