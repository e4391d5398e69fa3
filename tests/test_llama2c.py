"""llama2.c checkpoints as Hugging Face Llama models, checked against a direct re-implementation of
llama2.c's ``forward`` (run.c: interleaved-pair RoPE, grouped-query attention, RMSNorm, SwiGLU)."""

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from tolerance import close

from alambic.errors import ConfigError

pytest.importorskip("transformers")

STORIES = Path(__file__).parents[2] / "shared/data/weights/tinystories-llama2c-stories260K/stories260K.bin"
# dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
TINY = (16, 24, 2, 4, 2, 32, 16)
GREEDY_FROM_RUN_C = [461, 461, 401, 401, 401, 461, 378, 455, 473, 456, 435, 299, 362, 409, 283, 264, 283, 452]
GREEDY_FROM_RUN_C += [288, 13, 431, 431, 431, 431]


def _tiny_weights(shared: bool, seed: int = 0) -> dict[str, np.ndarray]:
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = TINY
    kv_dim = dim // heads * kv_heads
    rng = np.random.default_rng(seed)
    shapes = {
        "embedding": (vocab, dim), "rms_att": (layers, dim), "wq": (layers, dim, dim),
        "wk": (layers, kv_dim, dim), "wv": (layers, kv_dim, dim), "wo": (layers, dim, dim),
        "rms_ffn": (layers, dim), "w1": (layers, hidden, dim), "w2": (layers, dim, hidden),
        "w3": (layers, hidden, dim), "rms_final": (dim,),
    }  # fmt: skip
    weights = {name: rng.normal(0, 0.3, size).astype(np.float32) for name, size in shapes.items()}
    for name in ("rms_att", "rms_ffn", "rms_final"):
        weights[name] += 1
    weights["wcls"] = weights["embedding"] if shared else rng.normal(0, 0.3, (vocab, dim)).astype(np.float32)
    return weights


def _write(path: Path, weights: dict[str, np.ndarray], shared: bool) -> Path:
    """A legacy llama2.c export (export.py legacy_export): header, arrays, RoPE tables, classifier."""
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = TINY
    header = struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab if shared else -vocab, seq_len)
    order = ["embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final"]
    rope = np.full((2, seq_len, dim // heads // 2), 7.0, np.float32)  # never read
    arrays = [weights[name] for name in order] + [rope] + ([] if shared else [weights["wcls"]])
    path.write_bytes(header + b"".join(array.astype("<f4").tobytes() for array in arrays))
    return path


def _rmsnorm(x, weight):
    return weight * (x / np.sqrt((x * x).mean() + 1e-5))


def reference_logits(
    w: dict[str, np.ndarray], n_heads: int, n_kv_heads: int, tokens: list[int]
) -> np.ndarray:
    """llama2.c's run.c ``forward``, one token at a time with its key/value cache -> ``[T, V]``."""
    w = {name: value.astype(np.float64) for name, value in w.items()}
    dim = w["embedding"].shape[1]
    head_size, layers = dim // n_heads, w["wq"].shape[0]
    kv_dim, kv_mul = head_size * n_kv_heads, n_heads // n_kv_heads
    keys, values = [[] for _ in range(layers)], [[] for _ in range(layers)]
    out = []
    for pos, token in enumerate(tokens):
        x = w["embedding"][token].copy()
        for layer in range(layers):
            xb = _rmsnorm(x, w["rms_att"][layer])
            q, k, v = w["wq"][layer] @ xb, w["wk"][layer] @ xb, w["wv"][layer] @ xb
            for i in range(0, dim, 2):  # RoPE on interleaved pairs (i, i + 1) of each head
                angle = pos / 10000.0 ** ((i % head_size) / head_size)
                cos, sin = np.cos(angle), np.sin(angle)
                for vec in (q, k) if i < kv_dim else (q,):
                    vec[i], vec[i + 1] = vec[i] * cos - vec[i + 1] * sin, vec[i] * sin + vec[i + 1] * cos
            keys[layer].append(k)
            values[layer].append(v)
            heads = []
            for h in range(n_heads):
                span = slice((h // kv_mul) * head_size, (h // kv_mul + 1) * head_size)
                scores = np.array([q[h * head_size : (h + 1) * head_size] @ key[span] for key in keys[layer]])
                attention = np.exp(scores / np.sqrt(head_size) - (scores / np.sqrt(head_size)).max())
                attention /= attention.sum()
                heads.append(sum(a * value[span] for a, value in zip(attention, values[layer])))
            x = x + w["wo"][layer] @ np.concatenate(heads)
            xb = _rmsnorm(x, w["rms_ffn"][layer])
            gate = w["w1"][layer] @ xb
            x = x + w["w2"][layer] @ (gate / (1 + np.exp(-gate)) * (w["w3"][layer] @ xb))
        out.append(w["wcls"] @ _rmsnorm(x, w["rms_final"]))
    return np.stack(out)


def _hf_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0]


@pytest.mark.parametrize("shared", [True, False], ids=["shared-classifier", "own-classifier"])
def test_llama2c_checkpoint_gives_llama2c_logits(tmp_path, shared):
    from alambic.models.llama2c import load_llama2c

    weights = _tiny_weights(shared)
    model = load_llama2c(_write(tmp_path / "tiny.bin", weights, shared))
    config = model.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == TINY[:3]
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == TINY[3:6]
    assert config.max_position_embeddings == 16 and config.tie_word_embeddings is shared
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is shared
    tokens = [1, 5, 30, 7, 7, 19]
    expected = torch.from_numpy(reference_logits(weights, 4, 2, tokens)).float()
    torch.testing.assert_close(_hf_logits(model, tokens), expected, **close(expected, ulps=256))


@pytest.mark.skipif(not STORIES.exists(), reason=f"optional asset {STORIES} absent")
def test_stories260k_gives_llama2c_logits_and_run_c_greedy_tokens():
    from alambic.models.llama2c import load_llama2c, read_llama2c

    shape, weights = read_llama2c(STORIES)
    model = load_llama2c(STORIES)
    assert (shape.dim, shape.n_layers, shape.vocab_size, shape.shared_classifier) == (64, 5, 512, True)
    weights = {name: value.numpy() for name, value in weights.items()} | {
        "wcls": weights["embedding"].numpy()
    }
    tokens = [1, 403, 407, 261, 378, 280, 350, 30]
    expected = torch.from_numpy(reference_logits(weights, shape.n_heads, shape.n_kv_heads, tokens)).float()
    torch.testing.assert_close(_hf_logits(model, tokens), expected, **close(expected, ulps=256))
    generated = model.generate(torch.tensor([[1]]), max_new_tokens=24, do_sample=False)[0, 1:].tolist()
    # llama2.c's own greedy output: `./run stories260K.bin -t 0 -n 25 -i "" -z TOK` (run.c at 350e04f,
    # TOK a 512-piece tokenizer printing "[id]"); the top two logits differ by > 0.05 at every step
    assert generated == GREEDY_FROM_RUN_C


def test_damaged_llama2c_files_are_one_line_config_errors(tmp_path):
    from alambic.models.llama2c import load_llama2c

    good = _write(tmp_path / "good.bin", _tiny_weights(True), True).read_bytes()
    cases = {
        "missing.bin": (None, "cannot read"),
        "short.bin": (good[:10], "shorter than its header"),
        "truncated.bin": (good[:-4], f"has {len(good) - 4} bytes but its header .* needs {len(good)}"),
        "longer.bin": (good + good[-8:], f"has {len(good) + 8} bytes but its header"),
        "nonsense.bin": (struct.pack("<7i", 16, 24, 2, 3, 2, 32, 16) + good[28:], "nonsense header"),
        "zero.bin": (bytes(len(good)), "nonsense header"),
        "version1.bin": (struct.pack("<2i", 0x616B3432, 1) + good[8:], "version-1 export"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(ConfigError, match=message) as caught:
            load_llama2c(path)
        assert name in str(caught.value) and "\n" not in str(caught.value)


def test_llama2c_arch_builds_through_model_configs(tmp_path):
    from types import SimpleNamespace

    from alambic.config import ModelConfig
    from alambic.run.building import build_named_model

    path = _write(tmp_path / "tiny.bin", _tiny_weights(False), False)
    info = SimpleNamespace(num_classes=2, input_shape=(8,))
    model = build_named_model(ModelConfig(arch=f"llama2c:{path}"), info, side="teacher")
    assert model.config.vocab_size == 32
    with pytest.raises(ConfigError, match="llama2c: takes no kwargs"):
        build_named_model(ModelConfig(arch=f"llama2c:{path}", kwargs={"dropout": 0.1}), info, side="teacher")
