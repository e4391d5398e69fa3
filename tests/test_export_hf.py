"""`alambic export` and `alambic compress` on a run whose student is a Hugging Face model on tokenized text:
a tiny BERT teacher and a word-level tokenizer written by the test, SST-2-style TSVs, a derived student."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
for _module in ("onnx", "onnxruntime", "onnxscript"):
    pytest.importorskip(
        _module, reason=f"the onnx extra ({_module}) is not installed: pip install 'alambic[onnx]'"
    )

from test_transformers import _tiny_sst2  # noqa: E402

from alambic.cli import app  # noqa: E402
from alambic.compress.export import onnx_session, run_onnx  # noqa: E402
from alambic.core.batches import real_inputs  # noqa: E402
from alambic.run.artifacts import export_run, load_run_model  # noqa: E402
from alambic.run.compress import compress_run  # noqa: E402

runner = CliRunner()
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A run: 4-layer BERT teacher fine-tuned, a 2-layer student derived from it and distilled with a
    hidden-state term through a linear connector (which must never reach an export)."""
    from alambic.config import config_from_dict
    from alambic.run.pipeline import run

    tmp = tmp_path_factory.mktemp("sst2")
    folder, data = _tiny_sst2(tmp)
    train = {"epochs": 2, "batch_size": 16, "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0}
    config = config_from_dict({
        "name": "sst2", "output_dir": str(tmp / "runs"), "stages": ["teacher", "distill"],
        "data": {"dataset": "sst2", "data_dir": str(data), "max_length": 16},
        "teacher": {"model": {"arch": f"hf:{folder}", "kwargs": {"local_files_only": True}}, "train": {**train, "epochs": 4}},
        "student": {"model": {"arch": "derive:teacher", "kwargs": {"layers": 2}}},
        "distill": {"train": train, "terms": [
            {"loss": "kd", "weight": 1.0, "params": {"temperature": 2.0}},
            {"loss": "hidden_mse", "student": "hidden_states.2", "teacher": "hidden_states.4", "connector": "linear"},
        ]},
        "evaluate": {"latency_repeats": 1, "batch_sizes": [1]},
    })  # fmt: skip
    return run(config)


def _cut(inputs, size, length):
    return {key: value[:size, :length] for key, value in inputs.items()}


def test_onnx_export_of_a_text_student_has_dynamic_batch_and_sequence(text_run, tmp_path):
    import onnx

    report = export_run(text_run, tmp_path / "student.onnx", export_format="onnx")
    assert report["max_abs_diff"] < 1e-4 and report["inputs"] == INPUTS
    session = onnx_session(tmp_path / "student.onnx")
    assert [i.name for i in session.get_inputs()] == INPUTS
    assert all(isinstance(i.shape[0], str) and isinstance(i.shape[1], str) for i in session.get_inputs())
    loaded = load_run_model(text_run)
    inputs = real_inputs(loaded.test_set, 32)
    length = inputs["input_ids"].shape[1]
    for size, cut in ((1, 4), (7, length), (32, length - 1)):  # other batch sizes and lengths
        batch = _cut(inputs, size, cut)
        expected = loaded.model(**batch).logits.detach()
        torch.testing.assert_close(run_onnx(session, batch), expected, atol=1e-4, rtol=1e-4)
    # only the 2-layer student: no teacher layer, no connector
    names = [t.name for t in onnx.load(str(tmp_path / "student.onnx")).graph.initializer]
    assert any("layer.1." in name for name in names)
    assert not any("layer.2." in name or "connector" in name for name in names)
    assert report["parameters"] == sum(p.numel() for p in loaded.model.parameters())
    assert loaded.model.config.num_hidden_layers == 2


def test_torch_export_program_of_a_text_student_takes_the_token_tensors(text_run):
    report = export_run(text_run, export_format="torch-export")
    assert report["path"].endswith("student.pt2") and report["max_abs_diff"] < 1e-5
    program = torch.export.load(report["path"]).module()
    loaded = load_run_model(text_run)
    batch = _cut(real_inputs(loaded.test_set, 5), 5, 4)  # a shorter sequence than the export's example
    with torch.no_grad():
        torch.testing.assert_close(program(*(batch[k] for k in INPUTS)), loaded.model(**batch).logits)


def test_safetensors_export_of_a_text_student_is_a_transformers_folder(text_run):
    report = export_run(text_run, export_format="safetensors")
    folder = text_run / "export" / "student-hf"
    assert report["path"] == str(folder) and report["max_abs_diff"] < 1e-5
    weights = load_file(str(folder / "model.safetensors"))
    assert not any("connector" in key or "layer.2." in key for key in weights)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    sentences = ["the film was good", "the plot was awful acting"]
    tokens = tokenizer(sentences, padding=True, return_tensors="pt")
    from alambic.config import load_config
    from alambic.run.building import run_tokenizer

    run_tokens = transformers.AutoTokenizer.from_pretrained(
        run_tokenizer(load_config(text_run / "config.yaml"))
    )(sentences, padding=True, return_tensors="pt")
    assert tokens["input_ids"].tolist() == run_tokens["input_ids"].tolist()  # the run's own tokenizer
    loaded = load_run_model(text_run)
    with torch.no_grad():
        torch.testing.assert_close(model(**tokens).logits, loaded.model(**tokens).logits)
    assert json.loads((folder / "alambic.json").read_text())["arch"] == "derive:teacher"
    again = export_run(text_run, export_format="safetensors")  # replaces the earlier export
    assert again["path"] == str(folder) and not list(folder.parent.glob(".*partial*"))


def test_cli_exports_a_text_run(text_run, tmp_path):
    result = runner.invoke(
        app, ["export", str(text_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    )
    assert result.exit_code == 0, result.output
    assert "max |difference|" in result.output and (tmp_path / "m.onnx").is_file()


def test_compress_a_text_run_qat_then_dynamic_int8_and_exports(text_run, tmp_path):
    import onnx

    out = tmp_path / "compress"
    summary = compress_run(
        text_run,
        overrides=[
            "compress.stages=[quantize, export]",
            "compress.quantize.method=dynamic",
            "compress.quantize.qat=true",
            "compress.quantize.qat_train.epochs=1",
            "evaluate.latency_repeats=1",
            "evaluate.batch_sizes=[1, 4]",
        ],
        out=out,
    )
    rows = summary["models"]
    assert list(rows) == ["teacher", "distilled", "qat", "int8"]
    assert rows["int8"]["quantized_from"] == "qat" and rows["int8"]["num_samples"] == 32
    assert set(rows["int8"]["onnxruntime_latency_ms"]) == {"1", "4"}
    operators = {node.op_type for node in onnx.load(str(out / "onnx" / "int8.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= operators
    assert rows["int8"]["accuracy"] >= rows["qat"]["accuracy"] - 0.1
    exports = {export["format"]: export for export in summary["exports"]}
    assert set(exports) == {"onnx", "torch-export", "safetensors"}
    assert all(export["model"] == "qat" and export["max_abs_diff"] < 1e-4 for export in exports.values())
    assert exports["safetensors"]["path"] == str(out / "export" / "model-hf")
    exported = load_file(str(out / "export" / "model-hf" / "model.safetensors"))
    qat = load_file(str(out / "weights" / "qat.safetensors"))
    assert all(torch.equal(exported[key], qat[key]) for key in exported)
    assert (out / "export" / "model-int8.onnx").is_file()


def test_compress_a_text_run_prunes_attention_heads_recovers_and_exports(text_run, tmp_path):
    from alambic.models.hf import load_hf_model
    from alambic.models.surgery import attention_layers

    out = tmp_path / "compress"
    summary = compress_run(
        text_run,
        overrides=[
            "compress.stages=[prune, recover, quantize, export]",
            "compress.prune.method=heads",
            "compress.prune.amount=0.5",
            "compress.quantize.method=dynamic",
            "evaluate.latency_repeats=1",
            "evaluate.batch_sizes=[1]",
        ],
        out=out,
    )
    rows = summary["models"]
    assert list(rows) == ["teacher", "distilled", "pruned", "recovered", "int8"]
    assert rows["pruned"]["parameters"] < rows["distilled"]["parameters"]
    exports = {export["format"]: export for export in summary["exports"]}
    assert all(
        export["model"] == "recovered" and export["max_abs_diff"] < 1e-4 for export in exports.values()
    )
    reloaded = load_hf_model(str(out / "export" / "model-hf"), task="sequence-classification")
    # the derived student has 2 layers of 2 heads; half of them go, one per layer at least
    assert [layer.heads for layer in attention_layers(reloaded)] == [1, 1]


def test_compress_a_text_run_refuses_static_int8_in_one_line(text_run):
    result = runner.invoke(app, ["compress", str(text_run)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "compress.quantize.method=dynamic" in message and "Traceback" not in result.output
    result = runner.invoke(app, ["compress", str(text_run), "--set", "compress.quantize.method=dynamic"])
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "compress.prune.method=heads" in message
    assert "compress.stages=[quantize,export]" in message  # printed as written, not read as markup


def test_a_model_without_token_type_ids_exports_only_the_inputs_it_takes(tmp_path):
    from alambic.compress.export import export_model

    config = transformers.DistilBertConfig(
        vocab_size=40, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=32, num_labels=2
    )
    torch.manual_seed(0)
    model = transformers.DistilBertForSequenceClassification(config).eval()
    mask = torch.ones(6, 9, dtype=torch.long)
    mask[1, 5:] = 0
    inputs = {  # what a BERT tokenizer yields; DistilBERT's forward has no token_type_ids
        "input_ids": torch.randint(0, 40, (6, 9), generator=torch.Generator().manual_seed(0)),
        "token_type_ids": torch.zeros(6, 9, dtype=torch.long),
        "attention_mask": mask,
    }
    for export_format in ("onnx", "torch-export"):
        path = tmp_path / f"distilbert.{export_format}"
        report = export_model(model, inputs, path, export_format=export_format)
        assert report["inputs"] == ["input_ids", "attention_mask"] and report["max_abs_diff"] < 1e-4
    session = onnx_session(tmp_path / "distilbert.onnx")
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    report = export_model(model, inputs, tmp_path / "folder", export_format="safetensors")
    assert report["max_abs_diff"] < 1e-5 and (tmp_path / "folder" / "config.json").is_file()
