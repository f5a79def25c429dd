"""UNIFORM: unsupervised transfer from many predictive + descriptive teachers by feature and logit voting.

Wang, Zhuang, Chen, Huang, Li, Lyu, "UNIFORM: Unifying Knowledge from Large-scale and Diverse Pre-trained
Models", arXiv 2508.19498 (docs/methods.md; constants marked [G] there are this module's defaults)::

    u_i = f^e_i(x^t_i) ∈ R^D,  r_i = f^d_i(u_i)                        per-teacher encoder / decoder
    x̂   = disjoint mean of the u_i agreeing with the elected sign       (voting.sign_vote)
    ℓ_feature = dist(x, x̂)                                             MSE over D (U1)
    ℓ_rec     = mean_i ‖r_i − x^t_i‖_2 over valid teachers              (U7)
    q_i = zero-pad σ(z^t_i/τ);  ĉ = argmax vote share;  p̂ = mean_i q_i (Case A) or CFL concat (Case B)
    ℓ_logit = −α1 p̂_ĉ log p_ĉ − α2 Σ_{c≠ĉ} p̂_c log p_c                 CE form (U11), p = σ(z_s/τ)
    L = ℓ_logit + β1 ℓ_feature + β2 ℓ_rec

Shapes: student ``x [B, D]``, ``z_s [B, C]``; stacked teachers ``u [B, N, D]``, ``z [B, P, C]``. No labels
are used (``labels`` only feeds the ``pseudo_acc`` diagnostic). Descriptive/sentinel teachers enter the
feature vote and ℓ_rec only. Every row-wise term is averaged over the rows that have at least one valid
teacher for it.

Teachers with the same ``d_t`` form one group: their encoders / decoders are one ``heads.GroupedMLP``
(``GroupedLinear`` for ``head="linear"``) applied to the group's stacked features ``x^t [T, B, d_t]`` in one
batched op, and their z-score statistics are ``[T, d_t]`` buffers; ``u`` is the groups' ``[T, B, D]``
concatenated (group order: the votes and means do not depend on the order). State-dict keys:
``encoders.d<d_t>.fc1.weight [T, d_t, h]`` ...; checkpoints of per-teacher heads (``encoders.<id>.0.weight``)
load through ``legacy_params``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kt_train.methods.base import Method, MethodDims, StudentOutput, TeacherBatch
from kt_train.methods.common import log_probs, masked_mean, safe_key, stacked_teacher_logits, zero_invalid
from kt_train.methods.heads import LegacyParam, group_by, grouped_head, legacy_layout, reset_member
from kt_train.methods.options import MethodOptions
from kt_train.methods.voting import (
    concat_logit_target,
    coverage_shares,
    mean_prob_target,
    plain_mean,
    pseudo_class,
    sign_vote,
    soft_votes,
    uniform_logit_rows,
    vote_counts,
)


# The default MLP width caps at 512: with a 2048-wide student (ResNet-50) width D makes 100 teachers' heads 1.2 B
# parameters (18 GiB under AdamW); on the digits zoo with D = 2048, 512 scores within the seeds' spread of D
# (docs/benchmarks.md, "UNIFORM's head width with a 2048-wide student"). Students with D <= 512 are unchanged.
DEFAULT_HIDDEN = 512


@dataclass(frozen=True)
class AvgOptions(MethodOptions):
    """Options shared by AVG and UNIFORM (docs/methods.md)."""

    beta1: float = 1.0                                   # weight of ℓ_feature
    beta2: float = 1.0                                   # weight of ℓ_rec
    tau: float = 1.0                                     # temperature of q_i, p̂ and the student (no τ²)
    dist: Literal["mse", "l2", "cos"] = "mse"            # ℓ_feature distance (U1)
    target: Literal["auto", "mean_prob", "concat_logits"] = "auto"   # p̂: auto = concat iff coverages differ
    rec_reduction: Literal["mean", "sum"] = "mean"       # ℓ_rec over teachers (U7)
    head: Literal["mlp", "linear", "identity"] = "mlp"   # encoder/decoder (U9); identity needs d_t = D
    hidden: int | None = None                            # MLP width; None = min(D, DEFAULT_HIDDEN)
    latent_norm: bool = False                            # LayerNorm (no affine) on u_i: collapse guard
    detach_target: bool = False                          # sg(x̂): encoders trained by ℓ_rec only (U8)
    zscore: bool = True                                  # z-score cached x^t with store stats (U13)
    standardize: bool = False                            # logit standardization of teacher logits

    def validate(self, method: str = "") -> None:
        self._require(self.tau > 0, method, f"tau must be > 0, got {self.tau}")
        self._require(self.hidden is None or self.hidden > 0, method, f"hidden must be > 0, got {self.hidden}")


@dataclass(frozen=True)
class UniformOptions(AvgOptions):
    """UNIFORM options: AVG's plus the two votes."""

    alpha1: float = 1.0                                  # weight of the pseudo-class term
    alpha2: float = 0.5                                  # weight of the other classes (1.0 = voting off)
    feature_vote: bool = True                            # sign voting (False: plain mean, AVG)
    logit_vote: bool = True                              # pseudo-class weights (False: α1 = α2 = 1)
    tie_break: Literal["literal", "sum"] = "literal"     # sign ties (U3)
    pseudo_tie: Literal["p_hat", "index"] = "p_hat"      # pseudo-class ties (U12)
    p_hat_from: Literal["all", "agreeing"] = "all"       # p̂ from all valid or only ĉ-voters (U4)
    vote_norm: Literal["auto", "count", "coverage", "soft_coverage"] = "auto"   # ĉ: raw votes (paper), votes or
    #   probability mass per covering teacher; auto = soft_coverage iff coverages differ (docs/methods.md)


def feature_distance_rows(x: Tensor, x_hat: Tensor, dist: str) -> Tensor:
    """Per-row ``dist(x, x̂)`` ``[B]``: mean squared error over D, L2 norm, or ``1 − cos``."""
    if dist == "mse":
        return (x - x_hat).pow(2).mean(-1)
    if dist == "l2":
        return torch.linalg.vector_norm(x - x_hat, dim=-1)
    return 1.0 - F.cosine_similarity(x, x_hat, dim=-1, eps=1e-8)


def reconstruction_rows(rs: Sequence[Tensor], xs: Sequence[Tensor], valid: Tensor, reduction: str = "mean") -> Tensor:
    """``ℓ_rec`` per row ``[B]``: mean (or sum) over valid teachers of ``‖r_i − x^t_i‖_2``.

    Args: ``rs``/``xs`` per-teacher decoded features and targets ``[B, d_i]``; ``valid [B, N]`` bool.
    """
    norms = torch.stack([torch.linalg.vector_norm(r - x, dim=-1) for r, x in zip(rs, xs)], 1)   # [B, N]
    return reconstruction_from_norms(norms, valid, reduction)


def reconstruction_from_norms(norms: Tensor, valid: Tensor, reduction: str = "mean") -> Tensor:
    """``ℓ_rec`` per row ``[B]`` from ``norms [B, N] = ‖r_i − x^t_i‖_2``: mean (or sum) over valid teachers."""
    total = torch.where(valid, norms, torch.zeros_like(norms)).sum(1)
    return total / valid.sum(1).clamp_min(1) if reduction == "mean" else total


class _ZScore(nn.Module):
    """Per-dimension ``(x − μ_t) / σ_t`` of a group, ``x [T, B, d]``, with the store's feature statistics
    ``mean``/``std [T, d]`` (buffers, saved with the method)."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("std", std.detach().float().clamp_min(1e-6).clone())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean[:, None]) / self.std[:, None]


class Uniform(Method):
    """UNIFORM (and, with voting off, AVG); see the module docstring for the formula."""

    name = "uniform"
    Options = UniformOptions
    needs = frozenset({"features", "logits"})
    summary = "UNIFORM: feature and logit voting over predictive and descriptive teachers"
    requires = frozenset({"predictive_logits", "features"})
    alternatives = {"predictive_logits": "turn logit voting off with --opt logit_vote=false"}

    @classmethod
    def requirements(cls, options: MethodOptions) -> frozenset[str]:
        """Logit voting off (``logit_vote=false``): the logit term needs no predictive teacher."""
        return cls.requires if getattr(options, "logit_vote", True) else cls.requires - {"predictive_logits"}

    def __init__(self, options: AvgOptions, dims: MethodDims) -> None:
        super().__init__(options, dims)
        o = options
        self.feature_vote = getattr(o, "feature_vote", False)
        self.logit_vote = getattr(o, "logit_vote", False)
        self.alphas = (o.alpha1, o.alpha2) if self.logit_vote else (1.0, 1.0)  # type: ignore[attr-defined]
        self.feature_ids = [t.id for t in dims.teachers if t.feature_dim]
        self.logit_ids = [t.id for t in dims.teachers if t.has_logits and t.role == "predictive"]
        self._concat: bool | None = None
        self._mixed = False
        self.encoders, self.decoders, self.zscores = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self._check_teachers(dims)
        self.feature_groups = {f"d{d}": tuple(ids) for d, ids in group_by(
            (t.id, t.feature_dim) for t in dims.teachers if t.feature_dim).items()}
        self._build_heads(dims)

    def _check_teachers(self, dims: MethodDims) -> None:
        o, D = self.options, dims.student_dim
        for t in dims.teachers:
            if t.feature_dim and o.head == "identity":
                o._require(t.feature_dim == D, self.name, f"head='identity' needs d_t = D; {t.id!r} has "
                           f"{t.feature_dim} != {D}. Fix: use head 'mlp' or 'linear'.")
            if t.feature_dim and o.zscore:
                o._require(t.feature_mean is not None and t.feature_std is not None, self.name,
                           f"zscore=true needs feature_mean/feature_std of teacher {t.id!r} (store attrs). "
                           "Fix: pass them in TeacherInfo, or set zscore: false.")

    def _build_heads(self, dims: MethodDims) -> None:
        """One encoder / decoder / z-score per group of equal ``d_t``; members drawn in the order the
        per-teacher heads were (each teacher's encoder, then its decoder), so a seed gives the same heads."""
        o, D = self.options, dims.student_dim
        h = o.hidden or min(D, DEFAULT_HIDDEN)
        for key, ids in self.feature_groups.items():
            d = dims.teacher(ids[0]).feature_dim
            self.encoders[key] = grouped_head(o.head, len(ids), d, h, D, reset=False)   # type: ignore[arg-type]
            self.decoders[key] = grouped_head(o.head, len(ids), D, h, d, reset=False)   # type: ignore[arg-type]
            if o.zscore:
                infos = [dims.teacher(t) for t in ids]
                self.zscores[key] = _ZScore(torch.stack([i.feature_mean for i in infos]),   # type: ignore[misc]
                                            torch.stack([i.feature_std for i in infos]))   # type: ignore[misc]
        for key, i, _ in self._members():
            reset_member(self.encoders[key], i)
            reset_member(self.decoders[key], i)

    def _members(self) -> list[tuple[str, int, str]]:
        """``(group key, index in the group, teacher id)`` of every feature teacher, in teacher order."""
        place = {tid: (key, i) for key, ids in self.feature_groups.items() for i, tid in enumerate(ids)}
        return [(*place[t.id], t.id) for t in self.dims.teachers if t.id in place]

    def legacy_params(self) -> list[LegacyParam]:
        """Per-teacher keys ``encoders.<id>.0.weight`` ... (every encoder, then every decoder, then z-scores)."""
        out: list[LegacyParam] = []
        for name in ("encoders", "decoders"):
            for key, i, tid in self._members():
                out += legacy_layout(getattr(self, name)[key], f"{name}.{safe_key(tid)}.", f"{name}.{key}.", i)
        for key, i, tid in self._members():
            if key in self.zscores:
                out += [LegacyParam(f"zscores.{safe_key(tid)}.{n}", f"zscores.{key}.{n}", i, buffer=True)
                        for n in ("mean", "std")]
        return out

    def forward(self, student: StudentOutput | Sequence[StudentOutput], teachers: TeacherBatch) -> dict[str, Tensor]:
        s = self.single_student(student)
        o = self.options
        out: dict[str, Tensor] = {}
        zero = s.logits.new_zeros((), dtype=torch.float32)
        feat, rec, logit = zero, zero, zero
        if self.feature_ids:
            feat, rec = self._feature_terms(s, teachers, out)
        if self.logit_ids:
            logit = self._logit_term(s, teachers, out)
        out["loss"] = logit + o.beta1 * feat + o.beta2 * rec
        out.update(logit_loss=logit.detach(), feature_loss=feat.detach(), rec_loss=rec.detach())
        return out

    def _encode(self, tb: TeacherBatch) -> tuple[Tensor, Tensor, Tensor]:
        """``u [B, N, D]``, ``‖r_i − x^t_i‖_2 [B, N]``, ``valid [B, N]``: one batched op per group of equal
        ``d_t`` (``x^t [T, B, d_t]`` -> ``u [T, B, D]``)."""
        us, norms, valids = [], [], []
        for key, ids in self.feature_groups.items():
            valid = tb.stacked("valid", ids)                                          # [T, B]
            x_t = zero_invalid(tb.stacked("features", ids), valid)                   # [T, B, d_t]
            if key in self.zscores:
                x_t = self.zscores[key](x_t)
            u = self.encoders[key](x_t)                                               # [T, B, D]
            if self.options.latent_norm:
                u = F.layer_norm(u, u.shape[-1:])
            us.append(u)
            norms.append(torch.linalg.vector_norm(self.decoders[key](u) - x_t, dim=-1))
            valids.append(valid)
        return torch.cat(us).transpose(0, 1).contiguous(), torch.cat(norms).T, torch.cat(valids).T

    def _feature_terms(self, s: StudentOutput, tb: TeacherBatch, out: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        o = self.options
        if s.features is None:
            raise ValueError(f"method {self.name!r} needs StudentOutput.features [B, D]; got None")
        u, norms, valid = self._encode(tb)
        if self.feature_vote:
            x_hat, _, ties = sign_vote(u, valid, getattr(o, "tie_break", "literal"))
        else:
            x_hat, ties = plain_mean(u, valid), None
        if o.detach_target:
            x_hat = x_hat.detach()
        x = s.features.float()
        has = valid.any(1)
        feat = masked_mean(feature_distance_rows(x, x_hat, o.dist), has)
        rec = masked_mean(reconstruction_from_norms(norms, valid, o.rec_reduction), has)
        with torch.no_grad():
            if ties is not None:
                out["tie_frac"] = masked_mean(ties.float().mean(-1), has)
            out["x_norm"] = x.norm(dim=-1).mean()
            out["x_hat_norm"] = masked_mean(x_hat.norm(dim=-1), has)
        return feat, rec

    def _logit_term(self, s: StudentOutput, tb: TeacherBatch, out: dict[str, Tensor]) -> Tensor:
        o = self.options
        z = stacked_teacher_logits(tb, self.logit_ids, o.standardize).transpose(0, 1).contiguous()   # [B, P, C]
        valid = tb.stacked("valid", self.logit_ids).transpose(0, 1)                         # [B, P]
        covered = tb.stacked("covered", self.logit_ids)                                     # [P, C]
        q = log_probs(z, o.tau).exp()
        if self._concat is None:   # coverage is static: decide once (one device sync)
            self._mixed = bool((covered != covered[:1]).any())
            self._concat = o.target == "concat_logits" or (o.target == "auto" and self._mixed)
        concat = self._concat
        votes = vote_counts(q, valid)
        counts = self._pseudo_scores(votes, q, covered, valid)
        p_hat = self._target(z, q, covered, valid, concat)
        c_hat = pseudo_class(counts, p_hat, getattr(o, "pseudo_tie", "p_hat"))
        if getattr(o, "p_hat_from", "all") == "agreeing":
            p_hat = self._target(z, q, covered, valid & (q.argmax(-1) == c_hat[:, None]), concat)
        has = valid.any(1)
        logq = log_probs(s.logits, o.tau)
        loss = masked_mean(uniform_logit_rows(logq, p_hat, c_hat, *self.alphas), has)
        with torch.no_grad():
            share = votes / valid.sum(1, keepdim=True).clamp_min(1)
            out["vote_agreement"] = masked_mean(share.max(-1).values, has)
            if concat:   # log the other Case B target too (U10)
                alt = mean_prob_target(q, valid)
                out["alt_target_ce"] = masked_mean(uniform_logit_rows(logq, alt, c_hat, *self.alphas), has)
            truth = tb.labels if tb.labels is not None else tb.audit_labels
            if truth is not None:   # the class the loss favours: ĉ when voting, else the target's argmax (AVG)
                picked = c_hat if self.logit_vote else p_hat.argmax(-1)
                out["pseudo_acc"] = masked_mean((picked == truth).float(), has & (truth >= 0))
        return loss

    def _pseudo_scores(self, votes: Tensor, q: Tensor, covered: Tensor, valid: Tensor) -> Tensor:
        """Per-class scores ``[B, C]`` whose argmax is ĉ: the paper's vote counts, or (``vote_norm``) the counts
        or the probability mass divided by the number of valid teachers covering each class. ``auto`` keeps the
        paper's counts when every teacher covers the same classes (no evidence against them there) and uses the
        mass shares when coverages differ (+1.5 top-1 over the counts on the hard digits zoo, 3 seeds:
        docs/results-uniform.md)."""
        norm = getattr(self.options, "vote_norm", "count")
        if norm == "auto":
            norm = "soft_coverage" if self._mixed else "count"
        if norm == "count":
            return votes
        return coverage_shares(soft_votes(q, valid) if norm == "soft_coverage" else votes, covered, valid)

    def _target(self, z: Tensor, q: Tensor, covered: Tensor, valid: Tensor, concat: bool) -> Tensor:
        return concat_logit_target(z, covered, valid, self.options.tau) if concat else mean_prob_target(q, valid)
