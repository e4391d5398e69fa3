"""``hf:`` GGUF files: a tiny llama GGUF written in the test by the ``gguf`` package (2 layers, hidden 32, a
byte-level BPE vocabulary with merges and a chat template, F32 tensors) loads as the Llama it was written
from, with its tokenizer; derive and export work from it; a file transformers cannot read is one line."""

import copy
import json
import random

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
gguf = pytest.importorskip("gguf", reason="the gguf package (in the hf extra) is not installed")

from typer.testing import CliRunner  # noqa: E402

from alambic.cli import app  # noqa: E402
from alambic.config import config_from_dict  # noqa: E402
from alambic.data.tokenizers import HFTokenizer, load_tokenizer  # noqa: E402
from alambic.errors import ConfigError  # noqa: E402
from alambic.models.hf import load_hf_model  # noqa: E402

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MERGES = ["h e", "t he", "Ġ the", "e r", "i n", "a n", "o n", "Ġ o"]  # each result is in the vocabulary
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DIMS = {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "ffn": 48}


def _permute(weight, heads):
    """llama.cpp's storage order of q / k rows (convert_hf_to_gguf.py); transformers undoes it on load."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, weight.shape[1])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(path, seed=0):
    """A tiny llama GGUF at ``path``; returns the weights as a LlamaForCausalLM state dict and its config."""
    import transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    tokens = SPECIALS + [spelling[byte] for byte in range(256)] + [merge.replace(" ", "") for merge in MERGES]
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS))
    layers, hidden, heads, kv_heads, ffn = DIMS.values()
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    state = {"model.embed_tokens.weight": weight(len(tokens), hidden)}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for layer in range(layers):
        named = {
            "attn_norm": ("input_layernorm", 1 + weight(hidden)),
            "ffn_norm": ("post_attention_layernorm", 1 + weight(hidden)),
            "attn_q": ("self_attn.q_proj", weight(heads * head_dim, hidden)),
            "attn_k": ("self_attn.k_proj", weight(kv_heads * head_dim, hidden)),
            "attn_v": ("self_attn.v_proj", weight(kv_heads * head_dim, hidden)),
            "attn_output": ("self_attn.o_proj", weight(hidden, heads * head_dim)),
            "ffn_gate": ("mlp.gate_proj", weight(ffn, hidden)),
            "ffn_up": ("mlp.up_proj", weight(ffn, hidden)),
            "ffn_down": ("mlp.down_proj", weight(hidden, ffn)),
        }
        for name, (hf_name, value) in named.items():
            stored = {"attn_q": lambda w: _permute(w, heads), "attn_k": lambda w: _permute(w, kv_heads)}.get(
                name, lambda w: w
            )(value)
            writer.add_tensor(f"blk.{layer}.{name}.weight", np.ascontiguousarray(stored))
            state[f"model.layers.{layer}.{hf_name}.weight"] = value
    state["model.norm.weight"] = 1 + weight(hidden)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])  # no output.weight: tied head
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = transformers.LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    return {key: torch.from_numpy(value) for key, value in state.items()}, config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(path of the GGUF file, a LlamaForCausalLM with the same weights built directly)``."""
    import transformers

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    state, config = write_tiny_gguf(path)
    reference = transformers.LlamaForCausalLM(config).eval()
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embeddings
    reference.tie_weights()
    return path, reference


def _ids():
    return torch.tensor([[261, 266, 260, 117, 35, 263, 113], [40, 41, 42, 43, 264, 265, 3]])


def _assert_plain(model):
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)


def test_a_gguf_file_loads_as_the_llama_it_was_written_from(tiny):
    path, reference = tiny
    model = load_hf_model(str(path), task="causal-lm").eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    _assert_plain(model)  # the weights are dense: nothing quantized is carried on
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    with torch.no_grad():
        # q / k were stored permuted (llama.cpp's order) and un-permuted on load
        assert torch.allclose(model(_ids()).logits, reference(_ids()).logits, atol=1e-5)
    half = load_hf_model(str(path), task="causal-lm", dtype="bfloat16")
    assert all(parameter.dtype == torch.bfloat16 for parameter in half.parameters())
    with pytest.raises(ConfigError, match="float32, bfloat16 or float16"):
        load_hf_model(str(path), task="causal-lm", dtype="int8")


def test_its_tokenizer_and_chat_template_come_from_the_same_file(tiny, tmp_path):
    from alambic.data.text import load_tokenizer as load_hf_tokenizer

    path, _ = tiny
    tokenizer = load_tokenizer(str(path))
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.vocab_size == 267 and tokenizer.eos_id == 2
    ids = tokenizer.encode(" the other")
    assert ids[:2] == [261, 266] and tokenizer.decode(ids) == " the other"  # merged by its merges: Ġthe, Ġo
    chat = tokenizer.chat_ids([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tokenizer.decode(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert chat[0] == 1  # <|im_start|> stays one special token
    tokenizer.save(tmp_path / "saved")  # a run keeps its tokenizer as a folder
    saved = load_tokenizer(str(tmp_path / "saved"))
    assert saved.chat_ids([{"role": "user", "content": "hi"}], add_generation_prompt=True) == chat
    assert load_hf_tokenizer(str(path)).chat_template == CHAT_TEMPLATE  # text data sets and exports


def test_save_pretrained_writes_a_plain_folder_that_reloads(tiny, tmp_path):
    path, reference = tiny
    model = load_hf_model(str(path), task="causal-lm")
    model.save_pretrained(tmp_path / "folder")
    assert "quantization_config" not in json.loads((tmp_path / "folder" / "config.json").read_text())
    again = load_hf_model(str(tmp_path / "folder"), task="causal-lm", local_files_only=True).eval()
    _assert_plain(again)
    with torch.no_grad():
        assert torch.allclose(again(_ids()).logits, reference(_ids()).logits, atol=1e-5)


def test_alambic_derive_from_a_gguf_file_by_position_and_by_importance(tiny, tmp_path):
    path, _ = tiny
    runner = CliRunner()
    result = runner.invoke(app, ["derive", f"hf:{path}", "--out", str(tmp_path / "one"), "--layers", "1"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # the console wraps long lines
    assert "kept teacher layers [1] of 2" in output and "tokenizer copied" in output
    student = load_hf_model(str(tmp_path / "one"), task="causal-lm", local_files_only=True)
    _assert_plain(student)
    assert student.config.num_hidden_layers == 1
    assert load_tokenizer(str(tmp_path / "one")).hf.chat_template == CHAT_TEMPLATE

    text = tmp_path / "calibration.txt"
    text.write_text(" the other one ran in and on the hill\n" * 40)
    arguments = ["derive", str(path), "--out", str(tmp_path / "two"), "--layers", "1", "--by", "importance"]
    result = runner.invoke(
        app, [*arguments, "--calibration", str(text), "--calibration-windows", "3", "--block-size", "16"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "two" / "derive.json").read_text())
    scores = report["block_influence"]
    assert report["by"] == "importance" and len(scores) == 2 and report["calibration_tokens"] == 48
    assert report["kept_layers"] == [int(np.argmax(scores))]
    assert report["calibration"] == {"file": str(text), "windows": 3, "block_size": 16}
    assert "Block Influence on 48 tokens: 0:" in " ".join(result.output.split())
    missing = runner.invoke(app, [*arguments[:3], str(tmp_path / "three"), *arguments[4:]])
    assert missing.exit_code == 2 and "--calibration FILE" in " ".join(missing.output.split())


def _damaged(tmp_path, tiny_path, kind):
    path = tmp_path / f"{kind}.gguf"
    if kind == "not-gguf":
        path.write_bytes(b"this is not a GGUF file\n" * 20)
    elif kind == "truncated":
        data = tiny_path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "unsupported-architecture":
        writer = gguf.GGUFWriter(str(path), "bogusarch")
        writer.add_block_count(1)
        writer.add_tensor("x.weight", np.zeros((2, 2), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


@pytest.mark.parametrize("kind", ["not-gguf", "truncated", "unsupported-architecture", "missing"])
def test_a_file_transformers_cannot_read_is_one_line(tiny, tmp_path, kind):
    path = _damaged(tmp_path, tiny[0], kind)
    with pytest.raises(ConfigError) as raised:
        load_hf_model(str(path), task="causal-lm")
    message = str(raised.value)
    assert "\n" not in message and str(path) in message
    with pytest.raises(ConfigError) as raised:
        load_tokenizer(str(path))
    assert "\n" not in str(raised.value) and str(path) in str(raised.value)


def _corpus(path):
    rng = random.Random(0)
    words = ["the", "other", "one", "ran", "in", "and", "on", "hill", "there", "an", "inner"]
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(60)))
    return path


def _run_config(tmp_path, teacher, **student_kwargs):
    train = {"epochs": 1, "batch_size": 8, "optimizer": "adamw", "lr": 0.001, "log_every": 5}
    return config_from_dict(
        {
            "name": "gguf",
            "output_dir": str(tmp_path / "runs"),
            "task": "causal-lm",
            "data": {
                "dataset": "text",
                "train_file": str(_corpus(tmp_path / "corpus.txt")),
                "block_size": 16,
            },
            "teacher": {"model": {"arch": f"hf:{teacher}"}},
            "student": {"model": {"arch": "derive:teacher", "kwargs": student_kwargs}},
            "stages": ["distill"],
            "distill": {"train": train},
            "evaluate": {"batch_sizes": [1], "latency_repeats": 1},
        }
    )


@pytest.mark.parametrize("tokenizer", ["from the broken file", "from the good file"])
def test_a_run_config_with_a_broken_gguf_teacher_is_one_line_before_the_run_directory(
    tiny, tmp_path, tokenizer
):
    import yaml

    config = _run_config(tmp_path, _damaged(tmp_path, tiny[0], "truncated"), layers=1)
    if tokenizer == "from the good file":  # the data reads; the pre-flight's model build is what fails
        config.data.tokenizer = str(tiny[0])
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "run.yaml")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot load" in lines[0] and "truncated.gguf" in lines[0], result.output
    assert not (tmp_path / "runs").exists()


def test_a_run_derives_its_student_by_importance_from_a_gguf_teacher_and_exports_it(
    tiny, tmp_path, monkeypatch
):
    import alambic.models.hf as hf_module
    from alambic.models.importance import block_influence, most_important
    from alambic.run.building import build_run_datasets, derive_from_teacher
    from alambic.run.pipeline import run

    path, reference = tiny
    config = _run_config(tmp_path, path, layers=1, by="importance", calibration_windows=4)
    # the calibration windows are the run's first 4 training windows, tokenized by the GGUF's tokenizer
    train_set, _, info = build_run_datasets(config)
    assert info.tokenizer.vocab_size == 267
    student = derive_from_teacher(reference, config.student.model, config)
    scores = block_influence(reference, train_set.get_batch([0, 1, 2, 3])["input_ids"])
    assert student.derive_report["block_influence"] == pytest.approx(scores, abs=1e-6)
    assert student.derive_report["kept_layers"] == most_important(scores, 1)
    assert student.derive_report["calibration_tokens"] == 4 * 16

    measured = []
    monkeypatch.setattr(
        hf_module, "block_influence", lambda *a, **k: measured.append(1) or block_influence(*a, **k)
    )
    run_dir = run(config)
    assert len(measured) == 1  # once a run: the pre-flight checks shapes, baseline and distilled share it
    assert (run_dir / "student" / "model.safetensors").is_file()  # the distilled student
    recorded = json.loads((run_dir / "student" / "derive.json").read_text())
    assert recorded["kept_layers"] == student.derive_report["kept_layers"] and recorded["by"] == "importance"
    assert recorded["block_influence"] == pytest.approx(scores, abs=1e-5)
    result = CliRunner().invoke(app, ["export", str(run_dir), "--format", "safetensors"])
    assert result.exit_code == 0, result.output
    folder = run_dir / "export" / "student-hf"
    assert "quantization_config" not in (folder / "config.json").read_text()
    exported = load_hf_model(str(folder), task="causal-lm", local_files_only=True)
    _assert_plain(exported)
    assert exported.config.num_hidden_layers == 1
    assert load_tokenizer(str(folder)).vocab_size == 267


def test_the_hugging_face_folder_export_of_a_gguf_model_reloads_as_a_plain_model(tiny, tmp_path):
    from alambic.compress.export_hf import export_hf_folder
    from alambic.models.hf import derive_student

    path, reference = tiny
    model = load_hf_model(str(path), task="causal-lm").eval()
    outputs, folder, _ = export_hf_folder(
        model, [{"input_ids": _ids()}], tmp_path / "teacher-hf", str(path), {}
    )
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    again = load_hf_model(str(folder), task="causal-lm", local_files_only=True).eval()
    _assert_plain(again)
    assert load_tokenizer(str(folder)).hf.chat_template == CHAT_TEMPLATE
    with torch.no_grad():
        assert torch.allclose(outputs[0], reference(_ids()).logits, atol=1e-5)
        assert torch.allclose(again(_ids()).logits, reference(_ids()).logits, atol=1e-5)
    copied = copy.deepcopy(model)  # as a run's teacher is copied to another dtype
    _assert_plain(copied)
    with torch.no_grad():
        assert torch.equal(copied(_ids()).logits, model(_ids()).logits)
    student, _ = derive_student(model, keep=[0])  # a deep copy of its config, no quantizer on it
    _assert_plain(student)
    student.save_pretrained(tmp_path / "student")
    assert "quantization_config" not in (tmp_path / "student" / "config.json").read_text()


def test_without_the_gguf_package_a_gguf_file_says_how_to_install_it(tiny, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    for load in (lambda path: load_hf_model(path, task="causal-lm"), load_tokenizer):
        with pytest.raises(ConfigError, match=r"GGUF model files need the gguf package.*alambic\[hf\]"):
            load(str(tiny[0]))
