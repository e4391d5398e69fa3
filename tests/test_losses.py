"""Loss math: golden values computed by hand, the paper's identities, and registry-wide properties."""

import math

import pytest
import torch
import torch.nn.functional as F

from alambic.errors import ConfigError
from alambic.losses import check_hyper_parameters, get_loss, get_loss_spec, list_losses

ALL_LOSSES = [spec.name for spec in list_losses()]


def _inputs(seed=0, batch=4, classes=5):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=generator)
    teacher = torch.randn(batch, classes, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    return student, teacher, labels


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_every_loss_is_a_finite_scalar_with_gradient_to_the_student_only(name):
    spec = get_loss_spec(name)
    student, teacher, labels = _inputs()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    value = spec.fn(student, teacher if spec.needs_teacher else None, labels=labels)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None  # nothing flows into the teacher


@pytest.mark.parametrize("name", [spec.name for spec in list_losses() if spec.needs_teacher])
def test_every_teacher_loss_is_zero_when_student_equals_teacher(name):
    student, _, labels = _inputs()
    value = get_loss(name)(student, student.clone(), labels=labels)
    assert value.item() == pytest.approx(0.0, abs=1e-6)


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
        expected, rel=1e-5
    )


def test_kd_averages_over_samples_not_elements():
    # KLDiv "mean" would divide by B*C; "batchmean" by B. Two identical rows must give the one-row value.
    student, teacher, _ = _inputs(batch=1)
    one = get_loss("kd")(student, teacher, temperature=3.0)
    two = get_loss("kd")(student.repeat(2, 1), teacher.repeat(2, 1), temperature=3.0)
    assert two.item() == pytest.approx(one.item(), rel=1e-6)


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
    assert forward.item() == pytest.approx(expected.item(), rel=1e-5)
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
    assert get_loss("ce")(student, None, labels=labels).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.2395, abs=1e-4)
    # smoothing 0.3 over 3 classes: target (0.8, 0.1, 0.1)
    log_p = [2 - math.log(math.exp(2) + 2), -math.log(math.exp(2) + 2), -math.log(math.exp(2) + 2)]
    smoothed = -(0.8 * log_p[0] + 0.1 * log_p[1] + 0.1 * log_p[2])
    value = get_loss("ce")(student, None, labels=labels, label_smoothing=0.3)
    assert value.item() == pytest.approx(smoothed, rel=1e-6)


def test_logit_mse_golden_value():
    student = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert get_loss("logit_mse")(student, teacher).item() == pytest.approx((1 + 4 + 0 + 4) / 4)


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
