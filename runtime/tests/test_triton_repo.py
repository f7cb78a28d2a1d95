"""``ptycho-runtime triton-repo``: the repository parses as Triton's own ModelConfig and matches the bundle.

The protobuf checks need ``tritonclient`` (the ``[triton]`` extra); the
check that the real ``tritonserver`` reads the repository needs PyTriton
(the ``[serve]`` extra), which ships that binary. Both skip where absent.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

import ptycho_runtime as pr
from ptycho_runtime import cli
from ptycho_runtime import format as fmt
from ptycho_runtime.format.checksum import file_sha256


def _parse(path: Path):
    text_format = pytest.importorskip("google.protobuf.text_format")
    mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    return text_format.Parse(path.read_text(), mc.ModelConfig()), mc


@pytest.mark.parametrize("name, options", [
    ("n64_g1", ["--instances", "cpu:1"]),
    ("n64_g2", ["--name", "pinn-g2.v1", "--max-batch-size", "32", "--instances", "gpu:2", "--tensorrt-fp16",
                "--max-queue-delay-us", "250"]),
])
def test_repository_parses_as_triton_model_config_and_matches_bundle(bundle_path, tmp_path, capsys, name, options):
    path = bundle_path(name)
    repo = tmp_path / "repo"
    assert cli.main(["triton-repo", str(path), str(repo), *options]) == 0, capsys.readouterr().err
    model = "pinn-g2.v1" if "--name" in options else "ptycho"
    batch = 32 if "--max-batch-size" in options else 64
    cfg, mc = _parse(repo / model / "config.pbtxt")
    b = pr.load_bundle(path)
    graph = b.contents.graph("onnx", "diffraction_to_obj").data
    assert sorted(p.name for p in repo.iterdir()) == [model]
    assert sorted(str(p.relative_to(repo / model)) for p in (repo / model).rglob("*")) == \
        ["1", "1/model.onnx", "config.pbtxt"]
    assert (repo / model / "1" / "model.onnx").read_bytes() == graph

    dims = [b.gridsize**2, b.N, b.N]
    assert cfg.name == model
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == batch
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.input] == [("diffraction", mc.TYPE_FP32, dims)]
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.output] == \
        [(n, mc.TYPE_FP32, dims) for n in fmt.OUTPUT_NAMES[b.output_mode]]
    assert cfg.HasField("dynamic_batching")
    assert list(cfg.dynamic_batching.preferred_batch_size) == [batch // 4, batch]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == (250 if name == "n64_g2" else 100)
    kind, count = (mc.ModelInstanceGroup.KIND_GPU, 2) if name == "n64_g2" else (mc.ModelInstanceGroup.KIND_CPU, 1)
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(kind, count)]
    accelerators = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    if "--tensorrt-fp16" in options:
        assert [a.name for a in accelerators] == ["tensorrt"]
        assert accelerators[0].parameters["precision_mode"] == "FP16"
    else:
        assert not cfg.HasField("optimization")
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params == {
        "ptycho.sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "ptycho.graph_sha256": hashlib.sha256(graph).hexdigest(),
        "ptycho.N": str(b.N),
        "ptycho.gridsize": str(b.gridsize),
        "ptycho.intensity_scale": repr(b.intensity_scale),
        "ptycho.output_mode": b.output_mode,
        "ptycho.runtime_version": pr.__version__,
    }
    assert float(params["ptycho.intensity_scale"]) == b.intensity_scale  # exact round trip


def test_rewrite_keeps_other_models_and_leaves_no_temp_files(bundle_path, tmp_path):
    repo = tmp_path / "repo"
    (repo / "other" / "1").mkdir(parents=True)
    (repo / "other" / "config.pbtxt").write_text('name: "other"\n')
    for _ in range(2):
        assert cli.main(["triton-repo", str(bundle_path("n64_g1")), str(repo), "--instances", "cpu"]) == 0
    assert sorted(p.name for p in repo.iterdir()) == ["other", "ptycho"]
    assert sorted(p.name for p in (repo / "ptycho").iterdir()) == ["1", "config.pbtxt"]
    assert sorted(p.name for p in (repo / "ptycho" / "1").iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("options, message", [
    (["--instances", "cpu:1", "--tensorrt-fp16"], "TensorRT accelerator runs on NVIDIA GPUs only"),
    (["--instances", "tpu:2"], "instances must be KIND"),
    (["--instances", "gpu:0"], "instances must be KIND"),
    (["--max-batch-size", "0"], "max batch size must be an integer in 1..4096"),
    (["--name", "../escape"], "model name '../escape' is not usable"),
    (["--max-queue-delay-us", "-1"], "max queue delay"),
])
def test_bad_options_exit_2_and_write_nothing(bundle_path, tmp_path, capsys, options, message):
    repo = tmp_path / "repo"
    assert cli.main(["triton-repo", str(bundle_path("n64_g1")), str(repo), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ptycho-runtime: error: ") and message in err
    assert not repo.exists() or not any(repo.rglob("*"))


def test_damaged_bundle_exits_4_and_writes_nothing(bundle_path, tmp_path, capsys):
    path = bundle_path("n64_g1")
    data = bytearray(path.read_bytes())
    graph = pr.load_bundle(path).contents.graph("onnx", "diffraction_to_obj").data
    at = bytes(data).find(graph[1000:1064])  # flip one byte inside the stored ONNX graph
    assert at > 0
    data[at + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    repo = tmp_path / "repo"
    assert cli.main(["triton-repo", str(path), str(repo)]) == 4
    assert "checksum" in capsys.readouterr().err.lower()
    assert not repo.exists()


def test_real_tritonserver_reads_the_repository(bundle_path, tmp_path):
    """PyTriton's tritonserver parses config.pbtxt and finds the model; only the ONNX Runtime backend is missing.

    PyTriton ships Triton with the Python backend alone, so the model cannot
    *run* here; but a config Triton cannot parse fails earlier ("failed to read
    text proto"), and a bad layout finds no model at all.
    """
    pytriton = pytest.importorskip("pytriton")
    server = Path(pytriton.__file__).parent / "tritonserver"
    if not (server / "bin" / "tritonserver").exists():
        pytest.skip("this PyTriton has no bundled tritonserver")
    repo = tmp_path / "repo"
    assert cli.main(["triton-repo", str(bundle_path("n64_g2")), str(repo), "--instances", "cpu:2"]) == 0
    env = dict(os.environ, LD_LIBRARY_PATH=f"{server / 'external_libs'}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    proc = subprocess.run([str(server / "bin" / "tritonserver"), f"--model-repository={repo}",
                           f"--backend-directory={server / 'backends'}", "--allow-http=false", "--allow-grpc=false",
                           "--allow-metrics=false", "--exit-on-error=true", "--exit-timeout-secs=1"],
                          capture_output=True, text=True, timeout=120, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "failed to read text proto" not in log and "Error parsing text-format" not in log, log[-3000:]
    assert "loading: ptycho:1" in log, log[-3000:]
    assert "unable to find backend library for backend 'onnxruntime'" in log, log[-3000:]


def test_sha256_parameter_is_the_file_hash(bundle_path):
    path = bundle_path("n64_g1")
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
