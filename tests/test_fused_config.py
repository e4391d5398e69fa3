"""distill.fused_output: a causal-LM student's token terms from its hidden states, chunk by chunk, equal to
the unfused path in losses and gradients; what it cannot do refused in one line before step 0."""

import copy
import re

import pytest
import torch
from tolerance import close

from alambic.config import Term
from alambic.config.sections import DistillConfig
from alambic.core.distiller import Distiller, Teacher
from alambic.core.fused_output import HIDDEN
from alambic.errors import ConfigError

transformers = pytest.importorskip("transformers")

VOCABULARY = 37


def _llama(seed: int, layers: int = 2, tied: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCABULARY,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(config)


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCABULARY, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 6:] = 0  # a padded row
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    labels[0, :4] = -100  # a prompt
    return {"input_ids": input_ids, "attention_mask": attention_mask}, labels


TERMS = {
    "forward_kl": [
        Term(loss="lm_ce", weight=0.1),
        Term(loss="forward_kl", weight=0.9, params={"temperature": 2.0}),
    ],
    "reverse_kl": [Term(loss="reverse_kl", params={"chunk_size": 5})],
    "jsd": [Term(loss="jsd", weight=0.5, params={"beta": 0.3}), Term(loss="lm_ce", weight=0.5)],
    "features": [
        Term(loss="forward_kl"),
        Term(loss="hidden_mse", student="hidden_states.1", teacher="hidden_states.2"),
        Term(loss="fitnet", student="model.layers.0.mlp", teacher="model.layers.1.mlp"),
    ],
}


def _step(student, terms, fused: bool, token_scale=None):
    """One distill step's losses and the student's gradients (by parameter name)."""
    student = copy.deepcopy(student)
    teacher = Teacher(_llama(seed=1, layers=3), terms, fused_output=fused)
    assert teacher.fused == fused  # the teacher's logits one chunk at a time too
    module = Distiller(student, terms, fused_output=fused)
    inputs, labels = _batch()
    module.build_modules(inputs, teacher)
    losses = module(inputs, labels, teacher(inputs), token_scale=token_scale)
    losses["total"].backward()
    grads = {name: param.grad for name, param in module.named_parameters() if param.grad is not None}
    return {name: value.detach() for name, value in losses.items()}, grads


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("case", sorted(TERMS))
def test_fused_output_equals_the_unfused_step_in_losses_and_gradients(case, tied):
    student = _llama(seed=0, tied=tied)
    scale = torch.tensor(0.75)  # gradient accumulation's token scale: grad_output != 1
    expected, expected_grads = _step(student, TERMS[case], fused=False, token_scale=scale)
    actual, grads = _step(student, TERMS[case], fused=True, token_scale=scale)
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, **close(value))
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, **close(grad), msg=name)


def test_neither_fused_side_computes_its_whole_logits():
    student, teacher_model = _llama(seed=0), _llama(seed=1)
    module = Distiller(student, TERMS["forward_kl"], fused_output=True)
    teacher = Teacher(teacher_model, TERMS["forward_kl"], fused_output=True)
    shapes = []
    for model in (student, teacher_model):
        model.lm_head.register_forward_hook(lambda _m, _i, out: shapes.append(out.shape))
    inputs, labels = _batch()
    outputs, teacher_outputs = module.student_outputs(inputs), teacher(inputs)
    assert shapes == [] and HIDDEN in outputs and "logits" not in outputs and "logits" not in teacher_outputs
    module(inputs, labels, teacher_outputs)["total"].backward()
    assert shapes == [] and student.lm_head.weight.grad is not None


@pytest.mark.parametrize(
    ("terms", "dtype"),
    [
        ([Term(loss="forward_kl"), Term(loss="logit_mse", student="model.norm")], None),  # logits read whole
        (TERMS["forward_kl"], torch.bfloat16),  # a cast teacher: its logits, as float32
    ],
)
def test_a_teacher_whose_logits_are_needed_whole_or_cast_keeps_them(terms, dtype):
    teacher = Teacher(_llama(seed=1), terms, dtype=dtype, fused_output=True)
    assert not teacher.fused and "logits" in teacher(_batch()[0])


@pytest.mark.parametrize(
    ("terms", "message"),
    [
        ([Term(loss="forward_kl"), Term(loss="kd")], "term 'kd' (kd) reads the student's logits"),
        ([Term(loss="ce")], "term 'ce' (ce) reads the student's logits"),
        ([Term(loss="forward_kl", teacher="model.norm")], "not 'model.norm'"),
    ],
)
def test_terms_that_need_the_whole_logits_are_refused_in_one_line(terms, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        Distiller(_llama(seed=0), terms, fused_output=True)
    assert "\n" not in str(error.value)


def test_a_student_without_an_output_projection_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="this student \\(Sequential\\) has none") as error:
        Distiller(torch.nn.Sequential(torch.nn.Linear(4, 4)), [Term(loss="forward_kl")], fused_output=True)
    assert "\n" not in str(error.value)
    softcapped = _llama(seed=0)
    softcapped.config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match="final_logit_softcapping=30.0"):
        Distiller(softcapped, [Term(loss="forward_kl")], fused_output=True)


def test_the_pre_flight_check_names_a_vocabulary_mismatch():
    module = Distiller(_llama(seed=0), [Term(loss="forward_kl")], fused_output=True)
    teacher = Teacher(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCABULARY + 3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )))  # fmt: skip
    inputs, labels = _batch()
    with pytest.raises(ConfigError, match=f"has {VOCABULARY + 3} tokens and the student's {VOCABULARY}"):
        module.check(inputs, labels, teacher)
    Distiller(_llama(seed=0), [Term(loss="forward_kl")], fused_output=True).check(
        inputs, labels, Teacher(_llama(seed=1))
    )


def test_the_config_key():
    assert DistillConfig().fused_output is False
    assert DistillConfig(fused_output=True).fused_output is True


def _run_config(tmp_path, terms):
    import random

    from alambic.config import config_from_dict

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "the", "dog", "ran", "to", "the", "park"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(100)))
    train = {"epochs": 1, "batch_size": 16, "optimizer": "adamw", "lr": 0.003, "log_every": 2}
    gpt2 = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_positions": 64}
    return config_from_dict(
        {
            "task": "causal-lm",
            "stages": ["teacher", "distill"],
            "data": {"dataset": "text", "train_file": str(corpus), "tokenizer": "chars", "block_size": 16},
            "teacher": {"model": {"arch": "hf-config", "kwargs": {**gpt2, "n_embd": 16}}, "train": train},
            "student": {"model": {"arch": "hf-config", "kwargs": {**gpt2, "n_embd": 8}}},
            "distill": {"train": train, "terms": terms, "fused_output": True},
            "evaluate": {"batch_sizes": [1], "latency_repeats": 1, "max_tokens": 64, "epoch_max_tokens": 64},
        }
    )


def test_a_run_with_fused_output_trains_and_a_term_it_cannot_fuse_is_refused_before_the_run_directory(
    tmp_path,
):
    """The distill stage trains as the unfused one would (same logged losses step after step)."""
    import json
    import math

    from alambic.run.pipeline import run

    refused = _run_config(tmp_path, [{"loss": "forward_kl"}, {"loss": "kd", "params": {"temperature": 2.0}}])
    with pytest.raises(ConfigError, match="term 'kd' \\(kd\\) reads the student's logits"):
        run(refused, run_dir=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    terms = [{"loss": "lm_ce", "weight": 0.1}, {"loss": "forward_kl", "weight": 0.9}]
    logged = {}
    for fused in (True, False):
        config = _run_config(tmp_path, terms)
        config.distill.fused_output = fused
        run_dir = run(config, run_dir=tmp_path / f"run-{fused}")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        logged[fused] = [
            row["losses"] for row in rows if row["stage"] == "distill" and row["kind"] == "train"
        ]
    assert len(logged[True]) >= 3 and all(math.isfinite(row["total"]) for row in logged[True])
    for fused_row, row in zip(logged[True], logged[False]):  # the same training, step after step
        assert fused_row == pytest.approx(row, rel=1e-4)
