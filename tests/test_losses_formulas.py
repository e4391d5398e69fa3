"""rkd, at and jsd against their papers' formulas written out plainly (float64, explicit index masks).

Each runs at batch 8 and at 64 and 128, past the 25 rows above which ``torch.cdist`` changes path.
The losses compute in float32 and the references in float64, so values compare with rtol AND atol
(float32 reductions may also differ in their last bits between AVX2 and AVX-512 kernels).
"""

import pytest
import torch

from alambic.losses import get_loss
from alambic.losses.relation import _distances_and_angles

BATCH_SIZES = [8, 64, 128]


def _randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _huber(x):
    return torch.where(x.abs() < 1, 0.5 * x**2, x.abs() - 0.5)


def _rkd_by_the_paper(student, teacher, distance_weight, angle_weight):
    """Park et al. 2019, eqs. (3)-(5): mu over the pairs i != j; cos of the angle at vertex i."""

    def relations(features):
        f = features.double().flatten(1)  # [B, D]
        size = f.shape[0]
        index = torch.arange(size)
        off_diagonal = index[:, None] != index[None, :]  # [B, B]: the pairs i != j, by index
        difference = f[None, :, :] - f[:, None, :]  # [i, j] = f_j - f_i
        distance = difference.pow(2).sum(-1).sqrt()  # [B, B]
        mu = distance[off_diagonal].sum() / (size * (size - 1))
        unit = torch.zeros_like(difference)
        unit[off_diagonal] = difference[off_diagonal] / distance[off_diagonal][:, None]  # e_ij; 0 if i == j
        cosine = torch.einsum("ijd,ikd->ijk", unit, unit)  # [i, j, k] = <e_ij, e_ik>
        return distance / mu, cosine

    distance_student, angle_student = relations(student)
    distance_teacher, angle_teacher = relations(teacher)
    # the means over all B^2 pairs and B^3 triplets (the authors' code, whose weights these are)
    return (
        distance_weight * _huber(distance_student - distance_teacher).mean()
        + angle_weight * _huber(angle_student - angle_teacher).mean()
    )


@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_rkd_equals_the_papers_formula_at_every_batch_size(batch):
    # an offset makes cdist's matrix-product path (above 25 rows) leave its diagonal far from 0
    student = _randn(batch, batch, 3, 2, 2) + 5.0
    teacher = _randn(batch + 1, batch, 5, 2, 2) * 3.0
    value = get_loss("rkd")(student, teacher, distance_weight=25.0, angle_weight=50.0)
    expected = _rkd_by_the_paper(student, teacher, 25.0, 50.0)
    torch.testing.assert_close(value.double(), expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_rkd_normalises_by_the_mean_over_exactly_the_off_diagonal_pairs(batch):
    features = _randn(batch, batch, 12) + 20.0  # large norms: cdist's diagonal is 1e-3 to 1e-2 here
    distances, _ = _distances_and_angles(features)
    off_diagonal = ~torch.eye(batch, dtype=torch.bool)
    assert torch.equal(distances.diagonal(), torch.zeros(batch))  # exactly 0, whatever the batch size
    # mean over the B (B - 1) pairs i != j of d / mu is 1 by construction; counting the diagonal, or
    # dropping coincident samples, would not give 1
    mean = distances[off_diagonal].double().mean()
    torch.testing.assert_close(mean, torch.tensor(1.0, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_rkd_counts_coincident_samples_in_its_mean_and_stays_differentiable():
    # rows a, a, b: the pairs i != j are (a, a) twice at distance 0 and (a, b) four times at distance 5,
    # so mu = 4 * 5 / 6; a mask by value (d > 0) would give mu = 5
    rows = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]], requires_grad=True)
    distances, angles = _distances_and_angles(rows)
    expected = torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, 5.0], [5.0, 5.0, 0.0]]) / (20.0 / 6.0)
    torch.testing.assert_close(distances, expected, rtol=1e-6, atol=1e-7)
    get_loss("rkd")(rows, torch.randn(3, 2, generator=torch.Generator().manual_seed(0))).backward()
    assert torch.isfinite(rows.grad).all()


def _attention_transfer_by_the_paper(student, teacher, power):
    """Zagoruyko & Komodakis 2017: a = mean_c |f|^p per position, L2-normalised; the mean squared difference."""

    def attention(features):
        f = features.double()
        maps = f.abs().pow(power).mean(1).flatten(1)  # [B, H*W]
        return maps / maps.pow(2).sum(1, keepdim=True).sqrt()

    return (attention(student) - attention(teacher)).pow(2).mean()


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("power", [2.0, 3.0, 1.5])
def test_at_equals_the_papers_formula_on_signed_features(batch, power):
    # signed (pre-activation) features: f^p would flip signs for odd p and be NaN for fractional p
    student, teacher = _randn(batch, batch, 3, 4, 4), _randn(batch + 1, batch, 5, 4, 4)
    value = get_loss("at")(student, teacher, power=power)
    assert torch.isfinite(value)
    expected = _attention_transfer_by_the_paper(student, teacher, power)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-8)


def test_at_refuses_a_power_below_one():
    with pytest.raises(ValueError, match="power must be >= 1"):
        get_loss("at")(_randn(0, 2, 3, 4, 4), _randn(1, 2, 3, 4, 4), power=0.5)


def _jsd_by_the_paper(student, teacher, labels, beta, temperature):
    """GKD (Agarwal et al. 2024), eq. (1), token by token; position t counts when labels[t + 1] != -100."""
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1] - 1):
            if labels[b, t + 1] == -100:
                continue
            p_s = torch.softmax(student[b, t].double() / temperature, -1)
            p_t = torch.softmax(teacher[b, t].double() / temperature, -1)
            mixture = beta * p_t + (1 - beta) * p_s
            divergence = (
                beta * (p_t * (p_t / mixture).log()).sum() + (1 - beta) * (p_s * (p_s / mixture).log()).sum()
            )
            total, count = total + divergence, count + 1
    return temperature**2 * total / count  # the T^2 of every temperature-scaled KL in alambic


@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_jsd_equals_the_gkd_formula_times_t_squared(batch):
    student, teacher = _randn(batch, batch, 3, 7) * 2, _randn(batch + 1, batch, 3, 7) * 2
    labels = torch.randint(0, 7, (batch, 3), generator=torch.Generator().manual_seed(batch))
    labels[0, 1:] = -100  # a sample that counts no token
    labels[-1, 2] = -100
    value = get_loss("jsd")(student, teacher, labels=labels, beta=0.3, temperature=2.0)
    expected = _jsd_by_the_paper(student, teacher, labels, beta=0.3, temperature=2.0)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("batch", [8, 64])
def test_cc_equals_its_gaussian_kernel_formula(batch):
    """Peng et al. 2019 with the exact kernel: C_ij = exp(-gamma ||u_i - u_j||^2) on unit rows; ||C_t - C_s||^2 / B^2."""
    student, teacher = _randn(batch, batch, 3, 2, 2), _randn(batch + 1, batch, 7)

    def correlation(features):
        unit = features.double().flatten(1)
        unit = unit / unit.pow(2).sum(1, keepdim=True).sqrt()
        squared = (unit[:, None, :] - unit[None, :, :]).pow(2).sum(-1)  # [B, B], 0 on the diagonal
        return torch.exp(-0.4 * squared)

    expected = (correlation(teacher) - correlation(student)).pow(2).sum() / batch**2
    value = get_loss("cc")(student, teacher, gamma=0.4)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-8)
