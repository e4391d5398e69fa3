"""Export (ONNX, torch.export, safetensors), onnxruntime int8 quantization and `alambic compress` on digits."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tolerance import close
from typer.testing import CliRunner

import alambic.console
from alambic.cli import app
from alambic.config import load_config
from alambic.errors import AlambicError, ConfigError
from alambic.run.pipeline import run

for _module in ("onnx", "onnxruntime", "onnxscript"):
    pytest.importorskip(
        _module, reason=f"the onnx extra ({_module}) is not installed: pip install 'alambic[onnx]'"
    )

from alambic.compress.export import export_model, onnx_session, run_onnx  # noqa: E402
from alambic.compress.quantize import evaluate_onnx, quantize_onnx_dynamic, quantize_onnx_static  # noqa: E402
from alambic.core.batches import real_inputs  # noqa: E402
from alambic.run.artifacts import export_run, load_run_model  # noqa: E402
from alambic.run.compress import compress_run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A digits run whose distillation has a FitNets term with a connector (which must never be exported)."""
    out = tmp_path_factory.mktemp("runs") / "digits"
    config = load_config(
        os.path.join(ROOT, "recipes", "digits.yaml"),
        [
            "teacher.train.epochs=8",
            "distill.train.epochs=8",
            "student.model.kwargs.hidden=[128, 64]",
            "stages=[teacher, baseline, distill]",
            "distill.terms=[{loss: ce, weight: 0.1}, {loss: kd, weight: 0.9, params: {temperature: 4.0}},"
            " {loss: fitnet, weight: 0.1, student: hidden.1, teacher: hidden.0, connector: linear}]",
        ],
    )
    return run(config, run_dir=out)


def test_onnx_export_matches_pytorch_with_a_dynamic_batch(run_dir, tmp_path):
    report = export_run(run_dir, tmp_path / "student.onnx", export_format="onnx")
    # ONNX Runtime's kernels sum in another order than torch's: 3.8e-6 here on logits of size 12.6 (3 float32
    # units); 1e-4 is 66 units of that size
    assert report["max_abs_diff"] < 1e-4 and report["checked_samples"] == 64
    assert report["size_bytes"] == os.path.getsize(tmp_path / "student.onnx")
    loaded = load_run_model(run_dir)
    session = onnx_session(tmp_path / "student.onnx")
    assert isinstance(session.get_inputs()[0].shape[0], str)  # symbolic batch dimension
    inputs = real_inputs(loaded.test_set, 100)
    for batch in (1, 7, 100):
        expected = loaded.model(inputs[:batch]).detach()
        torch.testing.assert_close(run_onnx(session, inputs[:batch]), expected, **close(expected))


def test_only_the_student_reaches_the_exports(run_dir, tmp_path):
    import onnx

    student_parameters = load_run_model(run_dir).model
    expected = sum(p.numel() for p in student_parameters.parameters())
    export_run(run_dir, tmp_path / "student.onnx")
    graph = onnx.load(str(tmp_path / "student.onnx")).graph
    assert sum(int(torch.tensor(list(t.dims)).prod()) for t in graph.initializer) == expected
    assert not any("connector" in t.name or "teacher" in t.name for t in graph.initializer)
    # a training checkpoint holds the connectors too; exporting it keeps only the student
    checkpoints = sorted((run_dir / "student" / "checkpoints").glob("ckpt-*"))
    assert checkpoints
    stored = load_file(str(checkpoints[-1] / "model.safetensors"))
    assert any(key.startswith("connectors.") for key in stored)
    report = export_run(
        checkpoints[-1] / "model.safetensors",
        tmp_path / "from-checkpoint.safetensors",
        export_format="safetensors",
        arch="mlp",
        dataset="digits",
        kwargs={"hidden": [128, 64]},
    )
    assert report["parameters"] == expected
    assert not any("connector" in key for key in load_file(report["path"]))


@pytest.mark.parametrize("export_format", ["torch-export", "safetensors"])
def test_other_exports_round_trip(run_dir, tmp_path, export_format):
    report = export_run(run_dir, export_format=export_format)
    assert report["max_abs_diff"] < 1e-5 and os.path.getsize(report["path"]) == report["size_bytes"]
    if export_format == "safetensors":
        description = json.loads(safe_open(report["path"], "pt").metadata()["alambic"])
        assert description["arch"] == "mlp" and description["kwargs"] == {"hidden": [128, 64]}


def test_export_detects_a_wrong_export(run_dir, tmp_path, monkeypatch):
    import alambic.compress.export as export

    loaded = load_run_model(run_dir)
    inputs = real_inputs(loaded.test_set, 16)
    real = export.run_onnx
    monkeypatch.setattr(export, "run_onnx", lambda session, x: real(session, x) + 0.5)
    assert export_model(loaded.model, inputs, tmp_path / "m.onnx")["max_abs_diff"] == pytest.approx(
        0.5, abs=1e-4
    )
    # an export whose check fails leaves no file behind
    monkeypatch.setattr(export, "run_onnx", lambda session, x: real(session, x) * float("nan"))
    with pytest.raises(AlambicError, match="non-finite"):
        export_model(loaded.model, inputs, tmp_path / "bad" / "m.onnx")
    assert list((tmp_path / "bad").iterdir()) == []


def test_int8_models_stay_close_to_float_and_are_smaller(run_dir, tmp_path):
    loaded = load_run_model(run_dir)
    inputs = real_inputs(loaded.test_set, 64)
    export_model(loaded.model, inputs, tmp_path / "fp32.onnx")
    calibration = real_inputs(loaded.train_set, 256)
    quantize_onnx_static(tmp_path / "fp32.onnx", tmp_path / "static.onnx", calibration)
    quantize_onnx_dynamic(tmp_path / "fp32.onnx", tmp_path / "dynamic.onnx")
    fp32 = evaluate_onnx(tmp_path / "fp32.onnx", loaded.test_set, num_classes=10)
    reference = run_onnx(onnx_session(tmp_path / "fp32.onnx"), inputs).argmax(-1)
    for name in ("static", "dynamic"):
        path = tmp_path / f"{name}.onnx"
        assert os.path.getsize(path) < 0.4 * os.path.getsize(tmp_path / "fp32.onnx")  # int8 weights
        metrics = evaluate_onnx(path, loaded.test_set, num_classes=10)
        # int8 kernels differ by CPU (VNNI or not): 0.942 float and 0.933 dynamic int8 here (360 samples);
        # 0.03 (11 samples) leaves room for another CPU's rounding, a broken quantization loses far more
        assert metrics["accuracy"] > fp32["accuracy"] - 0.03, name
        agreement = (run_onnx(onnx_session(path), inputs).argmax(-1) == reference).float().mean()
        assert agreement > 0.9, name


def test_compress_runs_the_chain_and_measures_every_stage(run_dir, monkeypatch):
    monkeypatch.setattr(alambic.console.console, "width", 240)  # the whole tables, not cut at 80 columns
    result = runner.invoke(
        app,
        [
            "compress",
            str(run_dir),
            "--set",
            "evaluate.latency_repeats=2",
            "--set",
            "compress.eval_subset=200",
            "--set",
            "compress.quantize.qat=true",
            "--set",
            "compress.quantize.calibration_samples=128",
            "--set",
            "evaluate.batch_sizes=[1, 16]",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    # the console shows the run's batch sizes, and every exported file's parity to its model
    assert "ORT ms@16" in result.output and "ms@64" not in result.output
    assert "model-int8.onnx" in result.output and "agree %" in result.output
    folder = run_dir / "compress"
    summary = json.loads((folder / "summary.json").read_text())
    rows = summary["models"]
    assert list(rows) == ["teacher", "baseline", "distilled", "pruned", "recovered", "qat", "int8"]
    assert summary["evaluated_samples"] == 200 and rows["int8"]["num_samples"] == 200
    assert rows["pruned"]["parameters"] < 0.6 * rows["distilled"]["parameters"]
    # both 0.945 on 200 samples here: recovery must not lose accuracy beyond a few samples that another
    # CPU's rounding during training can flip (a broken recovery loses tens of points)
    assert rows["recovered"]["accuracy"] >= rows["pruned"]["accuracy"] - 0.02
    assert rows["int8"]["size_bytes"] == os.path.getsize(folder / "onnx" / "int8.onnx")
    assert rows["distilled"]["size_bytes"] == os.path.getsize(folder / "weights" / "distilled.safetensors")
    for row in rows.values():
        assert set(row["onnxruntime_latency_ms"]) == {"1", "16"} and row["flops"] > 0
    assert {export["format"] for export in summary["exports"]} == {"onnx", "torch-export", "safetensors"}
    assert all(export["max_abs_diff"] < 1e-4 for export in summary["exports"])
    assert all(export["prediction_agreement"] == 1.0 for export in summary["exports"])
    assert 0.5 < summary["int8_export"]["prediction_agreement_to_float"] <= 1.0
    assert (folder / "export" / "model-int8.onnx").is_file() and (folder / "plots" / "compress.png").is_file()
    assert "| int8 |" in (folder / "report.md").read_text()


def test_compress_of_a_relative_run_dir(run_dir, tmp_path, monkeypatch):
    # `alambic compress runs/NAME` as the README writes it: the int8 stage changes the working folder
    shutil.copytree(
        run_dir, tmp_path / "runs" / "copy", ignore=shutil.ignore_patterns("checkpoints", "compress")
    )
    monkeypatch.chdir(tmp_path)
    overrides = [
        "compress.stages=[quantize]",
        "compress.quantize.method=dynamic",
        "compress.eval_subset=50",
        "evaluate.latency_repeats=1",
        "evaluate.batch_sizes=[1]",
    ]
    arguments = [item for override in overrides for item in ("--set", override)]
    result = runner.invoke(app, ["compress", "runs/copy", *arguments], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "copy" / "compress" / "onnx" / "int8.onnx").is_file()


def test_qat_compress_exports_the_qat_trained_weights(run_dir, tmp_path):
    out = tmp_path / "compress"
    summary = compress_run(
        run_dir,
        overrides=[
            "compress.stages=[quantize, export]",
            "compress.quantize.qat=true",
            "compress.quantize.method=dynamic",
            "compress.export_formats=[safetensors, onnx]",
            "compress.eval_subset=100",
            "evaluate.latency_repeats=1",
            "evaluate.batch_sizes=[1]",
        ],
        out=out,
    )
    exported = load_file(str(out / "export" / "model.safetensors"))
    qat = load_file(str(out / "weights" / "qat.safetensors"))  # the QAT-trained model, fake-quant stripped
    distilled = load_file(str(out / "weights" / "distilled.safetensors"))  # the pre-QAT student
    assert set(exported) == set(qat) == set(distilled)
    assert all(torch.equal(exported[key], qat[key]) for key in exported)
    assert not all(torch.equal(exported[key], distilled[key]) for key in exported)
    # the float ONNX next to the int8 model is the QAT-trained model too
    loaded = load_run_model(run_dir)
    loaded.model.load_state_dict(qat)
    inputs = real_inputs(loaded.test_set, 16)
    onnx_logits = run_onnx(onnx_session(out / "export" / "model.onnx"), inputs)
    torch.testing.assert_close(onnx_logits, loaded.model(inputs).detach(), atol=1e-4, rtol=1e-4)
    assert [export["model"] for export in summary["exports"]] == ["qat", "qat"]
    assert summary["int8_export"]["quantized_from"] == "qat"
    report = (out / "report.md").read_text()
    assert "| safetensors | qat |" in report and "| onnx int8 | int8 |" in report
    assert "the float ONNX file of qat" in report


def test_export_and_compress_errors_are_one_line(run_dir, tmp_path):
    for args, message in [
        (["export", str(run_dir), "--format", "tflite"], "--format must be one of"),
        (["export", str(run_dir / "student" / "model.safetensors")], "give --arch and --dataset"),
        (["export", str(tmp_path / "missing")], "does not exist"),
        (["compress", str(tmp_path)], "not an alambic run directory"),
    ]:
        result = runner.invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    with pytest.raises(ConfigError, match="add 'prune'"):
        load_config(os.path.join(ROOT, "recipes", "digits.yaml"), ["compress.stages=[recover]"])


def test_compress_runs_a_config_first(tmp_path):
    summary = compress_run(
        os.path.join(ROOT, "recipes", "digits.yaml"),
        overrides=[
            "teacher.train.epochs=2",
            "distill.train.epochs=2",
            "evaluate.latency_repeats=1",
            "compress.stages=[quantize]",
            "compress.quantize.method=dynamic",
        ],
        run_dir=tmp_path / "run",
    )
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "summary.json").exists()  # the run's own evaluate / report are skipped
    assert list(summary["models"]) == ["teacher", "baseline", "distilled", "int8"]
    assert summary["models"]["int8"]["method"] == "dynamic" and summary["exports"] == []


def _shared_data() -> Path:
    if os.environ.get("ALAMBIC_SHARED_DATA"):
        return Path(os.environ["ALAMBIC_SHARED_DATA"])
    return Path(ROOT).parent / "shared" / "data"


WEIGHTS = _shared_data() / "weights" / "cifar10-resnet-akamaster" / "resnet20-12fca82f.th"
CIFAR = _shared_data() / "cifar10-jpeg"


@pytest.mark.slow
@pytest.mark.skipif(
    not (WEIGHTS.is_file() and CIFAR.is_dir()),
    reason=f"{WEIGHTS} or {CIFAR} is absent (set ALAMBIC_SHARED_DATA)",
)
def test_pretrained_cifar_resnet_stays_accurate_in_static_int8(tmp_path):
    from alambic.compress.prune import channel_prune
    from alambic.data import build_datasets
    from alambic.models import build_model, load_weights

    train_set, test_set, _ = build_datasets("cifar10-jpeg", data_dir=str(CIFAR))
    model = build_model("resnet20", num_classes=10, input_shape=(3, 32, 32))
    load_weights(model, WEIGHTS)
    subset = torch.utils.data.Subset(test_set, torch.linspace(0, len(test_set) - 1, 500).long().tolist())
    report = export_model(model, real_inputs(test_set, 32), tmp_path / "fp32.onnx")
    assert report["max_abs_diff"] < 1e-3
    quantize_onnx_static(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", real_inputs(train_set, 128))
    fp32 = evaluate_onnx(tmp_path / "fp32.onnx", subset, num_classes=10)["accuracy"]
    int8 = evaluate_onnx(tmp_path / "int8.onnx", subset, num_classes=10)["accuracy"]
    assert fp32 > 0.75 and int8 > fp32 - 0.02
    assert os.path.getsize(tmp_path / "int8.onnx") < 0.4 * os.path.getsize(tmp_path / "fp32.onnx")
    # a channel-pruned ResNet exports and runs in onnxruntime too
    small = channel_prune(model, 0.25).eval()
    assert export_model(small, real_inputs(test_set, 16), tmp_path / "small.onnx")["max_abs_diff"] < 1e-3


def test_compress_from_a_config_refuses_head_pruning_of_a_one_tensor_model_before_training(tmp_path):
    from alambic.errors import ConfigError

    with pytest.raises(ConfigError, match="head pruning is for Transformer students"):
        compress_run(
            os.path.join(ROOT, "recipes", "digits.yaml"),
            overrides=["compress.prune.method=heads", f"output_dir={tmp_path}"],
            run_dir=tmp_path / "run",
        )
    assert not (tmp_path / "run").exists()  # refused before the run trained anything


def test_prediction_agreement_counts_matching_argmax_over_batches_and_tokens():
    from alambic.compress.parity import prediction_agreement

    reference = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])  # predicts 0, 1, 0
    assert prediction_agreement([reference, reference[:1]], [reference + 0.1, reference[:1]]) == 1.0
    flipped = torch.tensor([[2.0, 1.0], [3.0, 0.0], [0.0, 1.0]])  # 0, 0, 1: one of three agrees
    assert prediction_agreement([reference, reference[:1]], [flipped, flipped[:1]]) == 2 / 4
    tokens = torch.zeros(2, 3, 5)
    tokens[..., 1] = 1.0  # every token predicts 1
    other = tokens.clone()
    other[0, 0, 4] = 2.0
    assert prediction_agreement([tokens], [other]) == 5 / 6
