"""Likelihood heads: proper probability distributions parameterised by a network's raw output.

Each head is a small stateless object that knows how many raw numbers it needs
(:attr:`n_params`), the log-likelihood of a target under those numbers (``log_prob``, one value
per row, differentiable) and how to draw from them (``sample``, with an explicit
:class:`torch.Generator` so that sampling is reproducible). The network that produces the raw
parameters (usually a ``nn.Linear``) belongs to the model, so the same heads serve an
autoregressive model trained by maximum likelihood (``LSTMSynthesizer``) and any other model that
needs a proper distribution over gaps, masks or values (e.g. a GAN's static generator, or a
likelihood-based critic).

Heads:

- :class:`GaussianMixture`: independent 1-d Gaussian mixtures over D dims (``[..., D]``).
- :class:`ProductMixture`: one mixture of K product distributions over several numeric
  (Gaussian) and categorical variables sharing the component, so variables observed together are
  correlated; unobserved variables are marginalised exactly (their terms are dropped); means can
  be anchored on a reference value (the last observation) through a learned gate.
- :class:`ZeroInflatedLogNormalMixture`: positive durations (time gaps) with an atom at zero,
  and their survival function for right-censored gaps (the end of an observation window).
- :class:`NonEmptyBernoulliMixture`: which of V variables are observed, a mixture of products of
  Bernoullis conditioned on at least one being observed (empty steps never occur in a cohort).

All sampling is vectorised over the leading dimensions; nothing loops over rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on the whole range (Mächler, 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def sample_categorical(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices drawn from ``softmax(logits)`` over the last dimension (inverse-CDF, one uniform
    per row)."""
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
    u = torch.rand(
        (*logits.shape[:-1], 1), generator=generator, device=logits.device, dtype=cdf.dtype
    )
    return (cdf < u).sum(dim=-1).clamp(max=logits.shape[-1] - 1)


def _scale(raw: torch.Tensor, min_scale: float) -> torch.Tensor:
    return F.softplus(raw) + min_scale


def _normal_log_prob(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((x - mu) / sigma) ** 2 - torch.log(sigma) - _LOG_SQRT_2PI


class GaussianMixture:
    """Independent Gaussian mixtures, one per dimension: ``x[..., d] ~ sum_k pi_dk N(mu_dk,
    sigma_dk)``.

    Raw layout: ``[..., D * 3K]`` = for each dim its K logits, K means and K raw scales
    (``sigma = softplus(raw) + min_scale``).
    """

    def __init__(self, n_dims: int, n_components: int, min_scale: float = 1e-2) -> None:
        self.n_dims = n_dims
        self.n_components = n_components
        self.min_scale = min_scale

    @property
    def n_params(self) -> int:
        return self.n_dims * 3 * self.n_components

    def _split(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raw = raw.reshape(*raw.shape[:-1], self.n_dims, 3, self.n_components)
        return raw[..., 0, :], raw[..., 1, :], raw[..., 2, :]

    def log_prob(self, raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` log-densities; ``x`` must be finite (mask unobserved entries yourself)."""
        logits, mu, raw_scale = self._split(raw)
        log_pi = torch.log_softmax(logits, dim=-1)
        sigma = _scale(raw_scale, self.min_scale)
        return torch.logsumexp(log_pi + _normal_log_prob(x.unsqueeze(-1), mu, sigma), dim=-1)

    def sample(self, raw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``[..., D]`` draws."""
        logits, mu, raw_scale = self._split(raw)
        k = sample_categorical(logits, generator).unsqueeze(-1)
        noise = torch.randn(mu.shape[:-1], generator=generator, device=raw.device, dtype=raw.dtype)
        sigma = _scale(raw_scale.gather(-1, k).squeeze(-1), self.min_scale)
        return mu.gather(-1, k).squeeze(-1) + sigma * noise


class ProductMixture:
    """A mixture of K products over ``n_numeric`` Gaussian dims and categorical variables.

    ``p(z, c) = sum_k pi_k prod_d N(z_d; mu_kd, sigma_kd) prod_j Cat(c_j; softmax(l_kj))``.
    Sharing the component across variables captures their dependence (e.g. systolic and
    diastolic pressure measured together); marginalising an unobserved variable drops its factor.

    Raw layout: ``[..., K + K*2*n_numeric + K*sum(category_sizes) (+ n_numeric)]``: component
    logits, then per component the means and raw scales, then per component the categorical
    logits, then (``anchored=True``) one gate per numeric variable.

    With ``anchored=True`` and an ``anchor`` (e.g. each variable's last observed value), the
    means are ``anchor + g (mu - anchor)`` with a gate ``g = sigmoid(raw)`` in (0, 1) per
    variable: g near 0 keeps the anchor (persistence), g near 1 ignores it (a fresh level), so
    the network chooses, step by step, between small changes and a return to another level.
    """

    def __init__(
        self,
        n_numeric: int,
        category_sizes: Sequence[int],
        n_components: int,
        min_scale: float = 1e-2,
        anchored: bool = False,
    ) -> None:
        self.n_numeric = n_numeric
        self.category_sizes = [int(c) for c in category_sizes]
        self.n_components = n_components
        self.min_scale = min_scale
        self.anchored = anchored

    @property
    def n_params(self) -> int:
        k = self.n_components
        gates = self.n_numeric if self.anchored else 0
        return k + k * 2 * self.n_numeric + k * sum(self.category_sizes) + gates

    def _split(self, raw: torch.Tensor, anchor: torch.Tensor | None = None):
        k, d = self.n_components, self.n_numeric
        lead = raw.shape[:-1]
        logits = raw[..., :k]
        gauss = raw[..., k : k + 2 * k * d].reshape(*lead, k, 2, d)
        end = k + 2 * k * d + k * sum(self.category_sizes)
        cat = raw[..., k + 2 * k * d : end].reshape(*lead, k, sum(self.category_sizes))
        mu = gauss[..., 0, :]
        if self.anchored and anchor is not None:
            gate = torch.sigmoid(raw[..., end : end + d]).unsqueeze(-2)
            base = anchor.unsqueeze(-2)
            mu = base + gate * (mu - base)
        return logits, mu, gauss[..., 1, :], cat

    def log_prob(
        self,
        raw: torch.Tensor,
        z: torch.Tensor,
        codes: torch.Tensor,
        observed_numeric: torch.Tensor,
        observed_categorical: torch.Tensor,
        anchor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[...]`` log-likelihood of the observed entries.

        Args:
            z: ``[..., n_numeric]`` values (any finite number where unobserved).
            codes: ``[..., n_categorical]`` int64 codes (any valid code where unobserved).
            observed_numeric, observed_categorical: bool masks of the same shapes.
            anchor: ``[..., n_numeric]`` the anchor of the means (``anchored=True`` only).
        """
        logits, mu, raw_scale, cat = self._split(raw, anchor)
        terms = torch.log_softmax(logits, dim=-1)
        if self.n_numeric:
            sigma = _scale(raw_scale, self.min_scale)
            log_n = _normal_log_prob(z.unsqueeze(-2), mu, sigma)  # [..., K, D]
            terms = terms + (log_n * observed_numeric.unsqueeze(-2)).sum(-1)
        start = 0
        for j, size in enumerate(self.category_sizes):
            log_c = torch.log_softmax(cat[..., start : start + size], dim=-1)  # [..., K, C]
            index = codes[..., j].clamp(min=0).reshape(*codes.shape[:-1], 1, 1)
            picked = log_c.gather(-1, index.expand(*log_c.shape[:-1], 1)).squeeze(-1)
            terms = terms + picked * observed_categorical[..., j : j + 1]
            start += size
        return torch.logsumexp(terms, dim=-1)

    def sample(
        self,
        raw: torch.Tensor,
        generator: torch.Generator,
        anchor: torch.Tensor | None = None,
        temperature: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z [..., n_numeric], codes [..., n_categorical])``, every variable drawn
        (``anchor`` as in :meth:`log_prob`; ``temperature`` ``[n_numeric]`` scales each numeric
        variable's standard deviations)."""
        logits, mu, raw_scale, cat = self._split(raw, anchor)
        k = sample_categorical(logits, generator)
        pick = k.reshape(*k.shape, 1, 1)
        mu_k = mu.gather(-2, pick.expand(*mu.shape[:-2], 1, mu.shape[-1])).squeeze(-2)
        sigma_k = _scale(
            raw_scale.gather(-2, pick.expand(*mu.shape[:-2], 1, mu.shape[-1])).squeeze(-2),
            self.min_scale,
        )
        if temperature is not None:
            sigma_k = sigma_k * temperature
        noise = torch.randn(mu_k.shape, generator=generator, device=raw.device, dtype=raw.dtype)
        z = mu_k + sigma_k * noise
        cat_k = cat.gather(-2, pick.expand(*cat.shape[:-2], 1, cat.shape[-1])).squeeze(-2)
        codes = []
        start = 0
        for size in self.category_sizes:
            codes.append(sample_categorical(cat_k[..., start : start + size], generator))
            start += size
        codes_tensor = (
            torch.stack(codes, dim=-1)
            if codes
            else torch.zeros((*k.shape, 0), dtype=torch.int64, device=raw.device)
        )
        return z, codes_tensor


class ZeroInflatedLogNormalMixture:
    """Durations ``g >= 0``: ``g = 0`` with probability ``sigmoid(l0)``, otherwise
    ``log(g / scale)`` follows a K-component Gaussian mixture (a log-normal mixture on g > 0).

    Raw layout: ``[..., 1 + 3K]`` = zero logit, K logits, K means, K raw scales. ``log_prob``
    is a proper log-density (the change-of-variable term ``-log g`` included) plus the atom.
    """

    def __init__(self, n_components: int, scale: float = 1.0, min_scale: float = 1e-2) -> None:
        self.n_components = n_components
        self.scale = float(scale)
        self.min_scale = min_scale
        self._mixture = GaussianMixture(1, n_components, min_scale)

    @property
    def n_params(self) -> int:
        return 1 + 3 * self.n_components

    def log_prob(self, raw: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
        zero_logit, mix = raw[..., 0], raw[..., 1:]
        zero = gap <= 0
        safe = torch.where(zero, torch.ones_like(gap), gap)
        y = torch.log(safe / self.scale)
        positive = (
            F.logsigmoid(-zero_logit)
            + self._mixture.log_prob(mix, y.unsqueeze(-1)).squeeze(-1)
            - torch.log(safe)
        )
        return torch.where(zero, F.logsigmoid(zero_logit), positive)

    def log_survival(self, raw: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """``log P(gap > threshold)`` for ``threshold >= 0`` (a right-censored gap)."""
        zero_logit, mix = raw[..., 0], raw[..., 1:]
        logits, mu, raw_scale = self._mixture._split(mix)
        logits, mu, raw_scale = logits[..., 0, :], mu[..., 0, :], raw_scale[..., 0, :]
        sigma = _scale(raw_scale, self.min_scale)
        positive = threshold > 0
        y = torch.log(torch.where(positive, threshold, torch.ones_like(threshold)) / self.scale)
        tail = torch.special.log_ndtr((mu - y.unsqueeze(-1)) / sigma)
        log_tail = torch.logsumexp(torch.log_softmax(logits, dim=-1) + tail, dim=-1)
        log_tail = torch.where(positive, log_tail, torch.zeros_like(log_tail))
        return F.logsigmoid(-zero_logit) + log_tail

    def sample(self, raw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        zero_logit, mix = raw[..., 0], raw[..., 1:]
        y = self._mixture.sample(mix, generator).squeeze(-1)
        u = torch.rand(zero_logit.shape, generator=generator, device=raw.device, dtype=raw.dtype)
        gap = self.scale * torch.exp(y.clamp(max=30.0))
        return torch.where(u < torch.sigmoid(zero_logit), torch.zeros_like(gap), gap)


class NonEmptyBernoulliMixture:
    """Observation masks over V variables with at least one variable observed.

    A mixture of K logistic autoregressive chains (fully visible sigmoid belief networks):
    ``p(m) = sum_k pi_k prod_j sigmoid(+-(a_kj + sum_{i<j} U_ji m_i))``, truncated to
    ``m != 0`` and renormalised (``log_prob`` subtracts ``log(1 - p(0))``). The components give
    context-dependent patterns; the interactions ``U`` (a strictly lower-triangular ``[V, V]``
    matrix, a parameter of the model) tie variables recorded
    together, such as the three arterial pressures, far more sharply than a mixture of
    independent Bernoullis learns to. Without ``interactions`` it is a plain Bernoulli mixture.

    Sampling is exact: the component is drawn from its posterior given a non-empty mask, then
    the chain variable by variable, and while all variables so far are off, each is switched on
    with its probability conditioned on at least one of the remaining ones being on.

    Raw layout: ``[..., K + K*V]`` = component logits, then per component V logits ``a``.
    """

    def __init__(self, n_variables: int, n_components: int) -> None:
        self.n_variables = n_variables
        self.n_components = n_components

    @property
    def n_params(self) -> int:
        return self.n_components * (1 + self.n_variables)

    def _split(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.n_components
        return raw[..., :k], raw[..., k:].reshape(*raw.shape[:-1], k, self.n_variables)

    def log_prob(
        self, raw: torch.Tensor, mask: torch.Tensor, chain_terms: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Log-probability of non-empty ``mask`` ``[..., V]``; ``chain_terms`` ``[..., V]`` is
        ``mask @ tril(U, -1).T`` (computed by the caller, e.g. with an ``nn.Linear`` whose
        weight is kept strictly lower-triangular, so that DP-SGD sees an ordinary layer)."""
        logits, base = self._split(raw)
        log_pi = torch.log_softmax(logits, dim=-1)
        m = mask.to(base.dtype)
        chain = base if chain_terms is None else base + chain_terms.unsqueeze(-2)
        m = m.unsqueeze(-2)
        log_m = (m * F.logsigmoid(chain) + (1 - m) * F.logsigmoid(-chain)).sum(-1)
        # With every variable off, no interaction term is active.
        log_empty = torch.logsumexp(log_pi + F.logsigmoid(-base).sum(-1), dim=-1)
        return torch.logsumexp(log_pi + log_m, dim=-1) - log1mexp(log_empty)

    def sample(
        self,
        raw: torch.Tensor,
        generator: torch.Generator,
        interactions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[..., V]`` bool masks, none empty (``interactions``: the ``[V, V]`` matrix U)."""
        logits, base = self._split(raw)
        lead = logits.shape[:-1]
        logits, base = logits.reshape(-1, logits.shape[-1]), base.reshape(-1, *base.shape[-2:])
        log_off = F.logsigmoid(-base)  # [n, K, V]
        posterior = torch.log_softmax(logits, -1) + log1mexp(log_off.sum(-1))
        k = sample_categorical(posterior, generator)
        rows = torch.arange(len(k), device=k.device)
        a, log_off = base[rows, k], log_off[rows, k]  # [n, V]
        # log P(all of variables j.. are off | all before j are off), for the constraint.
        tail_off = log_off.flip(-1).cumsum(-1).flip(-1)
        lower = torch.tril(interactions, -1) if interactions is not None else None
        u = torch.rand(a.shape, generator=generator, device=a.device, dtype=a.dtype)
        mask = torch.zeros(a.shape, dtype=torch.bool, device=a.device)
        none_yet = torch.ones(len(k), dtype=torch.bool, device=a.device)
        for j in range(self.n_variables):
            logit = a[:, j]
            if lower is not None and j:
                logit = logit + mask[:, :j].to(a.dtype) @ lower[j, :j]
            constrained = F.logsigmoid(a[:, j]) - log1mexp(tail_off[:, j])
            log_p = torch.where(none_yet, constrained, F.logsigmoid(logit))
            mask[:, j] = u[:, j] < log_p.exp()
            none_yet &= ~mask[:, j]
        return mask.reshape(*lead, self.n_variables)
