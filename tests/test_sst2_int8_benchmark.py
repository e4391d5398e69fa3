"""The SST-2 int8 benchmark's ONNX export (dynamic batch and sequence) and dynamic int8 quantization of a BERT."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
pytest.importorskip("onnxruntime", reason="the onnx extra (onnxruntime) is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra (onnxscript) is not installed")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sst2_int8.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("sst2_int8", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch(size, length):
    generator = torch.Generator().manual_seed(size * 100 + length)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[0, length // 2 :] = 0  # one padded sentence
    return {
        "input_ids": torch.randint(0, 60, (size, length), generator=generator),
        "attention_mask": mask,
        "token_type_ids": torch.zeros(size, length, dtype=torch.long),
    }


def test_a_bert_exports_with_dynamic_axes_and_quantizes_to_int8(tmp_path):
    import onnx

    from alambic.compress.export import onnx_session

    bench = _benchmark()
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=2, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = bench.Logits(transformers.BertForSequenceClassification(config).eval()).eval()
    example = _batch(2, 8)
    fp32, int8 = tmp_path / "bert.onnx", tmp_path / "bert-int8.onnx"
    assert "torch.onnx.export" in bench.export(model, tuple(example[name] for name in bench.INPUTS), fp32)
    bench.quantize(fp32, int8)
    operators = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= operators  # the Linear layers run in int8
    for size, length in ((1, 5), (3, 11)):  # other batch sizes and lengths than the export example
        batch = _batch(size, length)
        expected = bench.torch_logits(model, [batch])
        got = bench.onnx_logits(onnx_session(fp32), [batch])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        quantized = bench.onnx_logits(onnx_session(int8), [batch])
        assert quantized.shape == expected.shape and (quantized - expected).abs().max() < 0.1
