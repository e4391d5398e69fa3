"""Students by measured importance: ShortGPT's Block Influence (Men et al. 2024, arXiv:2403.03853) on a tiny
Llama built in the test, checked against the formula computed directly in float64, and the derive options
and run-config keys that use it."""

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from alambic.config import config_from_dict  # noqa: E402
from alambic.errors import ConfigError, DataError  # noqa: E402
from alambic.models.hf import derive_student  # noqa: E402
from alambic.models.importance import block_influence, most_important, text_windows  # noqa: E402


def _tiny_llama(layers=4, seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # weights large enough that every layer moves the hidden states
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.3)
    return model


def _windows(count=6, length=12, seed=1):
    return torch.randint(0, 64, (count, length), generator=torch.Generator().manual_seed(seed))


def _direct_block_influence(model, ids, mask=None):
    """1 - mean over (real) tokens of cos(h_i, h_{i+1}) from output_hidden_states, in float64. The final
    norm's weight is set to 1 so that the last entry (the norm's output) is the last layer's output scaled
    by a positive number per token, which leaves every cosine unchanged."""
    with torch.no_grad():
        model.model.norm.weight.fill_(1.0)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    weights = torch.ones(ids.shape, dtype=torch.float64) if mask is None else mask.double()
    scores = []
    for before, after in zip(hidden[:-1], hidden[1:]):
        before, after = before.double(), after.double()
        cosine = (before * after).sum(-1) / (before.norm(dim=-1) * after.norm(dim=-1))  # [B, T]
        scores.append(1.0 - float((cosine * weights).sum() / weights.sum()))
    return scores


def test_block_influence_is_one_minus_the_mean_cosine_of_each_layers_input_and_output():
    model, ids = _tiny_llama(), _windows()
    expected = _direct_block_influence(model, ids)
    hooks = [len(block._forward_hooks) for block in model.model.layers]
    model.train()
    measured = block_influence(model, ids, batch_size=4)  # two batches, averaged over all tokens
    assert measured == pytest.approx(expected, abs=1e-6)
    assert all(0.01 < score < 2.0 for score in measured)  # every random layer changes its input
    # its hooks are gone and the model's mode is restored
    assert model.training and [len(block._forward_hooks) for block in model.model.layers] == hooks


def test_padding_is_left_out_of_the_mean():
    model, ids = _tiny_llama(layers=2), _windows(count=2, length=10)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # the second row's last four tokens are padding (right padding: causal LM)
    measured = block_influence(model, [{"input_ids": ids, "attention_mask": mask, "labels": ids}])
    assert measured == pytest.approx(_direct_block_influence(model, ids, mask), abs=1e-6)
    unmasked = block_influence(model, ids)
    assert measured != pytest.approx(unmasked, abs=1e-6)  # the padded positions did count without the mask


def test_an_identity_layer_has_influence_zero_and_is_removed_first():
    model, ids = _tiny_llama(layers=4), _windows()
    with torch.no_grad():  # layer 2 adds nothing to its residual stream: its output is its input
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    scores = block_influence(model, ids)
    assert scores[2] == pytest.approx(0.0, abs=1e-12)
    assert min(scores[:2] + scores[3:]) > 0.01
    student, report = derive_student(model, layers=3, by="importance", calibration=ids)
    assert report["kept_layers"] == [0, 1, 3] and report["by"] == "importance"
    assert report["block_influence"] == pytest.approx(scores, abs=1e-6)
    assert report["calibration_tokens"] == ids.numel()
    assert student.config.num_hidden_layers == 3
    # the kept layers are the teacher's layers 0, 1 and 3, renumbered
    teacher_weight = model.model.layers[3].mlp.down_proj.weight
    assert torch.equal(student.model.layers[2].mlp.down_proj.weight, teacher_weight)
    # the identity layer removed, the student computes what the teacher does
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, model(ids).logits, atol=1e-5)


def test_the_layers_of_highest_influence_are_kept_in_order():
    assert most_important([0.5, 0.0, 0.2, 0.9], 2) == [0, 3]
    assert most_important([0.3, 0.3, 0.1], 1) == [0]  # a tie keeps the earlier layer
    assert most_important([0.1, 0.2], 2) == [0, 1]
    with pytest.raises(ConfigError, match="1..3"):
        most_important([0.1, 0.2, 0.3], 4)


def test_text_windows_are_the_first_whole_windows():
    windows = text_windows(list(range(23)), block_size=5, windows=3)
    assert windows.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    assert text_windows(list(range(23)), block_size=5, windows=10).shape == (4, 5)  # as many as there are
    with pytest.raises(DataError, match="fewer than one window"):
        text_windows([1, 2, 3], block_size=5, windows=1)


def test_derive_by_importance_needs_a_layer_count_and_calibration_text():
    model = _tiny_llama(layers=2)
    with pytest.raises(ConfigError, match="give --layers N"):
        derive_student(model, keep=[0], by="importance", calibration=_windows())
    with pytest.raises(ConfigError, match="calibration text"):
        derive_student(model, layers=1, by="importance")
    with pytest.raises(ConfigError, match="by position .the default. or importance"):
        derive_student(model, layers=1, by="size")


def _run_config(**kwargs):
    return {
        "task": "causal-lm",
        "data": {"dataset": "text", "train_file": "train.txt", "tokenizer": "bytes"},
        "teacher": {"model": {"arch": "hf:teacher.gguf"}},
        "student": {"model": {"arch": "derive:teacher", "kwargs": kwargs}},
        "stages": ["baseline", "distill"],
    }


def test_run_configs_take_by_importance_with_a_layer_count():
    config = config_from_dict(_run_config(layers=2, by="importance", calibration_windows=8))
    assert config.student.model.kwargs == {"layers": 2, "by": "importance", "calibration_windows": 8}
    config_from_dict(_run_config(layers=2, by="importance", calibration_file="calibration.txt"))
    config_from_dict(_run_config(every=2, by="position"))
    for kwargs, message in [
        ({"keep": [0, 1], "by": "importance"}, "give layers: N"),
        ({"layers": 2, "by": "size"}, "position .the default. or importance"),
        ({"layers": 2, "calibration_windows": 8}, "go with by: importance"),
        ({"layers": 2, "by": "importance", "calibration_windows": 0}, "integer >= 1"),
        ({"layers": 2, "by": "importance", "windows": 8}, "exactly one of layers"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(_run_config(**kwargs))
