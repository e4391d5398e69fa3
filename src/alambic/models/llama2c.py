"""Load a llama2.c checkpoint (Karpathy's ``.bin``) as a Hugging Face ``LlamaForCausalLM``.

The format is llama2.c's "legacy" (version 0) export, as written by ``legacy_export`` in
https://github.com/karpathy/llama2.c/blob/master/export.py and read by ``read_checkpoint`` /
``memory_map_weights`` in ``run.c``: seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len; a negative vocab_size means the classifier is not shared with the embedding),
then float32 arrays, each stacked over the layers: token embedding ``[V, dim]``, attention RMSNorm
``[L, dim]``, wq ``[L, dim, dim]``, wk and wv ``[L, kv_dim, dim]``, wo ``[L, dim, dim]``, FFN RMSNorm
``[L, dim]``, w1 ``[L, hidden, dim]``, w2 ``[L, dim, hidden]``, w3 ``[L, hidden, dim]``, final RMSNorm
``[dim]``, the old RoPE tables ``2 x [seq_len, head_size / 2]`` (skipped), and the classifier
``[V, dim]`` when it is not shared.

Example:
    >>> from alambic.models.llama2c import load_llama2c
    >>> model = load_llama2c("stories260K.bin")  # doctest: +SKIP
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from alambic.errors import ConfigError
from alambic.imports import require

HEADER = struct.Struct("<7i")
FLOAT_BYTES = 4
VERSION1_MAGIC = 0x616B3432  # "ak42": llama2.c's newer export (export.py version1_export), another layout


class Llama2cShape(NamedTuple):
    """The header of a llama2.c checkpoint (``Config`` in run.c)."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_size * self.n_kv_heads


def _read_header(path: Path, data: bytes) -> Llama2cShape:
    if len(data) < HEADER.size:
        raise ConfigError(
            f"llama2.c checkpoint {path} is truncated: {len(data)} bytes, shorter than its header"
        )
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = HEADER.unpack_from(data)
    if dim == VERSION1_MAGIC:
        raise ConfigError(
            f"{path} is a llama2.c version-1 export (magic 'ak42'); only the legacy format is read: "
            "export it with llama2.c's export.py --version 0"
        )
    sizes = (dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len)
    if min(sizes) <= 0 or dim % heads or heads % kv_heads or (dim // heads) % 2:
        raise ConfigError(
            f"{path} is not a llama2.c checkpoint: nonsense header (dim {dim}, hidden {hidden}, layers {layers}, "
            f"heads {heads}, kv heads {kv_heads}, vocab {vocab}, seq_len {seq_len})"
        )
    return Llama2cShape(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, vocab > 0)


def _array_shapes(shape: Llama2cShape) -> list[tuple[str | None, tuple[int, ...]]]:
    """The arrays after the header, in file order; ``None`` names the RoPE tables to skip."""
    d, h, n, v, kv = shape.dim, shape.hidden_dim, shape.n_layers, shape.vocab_size, shape.kv_dim
    arrays = [
        ("embedding", (v, d)),
        ("rms_att", (n, d)),
        ("wq", (n, d, d)),
        ("wk", (n, kv, d)),
        ("wv", (n, kv, d)),
        ("wo", (n, d, d)),
        ("rms_ffn", (n, d)),
        ("w1", (n, h, d)),
        ("w2", (n, d, h)),
        ("w3", (n, h, d)),
        ("rms_final", (d,)),
        (None, (2, shape.seq_len, shape.head_size // 2)),  # freq_cis_real, freq_cis_imag
    ]
    return arrays if shape.shared_classifier else [*arrays, ("wcls", (v, d))]


def read_llama2c(path: str | Path) -> tuple[Llama2cShape, dict[str, Tensor]]:
    """The header and the named float32 arrays of a llama2.c checkpoint (see the module docstring)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read llama2.c checkpoint {path}: {error.strerror or error}") from None
    shape = _read_header(path, data)
    arrays = _array_shapes(shape)
    expected = HEADER.size + FLOAT_BYTES * sum(int(np.prod(size)) for _, size in arrays)
    if len(data) != expected:
        sharing = "shared" if shape.shared_classifier else "separate"
        raise ConfigError(
            f"llama2.c checkpoint {path} has {len(data)} bytes but its header (dim {shape.dim}, "
            f"{shape.n_layers} layers, vocab {shape.vocab_size}, {sharing} classifier) needs {expected}; "
            "the file is truncated or not a legacy llama2.c export"
        )
    values = np.frombuffer(data, dtype="<f4", offset=HEADER.size)
    weights, start = {}, 0
    for name, size in arrays:
        count = int(np.prod(size))
        if name is not None:
            weights[name] = torch.from_numpy(values[start : start + count].reshape(size).copy())
        start += count
    return shape, weights


def interleaved_to_halves(weight: Tensor, n_heads: int) -> Tensor:
    """Reorder the rows of a q or k projection from llama2.c's RoPE to Hugging Face's.

    llama2.c (like Meta's Llama) rotates interleaved pairs ``(x0, x1), (x2, x3), ...`` of each head;
    Hugging Face's Llama rotates halves ``(x_i, x_{i + head_size / 2})``. This is ``permute`` of
    transformers' ``convert_llama_weights_to_hf.py`` (llama2.c's export.py ``permute_original``).
    """
    rows, columns = weight.shape
    pairs = weight.view(n_heads, rows // n_heads // 2, 2, columns)  # [H, head_size / 2, 2, dim]
    return pairs.transpose(1, 2).reshape(rows, columns)


def _hf_state_dict(shape: Llama2cShape, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    state = {"model.embed_tokens.weight": weights["embedding"], "model.norm.weight": weights["rms_final"]}
    for layer in range(shape.n_layers):
        prefix = f"model.layers.{layer}."
        state |= {
            prefix + "input_layernorm.weight": weights["rms_att"][layer],
            prefix + "self_attn.q_proj.weight": interleaved_to_halves(weights["wq"][layer], shape.n_heads),
            prefix + "self_attn.k_proj.weight": interleaved_to_halves(weights["wk"][layer], shape.n_kv_heads),
            prefix + "self_attn.v_proj.weight": weights["wv"][layer],
            prefix + "self_attn.o_proj.weight": weights["wo"][layer],
            prefix + "post_attention_layernorm.weight": weights["rms_ffn"][layer],
            prefix + "mlp.gate_proj.weight": weights["w1"][layer],
            prefix + "mlp.down_proj.weight": weights["w2"][layer],
            prefix + "mlp.up_proj.weight": weights["w3"][layer],
        }
    state["lm_head.weight"] = weights["embedding"] if shape.shared_classifier else weights["wcls"]
    return state


def load_llama2c(path: str | Path) -> Any:
    """A llama2.c checkpoint as a ``transformers.LlamaForCausalLM`` in float32 and eval mode.

    Its logits equal llama2.c's ``forward`` (run.c) up to float rounding; q/k rows are permuted for
    Hugging Face's rotary embedding (:func:`interleaved_to_halves`).

    Example:
        >>> model = load_llama2c("stories260K.bin")  # doctest: +SKIP
        >>> model.generate(torch.tensor([[1]]), max_new_tokens=20)  # doctest: +SKIP
    """
    shape, weights = read_llama2c(path)
    transformers = require(
        "transformers", "hf", purpose="llama2c: models (loaded as Hugging Face Llama models)"
    )
    config = transformers.LlamaConfig(
        hidden_size=shape.dim,
        intermediate_size=shape.hidden_dim,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads,
        vocab_size=shape.vocab_size,
        max_position_embeddings=shape.seq_len,
        rms_norm_eps=1e-5,  # run.c's rmsnorm
        rope_theta=10000.0,  # run.c's RoPE frequencies
        tie_word_embeddings=shape.shared_classifier,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,  # llama2.c's tokenizers: 0 <unk>, 1 <s>, 2 </s>
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(_hf_state_dict(shape, weights), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # a tied head is reported missing by some versions
        raise RuntimeError(f"llama2.c conversion mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()
