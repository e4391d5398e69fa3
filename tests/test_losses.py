"""Loss math: golden values computed by hand, the paper's identities, and registry-wide properties."""

import math

import pytest
import torch
import torch.nn.functional as F

from alambic.errors import ConfigError
from alambic.losses import build_loss, check_hyper_parameters, get_loss, get_loss_spec, list_losses

# Float comparisons: a relative AND an absolute tolerance wherever arithmetic does not guarantee
# equality (float32 against a float64 reference, or two reductions in different orders): BLAS and
# vectorised kernels differ in the last bits between AVX2 and AVX-512 CPUs.

ALL_LOSSES = [spec.name for spec in list_losses()]


def _inputs(seed=0, batch=4, classes=5):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=generator)
    teacher = torch.randn(batch, classes, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    return student, teacher, labels


def _inputs_for(spec, seed=0, batch=4):
    """Logits [B, 5], embeddings [B, 6] / [B, 8], feature maps [B, 3, 5, 5], lists of maps, tokens [B, 6, 11]..."""
    student, teacher, labels = _inputs(seed, batch)
    generator = torch.Generator().manual_seed(seed + 100)
    if spec.multi_feature:
        student = [torch.randn(batch, 3, size, size, generator=generator) for size in (8, 4)]
        teacher = [torch.randn(batch, 3, size, size, generator=generator) for size in (8, 4)]
    elif spec.inputs == "features":
        student = torch.randn(batch, 3, 5, 5, generator=generator)
        teacher = torch.randn(batch, 3, 5, 5, generator=generator)
    elif spec.inputs == "tokens":  # [B, T, V] logits, labels with padding / prompt tokens masked
        student = torch.randn(batch, 6, 11, generator=generator)
        teacher = torch.randn(batch, 6, 11, generator=generator)
        labels = torch.randint(0, 11, (batch, 6), generator=generator)
        labels[0, :2] = -100
    elif spec.inputs in ("hidden", "values"):  # [B, T, D] (D = 24: 12 heads of 2 for value relations)
        student = torch.randn(batch, 4, 24, generator=generator)
        teacher = torch.randn(batch, 4, 24, generator=generator)
    elif spec.inputs == "attention":  # [B, H, T, T], rows are distributions
        student = torch.randn(batch, 3, 4, 4, generator=generator).softmax(-1)
        teacher = torch.randn(batch, 3, 4, 4, generator=generator).softmax(-1)
    elif spec.inputs == "embeddings":
        student = torch.randn(batch, 6, generator=generator)
        teacher = torch.randn(batch, 8, generator=generator)
    return student, teacher, labels


def _shape(value):
    return [tuple(v.shape) for v in value] if isinstance(value, list) else tuple(value.shape)


def _call(spec, student, teacher, labels, **params):
    """Build the loss (a learned one from the shapes, with a bank of at least 16 samples) and call it as the loop does."""
    if spec.learned and spec.name == "crd":
        params.setdefault("num_negatives", 8)
    num_samples = max(16, len(labels))
    loss = build_loss(
        spec.name,
        params,
        student_shape=_shape(student),
        teacher_shape=_shape(teacher),
        num_samples=num_samples,
    )
    state = {"epoch": 1.0} if spec.needs_epoch else {}
    if spec.needs_index:
        state["index"] = torch.arange(len(labels))
    return loss(student, teacher if spec.needs_teacher else None, labels=labels, **state)


def _requires_grad(value):
    for item in value if isinstance(value, list) else [value]:
        item.requires_grad_(True)


def _grad_sum(value):
    return sum(item.grad.abs().sum() for item in (value if isinstance(value, list) else [value]))


# a tiny batch and one past the sizes where kernels switch paths (torch.cdist uses a matrix product
# above 25 rows), so code that changes with the batch size is covered for every loss
BATCH_SIZES = [4, 64]


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_every_loss_is_a_finite_scalar_with_gradient_to_the_student_only(name, batch):
    spec = get_loss_spec(name)
    student, teacher, labels = _inputs_for(spec, batch=batch)
    _requires_grad(student)
    _requires_grad(teacher)
    value = _call(spec, student, teacher, labels)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert _grad_sum(student) > 0
    assert all(item.grad is None for item in (teacher if isinstance(teacher, list) else [teacher]))


# losses whose minimum is not at student == teacher, with where it is (tested below)
MINIMUM_ELSEWHERE = {
    "ab": "a margin hinge: zero once every neuron is on the teacher's side by the margin",
    "vid": "a Gaussian likelihood: its log-variance term stays; the optimal variance is the residual's",
    "crd": "contrastive: lowest when each student embedding is closest to its own teacher entry",
    "ft": "learned translator and paraphraser: zero only once they agree",
    "review_kd": "learned fusion: zero only once the fused student features equal the teacher's",
}


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize(
    "name", [s.name for s in list_losses() if s.needs_teacher and s.name not in MINIMUM_ELSEWHERE]
)
def test_every_teacher_loss_is_zero_when_student_equals_teacher(name, batch):
    spec = get_loss_spec(name)
    student, _, labels = _inputs_for(spec, batch=batch)
    copy = [item.clone() for item in student] if isinstance(student, list) else student.clone()
    value = _call(spec, student, copy, labels)
    assert value.item() == pytest.approx(0.0, abs=1e-6)


def test_every_learned_loss_names_its_minimum():
    learned = {spec.name for spec in list_losses() if spec.learned}
    assert learned <= set(MINIMUM_ELSEWHERE)


def test_kd_golden_value_by_hand():
    student = torch.tensor([[1.0, 2.0, 3.0]])
    teacher = torch.tensor([[3.0, 1.0, 0.0]])
    temperature = 2.0
    # by hand: p = softmax(z / T); KL(p_t || p_s) * T^2
    p_s = [math.exp(v / temperature) for v in (1.0, 2.0, 3.0)]
    p_t = [math.exp(v / temperature) for v in (3.0, 1.0, 0.0)]
    p_s = [v / sum(p_s) for v in p_s]
    p_t = [v / sum(p_t) for v in p_t]
    expected = sum(t * math.log(t / s) for t, s in zip(p_t, p_s)) * temperature**2
    assert expected == pytest.approx(2.0738, abs=1e-4)  # the literal, computed once by hand
    assert get_loss("kd")(student, teacher, temperature=temperature).item() == pytest.approx(
        expected, rel=1e-5, abs=1e-7
    )


def test_kd_averages_over_samples_not_elements():
    # KLDiv "mean" would divide by B*C; "batchmean" by B. Two identical rows must give the one-row value.
    student, teacher, _ = _inputs(batch=1)
    one = get_loss("kd")(student, teacher, temperature=3.0)
    two = get_loss("kd")(student.repeat(2, 1), teacher.repeat(2, 1), temperature=3.0)
    assert two.item() == pytest.approx(one.item(), rel=1e-5, abs=1e-7)


def test_kd_gradient_is_p_student_minus_p_teacher_over_t_before_the_t_squared_scale():
    temperature = 5.0
    student, teacher, _ = _inputs(batch=3, classes=7)
    student.requires_grad_(True)
    get_loss("kd")(student, teacher, temperature=temperature).backward()
    p_s = F.softmax(student.detach() / temperature, dim=-1)
    p_t = F.softmax(teacher / temperature, dim=-1)
    expected = (p_s - p_t) / temperature * temperature**2 / student.shape[0]
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-7)


def test_kd_direction_is_teacher_to_student():
    # KL(p_t || p_s) differs from KL(p_s || p_t): swapping the arguments must change the value.
    student, teacher, _ = _inputs(batch=2, classes=4)
    forward = get_loss("kd")(student, teacher, temperature=1.0)
    p_s, p_t = F.softmax(student, -1), F.softmax(teacher, -1)
    expected = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    assert forward.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert get_loss("kd")(teacher, student, temperature=1.0).item() != pytest.approx(forward.item(), rel=1e-3)


def test_kd_rejects_non_positive_temperature_and_shape_mismatch():
    student, teacher, _ = _inputs()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        get_loss("kd")(student, teacher, temperature=0.0)
    with pytest.raises(ValueError, match="same number of classes"):
        get_loss("kd")(student, teacher[:, :3], temperature=1.0)


def test_ce_golden_value_and_label_smoothing():
    student = torch.tensor([[2.0, 0.0, 0.0]])
    labels = torch.tensor([0])
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert get_loss("ce")(student, None, labels=labels).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert expected == pytest.approx(0.2395, abs=1e-4)
    # smoothing 0.3 over 3 classes: target (0.8, 0.1, 0.1)
    log_p = [2 - math.log(math.exp(2) + 2), -math.log(math.exp(2) + 2), -math.log(math.exp(2) + 2)]
    smoothed = -(0.8 * log_p[0] + 0.1 * log_p[1] + 0.1 * log_p[2])
    value = get_loss("ce")(student, None, labels=labels, label_smoothing=0.3)
    assert value.item() == pytest.approx(smoothed, rel=1e-5, abs=1e-7)


def test_logit_mse_golden_value():
    student = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert get_loss("logit_mse")(student, teacher).item() == pytest.approx(
        2.25, rel=1e-6, abs=0
    )  # exact: small integers


def test_unknown_loss_names_close_matches_and_the_list():
    with pytest.raises(ConfigError, match="did you mean kd") as info:
        get_loss("kdd")
    assert "logit_mse" in str(info.value)


def test_unknown_hyper_parameter_names_the_valid_ones():
    with pytest.raises(ConfigError, match="temperature"):
        check_hyper_parameters("kd", {"temprature": 4})
    check_hyper_parameters("kd", {"temperature": 4})


def test_registering_the_same_name_twice_fails():
    from alambic.losses import register_loss

    with pytest.raises(ValueError, match="already registered"):
        register_loss("kd")(lambda student, teacher, *, labels=None: student.sum())


def test_dkd_decomposes_classical_kd_as_in_the_paper():
    # Zhao et al. 2022, eq. (4): KD = TCKD + (1 - p_t^target) * NCKD (per sample; T applied to both)
    student, teacher, labels = _inputs(seed=3, batch=1, classes=6)
    temperature = 3.0
    p_teacher_target = F.softmax(teacher / temperature, dim=-1)[0, labels[0]].item()
    dkd = get_loss("dkd")(
        student,
        teacher,
        labels=labels,
        temperature=temperature,
        warmup_epochs=0,
        target_weight=1.0,
        non_target_weight=1.0 - p_teacher_target,
    )
    kd = get_loss("kd")(student, teacher, temperature=temperature)
    assert dkd.item() == pytest.approx(kd.item(), rel=1e-5, abs=1e-7)


def test_dkd_warms_up_linearly_with_the_epoch():
    student, teacher, labels = _inputs(seed=4)
    full = get_loss("dkd")(student, teacher, labels=labels, epoch=40.0)
    assert get_loss("dkd")(student, teacher, labels=labels, epoch=5.0).item() == pytest.approx(
        full.item() / 4,
        rel=1e-6,
        abs=1e-9,  # a ramp of 1/4: one multiplication, rounded once
    )
    assert get_loss_spec("dkd").needs_epoch and "epoch" not in get_loss_spec("dkd").hyper_parameters


def test_dist_matches_its_formula_written_with_numpy():
    import numpy as np

    student, teacher, _ = _inputs(seed=5, batch=4, classes=5)
    p_s = np.exp(student.numpy()) / np.exp(student.numpy()).sum(1, keepdims=True)
    p_t = np.exp(teacher.numpy()) / np.exp(teacher.numpy()).sum(1, keepdims=True)
    inter = 1 - np.mean([np.corrcoef(p_s[i], p_t[i])[0, 1] for i in range(4)])
    intra = 1 - np.mean([np.corrcoef(p_s[:, c], p_t[:, c])[0, 1] for c in range(5)])
    value = get_loss("dist")(student, teacher, inter_weight=2.0, intra_weight=0.5)
    assert value.item() == pytest.approx(2.0 * inter + 0.5 * intra, rel=1e-4, abs=1e-7)


def test_dist_depends_on_relations_not_scale():
    # a student that equals the teacher has zero loss at any temperature; another one does not
    student, teacher, _ = _inputs(seed=6)
    assert get_loss("dist")(teacher, teacher, temperature=2.0).item() == pytest.approx(0.0, abs=1e-4)
    assert get_loss("dist")(student, teacher).item() > 0.01


def test_kd_logit_std_ignores_each_sample_s_logit_scale_and_shift():
    student, teacher, _ = _inputs(seed=7)
    scale = torch.tensor([[0.5], [2.0], [3.0], [10.0]])
    shift = torch.tensor([[1.0], [-4.0], [0.0], [7.0]])
    plain = get_loss("kd_logit_std")(student, teacher, temperature=2.0)
    moved = get_loss("kd_logit_std")(student * scale + shift, teacher * 3 - 1, temperature=2.0)
    assert moved.item() == pytest.approx(plain.item(), rel=1e-4, abs=1e-7)
    # and it is not plain KD, which does see the scale
    scaled_kd = get_loss("kd")(student * 5, teacher, temperature=2.0).item()
    assert get_loss("kd_logit_std")(student * 5, teacher, temperature=2.0).item() < 0.5 * scaled_kd


def test_tf_kd_golden_value_by_hand():
    student = torch.tensor([[2.0, 0.0, 0.0]])
    labels = torch.tensor([0])
    # virtual teacher (0.8, 0.1, 0.1) at T = 1; KL(q || softmax(student)) by hand
    p_s = [math.exp(2) / (math.exp(2) + 2), 1 / (math.exp(2) + 2), 1 / (math.exp(2) + 2)]
    q = [0.8, 0.1, 0.1]
    expected = sum(qi * math.log(qi / pi) for qi, pi in zip(q, p_s))
    assert expected == pytest.approx(0.000513, abs=1e-6)
    value = get_loss("tf_kd")(student, None, labels=labels, correct_probability=0.8, temperature=1.0)
    assert value.item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="correct_probability"):
        get_loss("tf_kd")(student, None, labels=labels, correct_probability=0.2)


def _maps(seed, shape=(4, 3, 6, 6)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_attention_transfer_golden_value_and_pooling():
    student = torch.tensor([[[[1.0, 2.0]]]])  # [1, 1, 1, 2]: a = normalize([1, 4])
    teacher = torch.tensor([[[[2.0, 1.0]]]])  # a = normalize([4, 1])
    assert get_loss("at")(student, teacher).item() == pytest.approx(9 / 17, rel=1e-5, abs=1e-7)
    # channel counts may differ, and a larger teacher map is pooled to the student's size
    assert torch.isfinite(get_loss("at")(_maps(0, (2, 3, 4, 4)), _maps(1, (2, 8, 8, 8))))


def test_fitnet_is_mse_and_needs_equal_shapes():
    student, teacher = _maps(2), _maps(3)
    assert get_loss("fitnet")(student, teacher).item() == pytest.approx(
        F.mse_loss(student, teacher).item(), rel=1e-6, abs=1e-9
    )
    with pytest.raises(ValueError, match="connector"):
        get_loss("fitnet")(student, _maps(3, (4, 5, 6, 6)))


@pytest.mark.parametrize(
    ("name", "transform"),
    [
        ("sp", lambda x: 3.0 * x),  # the row-normalised Gram matrix ignores a global scale
        (
            "pkt",
            lambda x: x * torch.tensor([1.0, 2.0, 0.5, 7.0]).view(4, 1, 1, 1),
        ),  # cosine: per-sample scale
        ("rkd", lambda x: 5.0 * x + 2.0),  # distances normalised by their mean; angles scale-free
        ("nst", lambda x: x * torch.tensor([1.0, 3.0, 0.2]).view(1, 3, 1, 1)),  # each channel map normalised
    ],
)
def test_relation_and_selectivity_losses_ignore_what_their_papers_say_they_ignore(name, transform):
    student, teacher = _maps(4), _maps(5)
    plain = get_loss(name)(student, teacher).item()
    assert plain > 1e-4
    assert get_loss(name)(transform(student), teacher).item() == pytest.approx(plain, rel=1e-4, abs=1e-7)


def test_sp_matches_its_formula_written_with_numpy():
    import numpy as np

    student, teacher = _maps(6, (3, 2, 2, 2)), _maps(7, (3, 4, 2, 2))
    s, t = student.reshape(3, -1).numpy(), teacher.reshape(3, -1).numpy()
    g_s, g_t = s @ s.T, t @ t.T
    g_s = g_s / np.linalg.norm(g_s, axis=1, keepdims=True)
    g_t = g_t / np.linalg.norm(g_t, axis=1, keepdims=True)
    expected = ((g_t - g_s) ** 2).sum() / 9
    assert get_loss("sp")(student, teacher).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_activation_boundary_penalises_only_the_wrong_side_of_the_margin():
    teacher = torch.tensor([[1.0, -1.0, 2.0, -3.0]])
    student = torch.tensor([[2.0, -2.0, 0.5, 0.5]])  # right, right, on but inside the margin, wrongly on
    # (0.5 - 1)^2 for the third neuron, (0.5 + 1)^2 for the fourth
    assert get_loss("ab")(student, teacher, margin=1.0).item() == pytest.approx(
        2.5, rel=1e-6, abs=0
    )  # exact: halves and quarters
    teacher = _maps(8)
    beyond_the_margin = teacher.sign() * (teacher.abs() + 1.0)
    assert get_loss("ab")(beyond_the_margin, teacher, margin=1.0).item() == 0.0  # exact: every mask is False


def test_correlation_congruence_golden_value_and_width_independence():
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # orthogonal: ||u - v||^2 = 2
    teacher = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # identical: distance 0
    # C_s off-diagonal exp(-0.4 * 2), C_t off-diagonal 1; two off-diagonal entries, / B^2 = 4
    expected = 2 * (1 - math.exp(-0.8)) ** 2 / 4
    assert get_loss("cc")(student, teacher).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
