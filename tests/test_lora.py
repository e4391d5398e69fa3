"""LoRA students: only the adapters train, from Python and from a run config; the export merges them into a
plain Hugging Face folder with the same logits; the settings are checked before anything runs."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from safetensors.torch import load_file  # noqa: E402
from test_lm_distill import _distill_config, trained  # noqa: E402, F401 (trained: a module fixture)
from test_lm_run import _config  # noqa: E402
from tolerance import close  # noqa: E402

from alambic import distill  # noqa: E402
from alambic.core.llm import cache_argument  # noqa: E402
from alambic.errors import ConfigError  # noqa: E402
from alambic.models.hf import build_hf_model  # noqa: E402
from alambic.models.lora import merge_lora, trainable_parameters, with_lora  # noqa: E402
from alambic.run.artifacts import build_run_architecture, export_run, student_state_dict  # noqa: E402
from alambic.run.building import build_run_datasets  # noqa: E402
from alambic.run.pipeline import evaluate_run, run  # noqa: E402

VOCABULARY = 32


def _llama(layers=2, width=32, seed=0):
    torch.manual_seed(seed)
    return build_hf_model(
        "llama",
        num_hidden_layers=layers,
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCABULARY,
        max_position_embeddings=32,
    )


def test_only_the_adapters_change_when_a_lora_student_distills_from_python():
    pytest.importorskip("peft", reason="the lora extra (peft) is not installed")
    teacher, student = _llama(layers=2, seed=1), _llama(layers=2, seed=2)
    student = with_lora(student, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    before = {key: value.clone() for key, value in student.state_dict().items()}
    adapters = {key for key in before if ".lora_" in key}
    assert len(adapters) == 2 * 2 * 2  # A and B on q_proj and v_proj of 2 layers
    trainable, total = trainable_parameters(student)
    assert trainable == sum(before[key].numel() for key in adapters) and trainable < total / 10
    ids = torch.randint(0, VOCABULARY, (16, 12), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row, "labels": row} for row in ids]
    loader = torch.utils.data.DataLoader(rows, batch_size=8)
    distill(teacher, student, loader, terms=[{"loss": "forward_kl"}], optimizer="adamw", lr=0.01, epochs=2)
    after = student.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == adapters  # every adapter trained; the model it adapts did not move
    with torch.no_grad():
        adapted = student.eval()(input_ids=ids[:2]).logits
        merged = merge_lora(student)
        assert type(merged).__name__ == "LlamaForCausalLM"
        torch.testing.assert_close(merged(input_ids=ids[:2]).logits, adapted, **close(adapted, ulps=1024))


def test_a_lora_model_generates_through_the_key_value_cache_of_the_model_it_adapts():
    pytest.importorskip("peft", reason="the lora extra (peft) is not installed")
    plain = cache_argument(_llama())
    assert plain is not None and cache_argument(with_lora(_llama(), r=2)) == plain


def test_a_lora_student_run_trains_adapters_only_and_exports_a_plain_merged_folder(trained, tmp_path):  # noqa: F811
    pytest.importorskip("peft", reason="the lora extra (peft) is not installed")
    from transformers import AutoModelForCausalLM

    config = _distill_config(trained, stages=("distill", "evaluate"))
    # a student initialised from the trained teacher (same shape here), adapted with LoRA
    config.student.model = config.teacher.model.model_copy()
    config.student.model.lora = {"r": 2, "alpha": 4, "target_modules": ["c_attn"]}
    run_dir = run(config, run_dir=tmp_path / "run")
    saved, teacher = student_state_dict(run_dir / "student" / "model.safetensors"), load_file(trained[1])
    base = {key: value for key, value in saved.items() if ".lora_" not in key}
    for key, value in base.items():  # the teacher's weights, frozen
        plain = key.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(value, teacher[plain]), key
    distilled = json.loads((run_dir / "summary.json").read_text())["models"]["distilled"]
    lora_sizes = sum(value.numel() for key, value in saved.items() if ".lora_" in key)
    assert distilled["trainable_parameters"] == lora_sizes > 0
    again = evaluate_run(run_dir)["models"]["distilled"]  # the saved stage rebuilt with its adapters
    assert again["perplexity"] == pytest.approx(distilled["perplexity"], rel=1e-5, abs=1e-6)
    report = export_run(run_dir, export_format="safetensors")
    reloaded = AutoModelForCausalLM.from_pretrained(report["path"]).eval()
    assert report["parameters"] == sum(parameter.numel() for parameter in reloaded.parameters())
    assert not list(Path(report["path"]).glob("adapter_*"))  # a plain model, not a peft adapter folder
    adapted = build_run_architecture(config, "student", build_run_datasets(config)[2])
    adapted.load_state_dict(saved)  # the adapted student as it trained, adapters unmerged
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        expected = adapted.eval()(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, **close(expected, ulps=1024))


@pytest.mark.parametrize(
    ("side", "lora", "message"),
    [
        ("teacher", {"r": 4}, "LoRA adapts students"),
        ("student", {"r": 0}, "student.model.lora.r: Input should be greater than or equal to 1"),
        ("student", {"dropout": 1.0}, "student.model.lora.dropout"),
        ("student", {"target_modules": []}, "student.model.lora.target_modules"),
        ("student", {"target_modules": "q_proj"}, "student.model.lora.target_modules"),
        ("student", {"rank": 4}, "student.model.lora.rank: unknown key"),
    ],
)
def test_lora_settings_are_checked_with_their_key_path(tmp_path, side, lora, message):
    changes = {side: {"model": {"arch": "hf-config", "kwargs": {"model_type": "gpt2"}, "lora": lora}}}
    if side == "teacher":
        changes["teacher"]["model"]["checkpoint"] = "teacher.safetensors"
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path / "corpus.txt", **changes)


def test_target_modules_the_model_lacks_fail_before_the_run_directory_exists(trained, tmp_path):  # noqa: F811
    pytest.importorskip("peft", reason="the lora extra (peft) is not installed")
    config = _distill_config(trained)
    config.student.model.lora = {"target_modules": ["q_proj"]}  # GPT-2 names it c_attn
    with pytest.raises(
        ConfigError, match="cannot add LoRA adapters to GPT2LMHeadModel: .*lora.target_modules"
    ):
        run(config, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_without_peft_lora_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'alambic\[lora\]'"):
        with_lora(torch.nn.Linear(2, 2), target_modules=["weight"])
