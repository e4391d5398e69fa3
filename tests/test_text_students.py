"""The zoo's text students (bilstm, kim_cnn): shapes, padding, gradients, the teacher-embedding PCA init,
option errors, and distillation from a tiny BERT teacher (in Python and through a run config)."""

from types import SimpleNamespace

import pytest
import torch
from tolerance import close

from alambic.config import ModelConfig
from alambic.errors import ConfigError
from alambic.models import build_model, init_from_teacher_embeddings
from alambic.run.building import build_named_model

STUDENTS = {
    "bilstm": {"embedding_dim": 8, "hidden": 6, "layers": 2, "dropout": 0.1},
    "kim_cnn": {"embedding_dim": 8, "filters": 5, "widths": [2, 3, 5], "dropout": 0.1},
}


def _student(name, vocab_size=40, num_classes=3, **overrides):
    torch.manual_seed(0)
    options = {**STUDENTS[name], **overrides}
    return build_model(name, num_classes=num_classes, input_shape=(12,), vocab_size=vocab_size, **options)


@pytest.mark.parametrize("name", STUDENTS)
def test_a_text_student_maps_token_batches_to_logits(name):
    model = _student(name)
    ids = torch.randint(0, 40, (4, 12))
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, 3:] = 0
    logits = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    assert logits.shape == (4, 3)
    assert model(ids).shape == (4, 3)  # no mask: every token is real


@pytest.mark.parametrize("name", STUDENTS)
def test_padding_on_either_side_does_not_change_a_sentences_logits(name):
    model = _student(name).eval()
    sentence = torch.tensor([5, 9, 3, 17, 22])
    plain = model(input_ids=sentence[None], attention_mask=torch.ones(1, 5, dtype=torch.long))
    garbage = torch.tensor([31, 7, 12, 29])  # padding ids the model must not read
    right = torch.cat([sentence, garbage])[None]
    left = torch.cat([garbage, sentence])[None]
    right_mask = torch.tensor([[1] * 5 + [0] * 4])
    for ids, mask in ((right, right_mask), (left, right_mask.flip(1))):
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask), plain, **close(plain))
    # a sentence shorter than the widest convolution, in a batch with a longer one
    short = model(input_ids=sentence[None, :2], attention_mask=torch.ones(1, 2, dtype=torch.long))
    batch = model(
        input_ids=torch.stack([right[0], right[0]]), attention_mask=torch.tensor([[1] * 2 + [0] * 7, [1] * 9])
    )
    torch.testing.assert_close(batch[:1], short, **close(short))


@pytest.mark.parametrize("name", STUDENTS)
def test_the_gradient_reaches_every_parameter(name):
    model = _student(name)
    ids = torch.randint(0, 40, (4, 12))
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[0, 4:] = 0
    model(input_ids=ids, attention_mask=mask).logsumexp(-1).sum().backward()
    for path, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), path
        assert parameter.grad.abs().sum() > 0, path


def _teacher_table(vocab=50, width=16):
    generator = torch.Generator().manual_seed(0)
    scales = torch.linspace(3.0, 0.1, width)  # distinct variances: the principal directions are unique
    basis, _ = torch.linalg.qr(torch.randn(width, width, generator=generator))
    return torch.randn(vocab, width, generator=generator) * scales @ basis.T + 0.5  # [V, H_t], off-centre


@pytest.mark.parametrize("name", STUDENTS)
def test_the_teacher_table_is_projected_on_its_top_principal_components(name):
    teacher = _teacher_table()
    student = init_from_teacher_embeddings(_student(name, embedding_dim=4), teacher)
    table = student.get_input_embeddings().weight.detach().double()  # [40, 4]
    centred = teacher[:40].double() - teacher[:40].double().mean(0)
    # table = centred @ components, with orthonormal components spanning the top 4 directions
    components = torch.linalg.lstsq(centred, table).solution  # [16, 4]
    torch.testing.assert_close(centred @ components, table, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        components.T @ components, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-5
    )
    top = torch.linalg.svdvals(centred)[:4]
    torch.testing.assert_close(torch.linalg.svdvals(table), top, rtol=1e-5, atol=1e-5)


def test_the_teacher_table_is_copied_when_the_widths_match_and_refused_when_narrower():
    teacher = _teacher_table()
    student = init_from_teacher_embeddings(_student("bilstm", embedding_dim=16), teacher)
    assert torch.equal(student.get_input_embeddings().weight, teacher[:40])
    with pytest.raises(ConfigError, match="embedding_dim 32 is wider than the teacher's 16"):
        init_from_teacher_embeddings(_student("kim_cnn", embedding_dim=32), teacher)
    with pytest.raises(ConfigError, match="does not cover the student's 60 token ids"):
        init_from_teacher_embeddings(_student("kim_cnn", vocab_size=60), teacher)
    with pytest.raises(ConfigError, match="MLP has no embedding table"):
        init_from_teacher_embeddings(build_model("mlp", num_classes=2, input_shape=(12,)), teacher)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("bilstm", {"hidden": 0}, "bilstm hidden must be a positive integer, got 0"),
        ("bilstm", {"layers": 1.5}, "bilstm layers must be a positive integer"),
        ("bilstm", {"dropout": 1.0}, r"bilstm dropout must be in \[0, 1\)"),
        ("kim_cnn", {"widths": []}, "kim_cnn widths must be a list of positive integers"),
        ("kim_cnn", {"widths": [3, 0]}, "kim_cnn widths must be a positive integer, got 0"),
        ("kim_cnn", {"filters": "many"}, "kim_cnn filters must be a positive integer"),
        ("kim_cnn", {"vocab_size": None}, "needs vocab_size"),
        ("kim_cnn", {"kernel": 3}, "unknown option"),
    ],
)
def test_a_bad_option_is_a_one_line_config_error(name, options, message):
    with pytest.raises(ConfigError, match=message) as error:
        _student(name, **options)
    assert "\n" not in str(error.value)


def test_an_image_input_shape_is_refused():
    with pytest.raises(ConfigError, match="reads token ids"):
        build_model("bilstm", num_classes=2, input_shape=(3, 32, 32), vocab_size=40)


def test_a_run_builds_a_text_student_over_the_datas_vocabulary_from_the_teachers_embeddings():
    info = SimpleNamespace(num_classes=3, input_shape=(12,), vocab_size=40)
    teacher = torch.nn.Embedding(40, 8)
    teacher.get_input_embeddings = lambda: teacher
    config = ModelConfig(arch="kim_cnn", kwargs={"embedding_dim": 8, "init_embeddings": "teacher"})
    student = build_named_model(config, info, "student", teacher=teacher)
    assert torch.equal(student.embedding.weight, teacher.weight)  # vocab_size 40 from the data, copied
    rebuilt = build_named_model(config, info, "student")  # no teacher: the architecture only
    assert rebuilt.embedding.weight.shape == (40, 8)
    with pytest.raises(ConfigError, match="init_embeddings must be 'teacher', got 'bert'"):
        build_named_model(ModelConfig(arch="kim_cnn", kwargs={"init_embeddings": "bert"}), info, "student")


transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
from test_transformers import _text_batches, _tiny_bert, _tiny_sst2  # noqa: E402


@torch.no_grad()
def _kl_to_teacher(teacher, student, loader):
    student.eval()
    total = 0.0
    for batch in loader:
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
        teacher_log_p = teacher(**inputs).logits.log_softmax(-1)
        student_log_p = student(**inputs).log_softmax(-1)
        total += torch.nn.functional.kl_div(
            student_log_p, teacher_log_p, log_target=True, reduction="sum"
        ).item()
    return total


@pytest.mark.parametrize("name", STUDENTS)
def test_a_tiny_bert_distils_into_a_text_student(name):
    from alambic import distill

    teacher = _tiny_bert(layers=2, labels=3)
    with torch.no_grad():
        teacher.classifier.weight.mul_(20)  # confident teacher outputs, far from a fresh student's
    student = init_from_teacher_embeddings(
        _student(name, embedding_dim=8), teacher.get_input_embeddings().weight
    )
    loader = _text_batches()
    before = _kl_to_teacher(teacher, student, loader)
    terms = [{"loss": "kd", "params": {"temperature": 1.0}}]
    trained = distill(teacher, student, loader, terms=terms, epochs=6, optimizer="adamw", lr=0.01)
    assert _kl_to_teacher(teacher, trained, loader) < 0.7 * before


def test_a_run_config_distils_into_a_bilstm_initialised_from_the_teachers_embeddings(tmp_path, monkeypatch):
    import alambic.run.building as building
    from alambic.config import config_from_dict
    from alambic.run.pipeline import run

    calls = []

    def spy(student, table):
        calls.append(tuple(table.shape))
        return init_from_teacher_embeddings(student, table)

    monkeypatch.setattr(building, "init_from_teacher_embeddings", spy)
    folder, data = _tiny_sst2(tmp_path)
    train = {"epochs": 1, "batch_size": 32, "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0}
    student = {"arch": "bilstm", "kwargs": {"embedding_dim": 8, "hidden": 8, "init_embeddings": "teacher"}}
    config = config_from_dict({
        "name": "sst2", "output_dir": str(tmp_path / "runs"), "stages": ["teacher", "distill"],
        "data": {"dataset": "sst2", "data_dir": str(data), "max_length": 16},
        "teacher": {"model": {"arch": f"hf:{folder}", "kwargs": {"local_files_only": True}}, "train": train},
        "student": {"model": student},
        "distill": {"train": train, "terms": [{"loss": "kd", "params": {"temperature": 2.0}}]},
    })  # fmt: skip
    run_dir = run(config)
    assert calls == [(40, 16)] * 2  # pre-flight and the distill stage, from the teacher's table
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "student" / "model.safetensors"))
    vocabulary = len((tmp_path / "vocab.txt").read_text().split())
    assert weights["embedding.weight"].shape == (vocabulary, 8)  # vocab_size from the data's tokenizer
