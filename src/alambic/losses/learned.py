"""Learned losses: methods whose loss owns parameters or state (regressors, variances, memory banks).

Each is an ``nn.Module`` class registered like a loss. The distiller builds one per term from the
shapes of a probing pass, ``cls(student_shape, teacher_shape, **hyper)`` (plus ``num_samples`` for
losses that keep per-sample state), trains it with the student, saves it in training checkpoints,
and never exports it with the student. Teacher values are always detached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alambic.losses.feature import same_spatial
from alambic.losses.registry import register_loss


def _channels(shape: tuple[int, ...], loss: str) -> int:
    if len(shape) != 4:
        raise ValueError(f"{loss} compares feature maps [B, C, H, W], got a value of shape {tuple(shape)}")
    return shape[1]


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.1),
    ]


@register_loss(
    "ft",
    inputs="features",
    paper="Kim et al. 2018, Paraphrasing Complex Network (Factor Transfer), arXiv:1802.04977",
)
class FactorTransferLoss(nn.Module):
    """Factor transfer: match L2-normalised "factors" from a teacher paraphraser and a student translator.

    The paraphraser is a small conv auto-encoder on the teacher feature (factor channels = ``rate`` x
    teacher channels); the translator maps the student feature to a factor of the same shape. ``loss =
    mean|F_s/||F_s|| - F_t/||F_t|||`` (p = 1, per sample over flattened factors) ``+ reconstruction_weight
    * mse(decoder(F_t), t) / mean(t^2)`` (relative, so scale-free). The paper trains the paraphraser
    first and freezes it; here it trains from step 0 on its reconstruction only (the factor loss does
    not reach it), which on fixed teacher features settles within the first epoch. The term's weight
    multiplies both parts: the default reconstruction weight 0.005 gives the paraphraser an effective
    weight of 1 at the factor weight of Tian et al.'s code (200).

    Args (built by the distiller): student_shape / teacher_shape ``(B, C, H, W)``; rate: factor channels per
    teacher channel (paper: 0.5); reconstruction_weight: weight of the paraphraser's reconstruction.
    """

    def __init__(
        self, student_shape, teacher_shape, *, rate: float = 0.5, reconstruction_weight: float = 0.005
    ):
        super().__init__()
        channels_student, channels_teacher = _channels(student_shape, "ft"), _channels(teacher_shape, "ft")
        factor = max(1, round(channels_teacher * rate))
        self.encoder = nn.Sequential(
            *_conv_bn_relu(channels_teacher, channels_teacher), *_conv_bn_relu(channels_teacher, factor)
        )
        self.decoder = nn.Sequential(
            *_conv_bn_relu(factor, channels_teacher),
            nn.Conv2d(channels_teacher, channels_teacher, 3, padding=1),
        )
        self.translator = nn.Sequential(
            *_conv_bn_relu(channels_student, channels_student), *_conv_bn_relu(channels_student, factor)
        )
        self.reconstruction_weight = reconstruction_weight

    def forward(self, student: Tensor, teacher: Tensor, *, labels: Tensor | None = None) -> Tensor:
        student, teacher = same_spatial(student, teacher.detach().float())
        factor_teacher = self.encoder(teacher)  # [B, F, H, W]
        reconstruction = F.mse_loss(self.decoder(factor_teacher), teacher) / teacher.pow(2).mean().clamp_min(
            1e-12
        )
        factor_student = F.normalize(self.translator(student.float()).flatten(1), dim=1)  # [B, F*H*W]
        factor_teacher = F.normalize(factor_teacher.detach().flatten(1), dim=1)
        return (factor_student - factor_teacher).abs().mean() + self.reconstruction_weight * reconstruction


@register_loss(
    "vid", inputs="features", paper="Ahn et al. 2019, Variational Information Distillation, arXiv:1904.05835"
)
class VariationalInformationLoss(nn.Module):
    """Variational information distillation: the teacher feature's negative log-likelihood under a Gaussian predicted from the student.

    ``mu = regressor(f_s)`` (1x1 conv, ReLU, 1x1 conv, ReLU, 1x1 conv; linear layers for vectors) and a
    learned per-channel variance ``sigma^2 = softplus(alpha) + eps``; ``loss = mean(0.5 * ((t - mu)^2 /
    sigma^2 + log sigma^2))``, a lower bound on the mutual information between the two features (up to
    constants). Its minimum is not zero: the ``log sigma^2`` term stays.

    Args (built by the distiller): student_shape / teacher_shape, maps ``(B, C, H, W)`` or vectors
    ``(B, D)``; init_variance: initial sigma^2 (paper: 5); eps: variance floor.
    """

    def __init__(self, student_shape, teacher_shape, *, init_variance: float = 5.0, eps: float = 1e-5):
        super().__init__()
        if len(student_shape) != len(teacher_shape) or len(student_shape) not in (2, 4):
            raise ValueError(
                f"vid compares two feature maps or two vectors, got {tuple(student_shape)} and {tuple(teacher_shape)}"
            )
        layer = (lambda i, o: nn.Conv2d(i, o, 1, bias=False)) if len(student_shape) == 4 else nn.Linear
        inner, outer = student_shape[1], teacher_shape[1]
        self.regressor = nn.Sequential(
            layer(inner, outer), nn.ReLU(), layer(outer, outer), nn.ReLU(), layer(outer, outer)
        )
        # softplus(alpha) + eps = init_variance
        self.alpha = nn.Parameter(torch.full((outer,), math.log(math.expm1(init_variance - eps))))
        self.eps = eps

    def forward(self, student: Tensor, teacher: Tensor, *, labels: Tensor | None = None) -> Tensor:
        teacher = teacher.detach().float()
        if student.dim() == 4:
            student, teacher = same_spatial(student, teacher)
        mean = self.regressor(student.float())
        variance = (F.softplus(self.alpha) + self.eps).view(1, -1, *([1] * (teacher.dim() - 2)))
        return (0.5 * ((teacher - mean).pow(2) / variance + variance.log())).mean()


@register_loss(
    "crd",
    inputs="embeddings",
    needs_index=True,
    paper="Tian et al. 2020, Contrastive Representation Distillation, arXiv:1910.10699",
)
class ContrastiveRepresentationLoss(nn.Module):
    """Contrastive representation distillation with its two memory banks (NCE with K negatives).

    Student and teacher embeddings (say ``fc:input``, the pooled features) go through learned linear
    heads to ``feature_dim`` and are L2-normalised. Two memory banks hold one embedding per training
    sample (momentum-updated at the batch's ``index``). For each sample, the positive is its own entry
    and ``num_negatives`` entries drawn uniformly are negatives; ``h = exp(v . m / T) / Z`` (Z estimated
    once, on the first training batch, as in the paper's code) and the NCE loss is ``-[log h_pos /
    (h_pos + K/N) + sum_neg log (K/N) / (h_neg + K/N)]``, per sample, averaged; once with the student
    anchored against the teacher bank and once the other way. Paper's weight: 0.8 (with ce at 1).

    Args (built by the distiller): student_shape ``(B, D_s)``; teacher_shape ``(B, D_t)``; num_samples:
    training set size (the bank size); feature_dim: embedding size (128); num_negatives: K (paper
    16384; must be below num_samples); temperature: T (0.07); momentum: bank update momentum (0.5).
    """

    def __init__(
        self,
        student_shape,
        teacher_shape,
        *,
        num_samples: int,
        feature_dim: int = 128,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
    ):
        super().__init__()
        if len(student_shape) != 2 or len(teacher_shape) != 2:
            raise ValueError(
                f"crd compares embedding vectors [B, D], got {tuple(student_shape)} and {tuple(teacher_shape)}; "
                "compare pooled features, e.g. student: fc:input"
            )
        if not 0 < num_negatives < num_samples:
            raise ValueError(
                f"crd draws num_negatives={num_negatives} from a bank of {num_samples} samples; "
                f"set num_negatives below {num_samples}"
            )
        self.student_head = nn.Linear(student_shape[1], feature_dim)
        self.teacher_head = nn.Linear(teacher_shape[1], feature_dim)
        bound = 1.0 / math.sqrt(feature_dim / 3)  # the paper's initial bank: uniform, about unit norm
        self.register_buffer("student_bank", torch.rand(num_samples, feature_dim) * 2 * bound - bound)
        self.register_buffer("teacher_bank", torch.rand(num_samples, feature_dim) * 2 * bound - bound)
        self.register_buffer("normalizers", torch.full((2,), -1.0))  # Z for each direction, set once
        self._normalizers_set = False
        self.num_negatives, self.temperature, self.momentum = num_negatives, temperature, momentum

    def _scores(self, anchor: Tensor, bank: Tensor, candidates: Tensor, direction: int) -> Tensor:
        """``exp(anchor . bank[candidates] / T) / Z`` for ``candidates [B, K+1]`` -> ``[B, K+1]``."""
        scores = torch.exp(torch.einsum("bkd,bd->bk", bank[candidates], anchor) / self.temperature)
        # Z: the paper's one-time Monte-Carlo estimate of the partition function. Whether it is set is
        # read from the buffer once (it may come from a checkpoint), then kept as a Python flag, so the
        # hot loop makes no host-device sync for it.
        if not self._normalizers_set:
            self._normalizers_set = bool((self.normalizers > 0).all())
        if self._normalizers_set:
            return scores / self.normalizers[direction]
        normalizer = scores.detach().mean() * bank.shape[0]
        if self.training:
            self.normalizers[direction] = normalizer
        return scores / normalizer

    def _nce(self, scores: Tensor) -> Tensor:
        noise = self.num_negatives / self.student_bank.shape[0]  # K * P_n with uniform noise 1 / N
        positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + 1e-7))  # [B]
        negatives = torch.log(noise / (scores[:, 1:] + noise + 1e-7)).sum(1)  # [B]
        return -(positive + negatives).mean()

    def forward(
        self, student: Tensor, teacher: Tensor, *, labels: Tensor | None = None, index: Tensor | None = None
    ) -> Tensor:
        if index is None:
            raise ValueError("crd needs the batch's sample indices (yield (inputs, labels, index) batches)")
        index = index.to(self.student_bank.device).long()
        student_embedding = F.normalize(self.student_head(student.float()), dim=1)  # [B, D]
        teacher_embedding = F.normalize(self.teacher_head(teacher.detach().float()), dim=1)  # [B, D]
        negatives = torch.randint(
            0, self.student_bank.shape[0], (index.shape[0], self.num_negatives), device=index.device
        )
        candidates = torch.cat([index[:, None], negatives], dim=1)  # [B, K+1], the positive first
        loss = self._nce(self._scores(student_embedding, self.teacher_bank, candidates, 0)) + self._nce(
            self._scores(teacher_embedding, self.student_bank, candidates, 1)
        )
        if self.training:
            with torch.no_grad():
                for bank, embedding in (
                    (self.student_bank, student_embedding),
                    (self.teacher_bank, teacher_embedding),
                ):
                    updated = bank[index] * self.momentum + embedding.detach() * (1 - self.momentum)
                    bank.index_copy_(0, index, F.normalize(updated, dim=1))
        return loss


class _AttentionFusion(nn.Module):
    """ReviewKD's attention-based fusion (ABF): merge a stage's feature with the fused deeper one."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels)
        )
        self.output = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None

    def forward(self, x: Tensor, deeper: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        x = self.reduce(x)  # [B, mid, H, W]
        if self.attention is not None:
            deeper = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            weights = self.attention(torch.cat([x, deeper], dim=1))  # [B, 2, H, W]
            x = x * weights[:, :1] + deeper * weights[:, 1:]
        residual = x
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.output(x), residual


def hierarchical_context_loss(student: list[Tensor], teacher: list[Tensor], levels=(4, 2, 1)) -> Tensor:
    """ReviewKD's HCL: per stage, MSE at full resolution plus pooled to 4x4, 2x2, 1x1 (weights 1/2, 1/4, ...).

    Levels not smaller than the map are skipped; each stage's sum is divided by its weights' sum
    (as in the authors' code), and the stages are added.
    """
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher):
        loss, weight, weights = F.mse_loss(s, t), 1.0, 1.0
        for level in levels:
            if level >= s.shape[-1]:
                continue
            weight /= 2
            loss = loss + weight * F.mse_loss(
                F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level)
            )
            weights += weight
        total = total + loss / weights
    return total


@register_loss(
    "review_kd",
    inputs="features",
    multi_feature=True,
    needs_epoch=True,
    paper="Chen et al. 2021, Distilling Knowledge via Knowledge Review, arXiv:2104.09044",
)
class KnowledgeReviewLoss(nn.Module):
    """Knowledge review: each teacher stage is matched by a fusion of the student's same and deeper stages.

    Student features ``f_1 .. f_n`` (shallow to deep) are fused from the deepest up by attention-based
    fusion (ABF: 1x1 conv to ``mid_channels``, attention-weighted sum with the fused deeper stage, 3x3
    conv to the teacher's channels), and each result is compared with the teacher's stage by the
    hierarchical context loss (MSE at full size and pooled to 4x4 / 2x2 / 1x1). The weight ramps up
    linearly over ``warmup_epochs`` (paper, CIFAR: weight 1, 20 of 240 epochs).

    Args (built by the distiller): student_shape / teacher_shape, lists of ``(B, C, H, W)`` of one
    length; mid_channels: fusion width (paper: 64 for ResNets); warmup_epochs: epochs of linear ramp.
    """

    def __init__(self, student_shape, teacher_shape, *, mid_channels: int = 64, warmup_epochs: float = 0.0):
        super().__init__()
        self.fusions = nn.ModuleList(
            _AttentionFusion(
                _channels(s, "review_kd"),
                mid_channels,
                _channels(t, "review_kd"),
                fuse=i < len(student_shape) - 1,
            )
            for i, (s, t) in enumerate(zip(student_shape, teacher_shape))
        )
        self.out_sizes = [tuple(t[-2:]) for t in teacher_shape]
        self.warmup_epochs = warmup_epochs

    def forward(
        self,
        student: list[Tensor],
        teacher: list[Tensor],
        *,
        labels: Tensor | None = None,
        epoch: float | None = None,
    ) -> Tensor:
        fused: list[Tensor] = []
        deeper = None
        for i in reversed(range(len(student))):  # deepest first
            out, deeper = self.fusions[i](student[i].float(), deeper, self.out_sizes[i])
            fused.insert(0, out)
        loss = hierarchical_context_loss(fused, [t.detach().float() for t in teacher])
        if self.warmup_epochs > 0 and epoch is not None:
            loss = loss * min(1.0, epoch / self.warmup_epochs)
        return loss
