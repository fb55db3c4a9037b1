r"""Non-uniform quantizer. :func:`expected_sq_error_levels` evaluates the same closed form for any
sorted level set (thresholds at the midpoints). :func:`design_nonuniform` fits ``2**bits`` fp16
levels per block or per row by posterior-weighted Lloyd-Max (:func:`lloyd_max`) on the mixture
:math:`\sum_i \lambda_i N(\mu_i, \sigma_i^2)`, i.e. it minimises the whitened expected distortion
:math:`\sum_i \lambda_i E[(Q(w_i) - w_i)^2]`; the per-cell truncated-normal moments come from a
mixture sorted once (``_SortedMixture``), so an iteration never touches ``n x L`` terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..choices import SEARCHED_RANGES, check_bits
from .normal import INV_SQRT2PI, SQRT2, Phi, cell_terms, phi

_CHUNK = 1 << 20  # weights per pass of the cell walks: temporaries stay O(_CHUNK), never n x L
_MASS_FLOOR = 1e-13  # a cell holding less than this fraction of its row's weight is empty
_QUANTILE_RTOL = 1e-3  # initial levels: mixture quantiles to 1e-3 mixture std (bisection)
_GRID_PER_SIGMA = 1.5  # tabulated partial sums: nodes per smallest sigma (septic Hermite, ~1e-9)
_MAX_GRID = 1 << 20  # nodes per tabulated segment at most


def _blocks(n_rows: int, n_cols: int):
    """``(r0, r1, c0, c1)`` blocks of at most about ``_CHUNK`` weights; whole rows when they fit."""
    if n_cols >= _CHUNK:
        for r in range(n_rows):
            for c0 in range(0, n_cols, _CHUNK):
                yield r, r + 1, c0, min(c0 + _CHUNK, n_cols)
    else:
        step = max(1, _CHUNK // max(n_cols, 1))
        for r0 in range(0, n_rows, step):
            yield r0, min(r0 + step, n_rows), 0, n_cols


def _rows_view(mu: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared levels ``(L,)`` -> one row ``(1, n)``; per-row levels ``(R, L)`` -> ``(R, n)``."""
    if levels.dim() == 1:
        return mu.reshape(1, -1), levels.reshape(1, -1)
    if levels.dim() == 2 and mu.dim() >= 1 and mu.shape[0] == levels.shape[0]:
        return mu.reshape(levels.shape[0], -1), levels
    raise ValueError(
        f"levels of shape {tuple(levels.shape)} do not fit mu of shape {tuple(mu.shape)}: "
        "use (L,) for one shared level set or (rows, L) with mu of shape (rows, cols)"
    )


def expected_sq_error_levels(
    mu: torch.Tensor, sigma: torch.Tensor, levels: torch.Tensor
) -> torch.Tensor:
    r"""Posterior-expected squared error :math:`E_w[(Q(w) - w)^2]` of an arbitrary level set.

    :math:`Q` maps :math:`w` to the nearest level: with sorted levels :math:`c_0 \le \dots \le
    c_{L-1}` and thresholds at the midpoints :math:`t_k = (c_k + c_{k+1})/2`, the cell of level
    :math:`k` is :math:`(t_{k-1}, t_k]` (:math:`t_{-1} = -\infty`, :math:`t_{L-1} = +\infty`).
    For :math:`w \sim N(\mu, \sigma^2)`, with :math:`a = (t_{k-1}-\mu)/\sigma`,
    :math:`b = (t_k-\mu)/\sigma`, :math:`d = (c_k-\mu)/\sigma`,

    .. math::

        E[(Q(w) - w)^2] = \sigma^2 \sum_k (1 + d^2)(\Phi(b) - \Phi(a)) - 2d(\phi(a) - \phi(b))
                          + a\phi(a) - b\phi(b).

    Only the cells meeting :math:`[\mu - 6\sigma, \mu + 6\sigma]` are summed (the others carry
    less than :math:`2\Phi(-6) \approx 2 \cdot 10^{-9}` of the mass); each of those is evaluated
    exactly at its true thresholds. The cells are walked one position at a time, each pass
    vectorised over the weights whose window still has cells left, in chunks of weights:
    memory ``O(n)``, never ``n x L``. ``sigma == 0`` gives the point value :math:`(Q(\mu) - \mu)^2`.

    Parameters
    ----------
    mu : torch.Tensor
        Posterior means; any shape for shared levels, ``(rows, ...)`` for per-row levels.
    sigma : torch.Tensor
        Posterior standard deviations (``>= 0``), broadcastable to ``mu``.
    levels : torch.Tensor
        Sorted levels: ``(L,)`` shared by all weights, or ``(rows, L)``, one set per row of
        ``mu``.

    Returns
    -------
    torch.Tensor
        Expected squared error in weight units, shape of ``mu`` (its dtype if floating, else
        float32).
    """
    if not mu.is_floating_point():
        mu = mu.float()
    dt, shape = mu.dtype, mu.shape
    m2, lv = _rows_view(mu, levels.to(dt))
    s2 = sigma.to(dt).expand(shape).reshape(m2.shape)
    R, n = m2.shape
    L = lv.shape[1]
    thr = (0.5 * (lv[:, 1:] + lv[:, :-1])).contiguous()  # (R, L-1)
    inf = torch.full((R, 1), math.inf, dtype=dt)
    edges = torch.cat([-inf, thr, inf], dim=1)  # cell k of row r: (edges[r, k], edges[r, k+1]]
    out = torch.empty(R, n, dtype=dt)
    for r0, r1, c0, c1 in _blocks(R, n):
        m, g, t = m2[r0:r1, c0:c1], s2[r0:r1, c0:c1], thr[r0:r1]
        point = g <= 0
        g = torch.where(point, torch.ones_like(g), g)
        k_pt = torch.searchsorted(t, m.contiguous())  # cell holding mu
        k_lo = torch.where(point, k_pt, torch.searchsorted(t, (m - 6.0 * g).contiguous()))
        k_hi = torch.where(point, k_pt, torch.searchsorted(t, (m + 6.0 * g).contiguous()))
        # walk the cells k_lo..k_hi of every weight; weights leave once their window is done
        row = torch.arange(r1 - r0).unsqueeze(1).expand_as(m).flatten()
        e_flat, l_flat = edges[r0:r1].flatten(), lv[r0:r1].contiguous().flatten()
        e_idx = row * (L + 1) + k_lo.flatten()  # lower edge of the current cell
        l_idx = row * L + k_lo.flatten()  # its level
        left = (k_hi - k_lo).flatten()  # cells after the current one
        m_a, g_a = m.flatten(), g.flatten()
        idx = torch.arange(m_a.numel())
        acc = torch.zeros_like(m_a)
        a = (e_flat[e_idx] - m_a) / g_a
        while True:
            b = (e_flat[e_idx + 1] - m_a) / g_a
            d = (l_flat[l_idx] - m_a) / g_a
            acc.index_add_(0, idx, cell_terms(a, b, d))
            more = left > 0
            if not bool(more.any()):
                break
            if not bool(more.all()):
                keep = torch.nonzero(more).squeeze(1)
                idx, m_a, g_a, b = idx[keep], m_a[keep], g_a[keep], b[keep]
                e_idx, l_idx, left = e_idx[keep], l_idx[keep], left[keep]
            a, e_idx, l_idx, left = b, e_idx + 1, l_idx + 1, left - 1
        res = (acc * g.flatten() ** 2).view(m.shape)
        if bool(point.any()):
            q = torch.gather(lv[r0:r1], 1, k_pt)
            res = torch.where(point, (q - m) ** 2, res)
        out[r0:r1, c0:c1] = res
    return out.reshape(shape)


def _seg_bisect(
    v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, x: torch.Tensor, right: torch.Tensor
) -> torch.Tensor:
    """Vectorised ``bisect`` of ``x`` in the sorted runs ``v[lo:hi]`` (flat indices).

    Returns the first index in ``[lo, hi]`` whose value is ``>= x`` (``> x`` where ``right``).
    """
    lo, hi = lo.clone(), hi.clone()
    n_steps = int((hi - lo).max().item()).bit_length() + 1 if lo.numel() else 0
    last = max(v.numel() - 1, 0)
    for _ in range(n_steps):
        active = lo < hi
        mid = (lo + hi) // 2
        vm = v[mid.clamp(max=last)]
        go = (vm < x) | (right & (vm == x))
        lo = torch.where(active & go, mid + 1, lo)
        hi = torch.where(active & ~go, mid, hi)
    return lo


def _hermite_basis(u: torch.Tensor, n: int) -> list[torch.Tensor]:
    r"""Two-point Hermite basis on ``[0, 1]`` for derivatives ``0..n-1`` at both ends.

    Returns ``[A_0, B_0, A_1, B_1, ...]`` with
    :math:`A_j(u) = \frac{u^j}{j!}(1-u)^n \sum_{k<n-j} \binom{n-1+k}{k} u^k` (derivative ``j``
    at 0) and :math:`B_j(u) = \frac{(u-1)^j}{j!} u^n \sum_{k<n-j} \binom{n-1+k}{k} (1-u)^k`
    (at 1), derivatives in units of the interval. The interpolation error is
    :math:`f^{(2n)}(\xi) u^n (1-u)^n / (2n)!`.
    """
    v = 1.0 - u
    up, vp = [torch.ones_like(u)], [torch.ones_like(u)]
    for _ in range(n):
        up.append(up[-1] * u)
        vp.append(vp[-1] * v)
    out = []
    for j in range(n):
        poly_u = sum(math.comb(n - 1 + k, k) * up[k] for k in range(n - j))
        poly_v = sum(math.comb(n - 1 + k, k) * vp[k] for k in range(n - j))
        coef = 1.0 / math.factorial(j)
        out.append(coef * up[j] * vp[n] * poly_u)
        out.append(((-1.0) ** j * coef) * vp[j] * up[n] * poly_v)
    return out


class _SortedMixture:
    r"""The weighted mixture :math:`\sum_i \lambda_i N(\mu_i, \sigma_i^2)` of each row, prepared
    once so that its partial sums

    .. math::

        G_0(t) = \sum_i \lambda_i \Phi(z_i), \qquad
        G_1(t) = \sum_i \lambda_i (\mu_i \Phi(z_i) - \sigma_i \phi(z_i)), \qquad
        z_i = (t - \mu_i)/\sigma_i

    (weighted mass and first moment below ``t``; a point mass counts when :math:`\mu \le t`)
    can be queried at a few points per Lloyd step without touching every weight.

    Weights are grouped per row by half-octave of ``sigma`` (point masses on their own), and
    each (row, half-octave) segment is sorted by ``mu``, with per-row prefix sums of
    :math:`\lambda` and :math:`\lambda\mu`. A segment is answered in one of two ways, whichever
    a cost model (``n_queries`` queries of ``n_points`` points, counted in Gaussian evaluations)
    finds cheaper:

    * exact: with :math:`s` the segment's largest ``sigma``, weights with
      :math:`\mu < t - 6s` count whole (prefix sums; :math:`\Phi \ge 1 - 10^{-9}`), weights
      with :math:`\mu > t + 6s` not at all, and only the contiguous run in between is evaluated,
      in chunks of about ``_CHUNK`` weights. For a ``sigma`` below the cell width this touches
      only the weights near a threshold;
    * tabulated (wide segments, whose windows span many cells): :math:`G_0, G_1` and their
      derivatives up to the third (:math:`G_0^{(1)} = \sum \lambda\phi(z)/\sigma`, ...) are
      computed once, exactly, on a grid of spacing :math:`h = \sigma_{min} /`
      ``_GRID_PER_SIGMA`` and queried by septic two-point Hermite interpolation (measured error
      about :math:`2 \cdot 10^{-9}` of the mass), so each weight is evaluated about
      :math:`12\sigma/h \approx 18\text{--}26` times in all instead of once per threshold in
      its window per query.

    Memory is ``O(n + grid)``, never ``n x L``; sorting costs ``O(n log n)`` once.
    """

    def __init__(
        self,
        mu: torch.Tensor,
        sigma: torch.Tensor | None,
        weight: torch.Tensor,
        n_points: int = 1,
        n_queries: int = 1,
    ):
        R, n = mu.shape
        self.R, self.n = R, n
        if sigma is None:
            bucket = torch.zeros(R, n, dtype=torch.long)
            n_buckets = 1
        else:
            pos = sigma > 0
            # half-octave buckets: sigma / sigma_min < sqrt(2) within a segment
            e = torch.floor(2 * torch.log2(torch.where(pos, sigma, torch.ones_like(sigma)))).long()
            e_max = int(e[pos].max().item()) if bool(pos.any()) else 0
            e = torch.where(pos, e.clamp_min(e_max - 80), torch.full_like(e, e_max - 81))
            e_min = int(e.min().item())
            bucket = e - e_min  # empty buckets make empty segments, dropped below
            n_buckets = e_max - e_min + 1
        v, order = mu.sort(dim=1, stable=True)
        if n_buckets > 1:
            o2 = torch.gather(bucket, 1, order).argsort(dim=1, stable=True)
            order = torch.gather(order, 1, o2)
            v = torch.gather(mu, 1, order)
        bk = torch.gather(bucket, 1, order)
        w = torch.gather(weight, 1, order)
        s = torch.zeros_like(v) if sigma is None else torch.gather(sigma, 1, order)
        zero = torch.zeros(R, 1, dtype=v.dtype)
        C0 = torch.cat([zero, w.cumsum(1)], dim=1)
        C1 = torch.cat([zero, (w * v).cumsum(1)], dim=1)
        self.total0, self.total1 = C0[:, -1].clone(), C1[:, -1].clone()
        self.v_rows, self.w_rows = v, w  # sorted by mu within each row when n_buckets == 1
        seg = (bk + torch.arange(R).unsqueeze(1) * n_buckets).flatten()
        counts = torch.bincount(seg, minlength=R * n_buckets)
        ends = counts.view(R, n_buckets).cumsum(1).flatten()
        nonempty = torch.nonzero(counts > 0).squeeze(1)
        sf = s.flatten()
        s_max = torch.zeros(R * n_buckets, dtype=v.dtype).scatter_reduce(
            0, seg, sf, reduce="amax", include_self=False
        )[nonempty]
        s_min = torch.zeros(R * n_buckets, dtype=v.dtype).scatter_reduce(
            0, seg, sf, reduce="amin", include_self=False
        )[nonempty]
        s_mean = torch.bincount(seg, sf, minlength=R * n_buckets)[nonempty] / counts[nonempty]
        seg_row = nonempty // n_buckets
        seg_start = seg_row * n + (ends - counts)[nonempty]
        seg_end = seg_row * n + ends[nonempty]
        self.v, self.s, self.w = v.flatten(), sf, w.flatten()
        self.C0, self.C1 = C0.flatten(), C1.flatten()

        # Cost model, in Gaussian evaluations: exact = the thresholds inside each window, per
        # query; tabulated = the grid nodes inside each window, once. Point masses: always exact.
        mu_span = (v.amax(1) - v.amin(1))[seg_row].clamp_min(1e-300)
        cnt = counts[nonempty].to(v.dtype)
        in_window = (n_points * 12.0 * s_mean / mu_span).clamp_max(n_points)
        lo_edge = self.v[seg_start] - 6.0 * s_max
        hi_edge = self.v[seg_end - 1] + 6.0 * s_max
        h = s_min / _GRID_PER_SIGMA
        n_grid = torch.where(s_min > 0, (hi_edge - lo_edge) / torch.where(s_min > 0, h, 1.0), 0)
        cost_exact = n_queries * cnt * in_window
        cost_grid = cnt * (12.0 * s_mean / h.clamp_min(1e-300) + 1) + n_grid
        smooth = (s_min > 0) & (cost_grid < cost_exact) & (n_grid < _MAX_GRID)
        ex = ~smooth
        self.seg_row, self.seg_start, self.seg_end = seg_row[ex], seg_start[ex], seg_end[ex]
        self.seg_sigma = s_max[ex]
        self.grid: dict[str, torch.Tensor] | None = None
        if bool(smooth.any()):
            self._build_grid(
                seg_row[smooth], seg_start[smooth], seg_end[smooth], lo_edge[smooth], h[smooth],
                n_grid[smooth],
            )

    def _runs(
        self,
        seg_row: torch.Tensor,
        start: torch.Tensor,
        end: torch.Tensor,
        sig: torch.Tensor,
        t: torch.Tensor,
        first_moment: bool,
    ) -> list[torch.Tensor]:
        """Exact ``[G0]`` or ``[G0, G1]`` of the segments ``[start, end)`` (flat indices,
        ``(S, 1)``; ``sig`` their largest sigma, ``seg_row`` their rows) at ``t`` ``(S, Q)``."""
        point = (sig == 0).expand_as(t)
        sg = sig.expand_as(t)
        start, end = start.expand_as(t), end.expand_as(t)
        lo = _seg_bisect(self.v, start, end, t - 6.0 * sg, point)  # before: whole
        hi = _seg_bisect(self.v, lo, end, t + 6.0 * sg, torch.ones_like(point))
        c_off = seg_row.unsqueeze(1)  # prefix sums carry one extra entry per row
        out = [self.C0[lo + c_off] - self.C0[start + c_off]]
        if first_moment:
            out.append(self.C1[lo + c_off] - self.C1[start + c_off])
        lens = (hi - lo).flatten()
        q_idx = torch.nonzero(lens > 0).squeeze(1)
        if q_idx.numel() == 0:
            return out
        flat = [o.flatten() for o in out]
        lens_q, lo_q, t_q = lens[q_idx], lo.flatten()[q_idx], t.flatten()[q_idx]
        cum = lens_q.cumsum(0)
        k0, total = 0, int(cum[-1].item())
        while k0 < len(q_idx):
            # queries [k0, k1) hold about _CHUNK exact evaluations (at least one query)
            done = int(cum[k0 - 1].item()) if k0 else 0
            k1 = int(torch.searchsorted(cum, min(done + _CHUNK, total), right=True).item())
            k1 = max(k1, k0 + 1)
            ln = lens_q[k0:k1]
            rep = torch.repeat_interleave(torch.arange(k1 - k0), ln)
            pos = torch.repeat_interleave(lo_q[k0:k1] - (ln.cumsum(0) - ln), ln)
            pos = pos + torch.arange(rep.numel())
            mu_, sd_, w_ = self.v[pos], self.s[pos], self.w[pos]
            z = (t_q[k0:k1][rep] - mu_) / sd_
            cdf = Phi(z)
            terms = [w_ * cdf]
            if first_moment:
                terms.append(w_ * (mu_ * cdf - sd_ * phi(z)))
            dst = q_idx[k0:k1]
            for acc, term in zip(flat, terms, strict=True):
                acc.index_add_(0, dst, torch.zeros(k1 - k0, dtype=z.dtype).index_add_(0, rep, term))
            k0 = k1
        return [f.view_as(t) for f in flat]

    def _build_grid(
        self,
        seg_row: torch.Tensor,
        start: torch.Tensor,
        end: torch.Tensor,
        lo_edge: torch.Tensor,
        h: torch.Tensor,
        n_grid: torch.Tensor,
    ) -> None:
        r"""Tabulate :math:`G_0, G_1` and their derivatives 1-3 for the wide segments.

        Each weight walks the nodes inside its own :math:`\pm 6\sigma` window (about
        ``12 * _GRID_PER_SIGMA`` of them; :math:`z` advances by :math:`h/\sigma` per node), all
        weights of all wide segments at once per step; nodes above the window get the whole
        :math:`\lambda, \lambda\mu` through a cumulative sum. Per weight and node:
        :math:`G_0^{(1)} = \lambda\phi/\sigma`, :math:`G_0^{(2)} = -z G_0^{(1)}/\sigma`,
        :math:`G_0^{(3)} = (z^2 - 1) G_0^{(1)}/\sigma^2`, and
        :math:`G_1^{(k)} = t G_0^{(k)} + (k - 1) G_0^{(k-1)}` for :math:`k \ge 1`.
        """
        m = n_grid.ceil().long() + 2  # nodes per segment, covering [lo_edge, hi_edge]
        offset = m.cumsum(0) - m
        n_nodes = int(m.sum().item())
        lens = end - start
        wseg = torch.repeat_interleave(torch.arange(len(m)), lens)
        idx = torch.repeat_interleave(start - (lens.cumsum(0) - lens), lens)
        idx = idx + torch.arange(idx.numel())
        mu, sd, lam = self.v[idx], self.s[idx], self.w[idx]
        lo_w, h_w = lo_edge[wseg], h[wseg]
        j0 = torch.ceil((mu - 6.0 * sd - lo_w) / h_w).clamp_min(0)
        j1 = torch.minimum(torch.floor((mu + 6.0 * sd - lo_w) / h_w), (m[wseg] - 1).to(mu.dtype))
        cnt = (j1 - j0 + 1).clamp_min(0)
        base = offset[wseg] + j0.long()
        # whole mass from the first node above the window on (a difference array, cumulated)
        above = base + cnt.long()
        inside = above < (offset + m)[wseg]
        hard = torch.zeros(n_nodes, 2, dtype=mu.dtype)
        hard.index_add_(0, above[inside], torch.stack([lam, lam * mu], 1)[inside])
        acc = torch.zeros(n_nodes, 5, dtype=mu.dtype)  # G0, G1 and G0 derivatives 1..3
        inv_s = 1.0 / sd
        y = (lo_w + h_w * j0 - mu) * inv_s * (1.0 / SQRT2)  # z / sqrt(2) at the first node
        dy = h_w * inv_s * (1.0 / SQRT2)
        # per-weight factors: lam/2, lam/(sqrt(2 pi) s), -s^2, -sqrt(2)/s, 2/s^2, -1/s^2
        lam_half, lam_pdf = 0.5 * lam, lam * INV_SQRT2PI * inv_s
        neg_s2, c_z = -(sd * sd), -SQRT2 * inv_s
        two_is2 = 2.0 * inv_s * inv_s
        neg_is2 = -0.5 * two_is2
        buf = torch.empty(mu.numel(), 5, dtype=mu.dtype)
        # Phase 1: every weight has at least c_min nodes; phase 2: the rest, masked per step.
        c_min, c_max = int(cnt.min().item()), int(cnt.max().item())
        lam_half0 = lam_pdf0 = lam_half
        for k in range(c_max):
            if k == c_min:
                rest = torch.nonzero(cnt > c_min).squeeze(1)
                cnt, base, y, dy, mu = cnt[rest], base[rest], y[rest], dy[rest], mu[rest]
                neg_s2, c_z = neg_s2[rest], c_z[rest]
                two_is2, neg_is2 = two_is2[rest], neg_is2[rest]
                lam_half0, lam_pdf0 = lam_half[rest], lam_pdf[rest]
            if k >= c_min:
                live = (cnt > k).to(mu.dtype)
                lam_half, lam_pdf = lam_half0 * live, lam_pdf0 * live
            b = buf[: mu.numel()]
            y2 = y * y
            g0 = torch.addcmul(lam_half, lam_half, torch.erf(y), out=b[:, 0])  # lam Phi
            dens = torch.mul(lam_pdf, y2.neg().exp_(), out=b[:, 2])  # lam phi / s
            torch.addcmul(mu * g0, neg_s2, dens, out=b[:, 1])  # lam (mu Phi - s phi)
            torch.mul(dens, y * c_z, out=b[:, 3])  # -z lam phi / s^2
            torch.mul(dens, torch.addcmul(neg_is2, y2, two_is2), out=b[:, 4])  # (z^2-1)lam phi/s^3
            acc.index_add_(0, base if k < c_min else base.clamp_max(n_nodes - 1), b)
            base += 1
            y += dy
        seg_of_node = torch.repeat_interleave(torch.arange(len(m)), m)
        cs = hard.cumsum(0)
        before = torch.cat([cs.new_zeros(1, 2), cs])[offset]  # cumulated before each segment
        acc[:, :2] += cs - before[seg_of_node]
        x = lo_edge[seg_of_node] + h[seg_of_node] * (torch.arange(n_nodes) - offset[seg_of_node])
        hn = h[seg_of_node]
        g0, g1, d1, d2, d3 = acc.unbind(1)
        self.grid = dict(
            row=seg_row, lo=lo_edge, h=h, m=m, offset=offset,
            g0=torch.stack([g0, d1 * hn, d2 * hn**2, d3 * hn**3], 1),  # derivatives in grid units
            g1=torch.stack([g1, x * d1 * hn, (d1 + x * d2) * hn**2, (2 * d2 + x * d3) * hn**3], 1),
        )

    def _grid_eval(
        self, points: torch.Tensor, first_moment: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``G0`` (and ``G1``) of the tabulated segments at ``points[row]``, ``(S, P)``."""
        g = self.grid
        assert g is not None
        t = points[g["row"]]  # (S, P)
        xg = (t - g["lo"].unsqueeze(1)) / g["h"].unsqueeze(1)
        last = (g["m"] - 2).unsqueeze(1)
        j = torch.minimum(xg.floor().clamp_min(0), last.to(xg.dtype)).long()
        u = (xg - j).clamp(0.0, 1.0).flatten()
        i0 = (j + g["offset"].unsqueeze(1)).flatten()
        basis = _hermite_basis(u, 4)
        outs = []
        for key in ("g0", "g1") if first_moment else ("g0",):
            a0 = torch.index_select(g[key], 0, i0)  # (S P, 4): derivatives 0..3 at the node
            a1 = torch.index_select(g[key], 0, i0 + 1)
            val = torch.zeros_like(u)
            for d in range(4):
                val = val + basis[2 * d] * a0[:, d] + basis[2 * d + 1] * a1[:, d]
            outs.append(val.view_as(t))
        return outs[0], (outs[1] if first_moment else None)

    def cdf(
        self, points: torch.Tensor, first_moment: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``G0`` (and ``G1``) at sorted ``points`` ``(R, P)``, float64 ``(R, P)`` each."""
        R, P = points.shape
        out0 = torch.zeros(R, P, dtype=torch.float64)
        out1 = torch.zeros(R, P, dtype=torch.float64) if first_moment else None
        if self.seg_row.numel():
            parts = self._runs(
                self.seg_row, self.seg_start.unsqueeze(1), self.seg_end.unsqueeze(1),
                self.seg_sigma.unsqueeze(1), points[self.seg_row], first_moment,
            )
            out0.index_add_(0, self.seg_row, parts[0])
            if out1 is not None:
                out1.index_add_(0, self.seg_row, parts[1])
        if self.grid is not None:
            g0, g1 = self._grid_eval(points, first_moment)
            out0.index_add_(0, self.grid["row"], g0)
            if out1 is not None and g1 is not None:
                out1.index_add_(0, self.grid["row"], g1)
        return out0, out1

    def cells(self, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Weighted mass and first moment in the cells :math:`(t_{k-1}, t_k]`, ``(R, P + 1)``.

        .. math::

            S0_k = \sum_i \lambda_i (\Phi(b) - \Phi(a)), \qquad
            S1_k = \sum_i \lambda_i [\mu_i(\Phi(b) - \Phi(a)) + \sigma_i(\phi(a) - \phi(b))],

        as differences of :meth:`cdf` at consecutive thresholds (``t_{-1} = -inf``,
        ``t_P = +inf``).
        """
        G0, G1 = self.cdf(thresholds)
        if G1 is None:  # pragma: no cover - cdf always returns G1 when asked
            raise RuntimeError("first moment missing")
        zero = torch.zeros(self.R, 1, dtype=G0.dtype)
        S0 = torch.diff(torch.cat([zero, G0, self.total0.unsqueeze(1)], dim=1), dim=1)
        S1 = torch.diff(torch.cat([zero, G1, self.total1.unsqueeze(1)], dim=1), dim=1)
        return S0, S1


def _weighted_quantiles(v: torch.Tensor, weight: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    r"""Weighted quantiles of values already sorted per row, ``(R, n)`` -> ``(R, len(probs))``.

    Sorted values :math:`v_j` sit at plotting positions :math:`P_j = (W_j - \lambda_j/2)/W`
    (:math:`W_j` the cumulative weight, :math:`W` the total); the quantile at ``p`` interpolates
    linearly between them and is clamped to ``[v_0, v_{n-1}]``. With equal weights
    :math:`P_j = (j + 1/2)/n`: numpy's ``method="hazen"``.
    """
    cw = weight.cumsum(1)
    pos = (cw - 0.5 * weight) / cw[:, -1:]
    target = probs.to(v.dtype).expand(v.shape[0], -1).contiguous()
    i = torch.searchsorted(pos, target)
    n = v.shape[1]
    i_lo, i_hi = (i - 1).clamp(0, n - 1), i.clamp(0, n - 1)
    p_lo, p_hi = torch.gather(pos, 1, i_lo), torch.gather(pos, 1, i_hi)
    v_lo, v_hi = torch.gather(v, 1, i_lo), torch.gather(v, 1, i_hi)
    gap = p_hi - p_lo
    t = torch.where(gap > 0, (target - p_lo) / torch.where(gap > 0, gap, 1.0), 0.0).clamp(0, 1)
    return v_lo + t * (v_hi - v_lo)


def _mixture_quantiles(
    mix: _SortedMixture,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    weight: torch.Tensor,
    probs: torch.Tensor,
) -> torch.Tensor:
    r"""Quantiles of the weighted mixture :math:`\sum_i \lambda_i N(\mu_i, \sigma_i^2)` per row.

    Bisection on the mixture CDF :math:`F(t) = \sum_i \lambda_i \Phi((t - \mu_i)/\sigma_i) /
    \sum_i \lambda_i`, all quantiles of all rows at once (one :meth:`_SortedMixture.cdf` query
    per step), started from Cantelli's bracket :math:`m - s\sqrt{(1-p)/p} \le F^{-1}(p) \le m +
    s\sqrt{p/(1-p)}` (mixture mean :math:`m`, std :math:`s`) intersected with the span of the
    :math:`\pm 6\sigma` windows, and run until every bracket is narrower than
    ``_QUANTILE_RTOL * s``.
    """
    W = weight.sum(1, keepdim=True)
    mean = (weight * mu).sum(1, keepdim=True) / W
    var = (weight * ((mu - mean) ** 2 + sigma**2)).sum(1, keepdim=True) / W
    sd = var.sqrt()
    p = probs.to(mu.dtype).unsqueeze(0)
    lo = torch.maximum((mu - 6.0 * sigma).amin(1, keepdim=True), mean - sd * ((1 - p) / p).sqrt())
    hi = torch.minimum((mu + 6.0 * sigma).amax(1, keepdim=True), mean + sd * (p / (1 - p)).sqrt())
    hi = torch.maximum(hi, lo)
    target = p * W
    for _ in range(64):
        if not bool((hi - lo > _QUANTILE_RTOL * sd).any()):
            break
        mid = 0.5 * (lo + hi)
        s_mid, order = mid.sort(dim=1)
        G0, _ = mix.cdf(s_mid, first_moment=False)
        below_sorted = G0 < target.expand_as(mid).gather(1, order)  # F(mid) < p
        below = torch.empty_like(below_sorted).scatter_(1, order, below_sorted)
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (0.5 * (lo + hi)).sort(dim=1).values


@dataclass
class LloydMaxResult:
    """Unrounded Lloyd-Max levels (float64, sorted) and how the iteration ended."""

    levels: torch.Tensor
    n_iter: int
    converged: bool


def lloyd_max(
    mu: torch.Tensor,
    n_levels: int,
    sigma: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> LloydMaxResult:
    r"""Weighted Lloyd-Max levels for the mixture :math:`\sum_i \lambda_i N(\mu_i, \sigma_i^2)`.

    Minimises the weighted expected distortion :math:`\sum_i \lambda_i E[(Q(w_i) - w_i)^2]`,
    :math:`w_i \sim N(\mu_i, \sigma_i^2)`, over ``n_levels`` sorted levels with nearest-level
    :math:`Q` (thresholds :math:`t_k` at the midpoints, cells :math:`(t_{k-1}, t_k]`), by
    alternating the two optimality conditions:

    .. math::

        t_k = \frac{c_k + c_{k+1}}{2}, \qquad
        c_k = \frac{\sum_i \lambda_i E[w_i 1\{t_{k-1} < w_i \le t_k\}]}
                   {\sum_i \lambda_i P(t_{k-1} < w_i \le t_k)},

    with the truncated-normal moments :math:`P = \Phi(b) - \Phi(a)`, :math:`E[w 1\{\cdot\}] =
    \mu(\Phi(b) - \Phi(a)) + \sigma(\phi(a) - \phi(b))` (:math:`a, b` the standardised
    thresholds). The per-cell sums come from :class:`_SortedMixture` (sorted once; per update
    only the weights within :math:`6\sigma` of a threshold are evaluated, or wide posteriors
    are read from a table; never ``n x L``). A cell with (relative) mass below ``1e-13`` is
    empty and keeps its previous level. With ``sigma=None`` every weight is a
    point mass and this is weighted 1-D k-means (plain Lloyd).

    Initialisation (deterministic), at probabilities :math:`p_k = (k + 1/2)/L`: for point masses
    the weighted quantiles of ``mu`` (plotting positions :math:`(W_j - \lambda_j/2)/W`; numpy's
    ``"hazen"`` rule for equal weights), otherwise the quantiles of the weighted mixture itself
    (bisection on its CDF to ``1e-3`` mixture standard deviations), which stay distinct even
    when a single wide Gaussian makes up the whole mixture.

    Stops when :math:`\max_k |c_k^{new} - c_k^{old}| \le` ``tol`` :math:`(c_{L-1} - c_0)` for
    every row, or after ``max_iter`` updates.

    Parameters
    ----------
    mu : torch.Tensor
        Means: ``(n,)`` for one level set, ``(rows, n)`` for one level set per row.
    n_levels : int
        Number of levels ``L``.
    sigma : torch.Tensor, optional
        Standard deviations (``>= 0``), broadcastable to ``mu``; ``None`` for point masses.
    weight : torch.Tensor, optional
        Non-negative weights :math:`\lambda_i` (the precision for whitened distortion),
        broadcastable to ``mu``; ``None`` for equal weights.
    init : torch.Tensor, optional
        Initial levels ``(L,)`` or ``(rows, L)``, replacing the quantile initialisation.
    max_iter : int
        Maximum number of level updates.
    tol : float
        Convergence tolerance on the level movement relative to the level spread.

    Returns
    -------
    LloydMaxResult
        ``levels`` float64, sorted, ``(L,)`` or ``(rows, L)``; ``n_iter`` updates done;
        ``converged``.
    """
    if mu.dim() not in (1, 2) or mu.numel() == 0:
        raise ValueError(f"mu must be a non-empty (n,) or (rows, n) tensor, got {tuple(mu.shape)}")
    if int(n_levels) != n_levels or n_levels < 1:
        raise ValueError(f"n_levels must be a positive integer, got {n_levels!r}")
    L = int(n_levels)
    dt = torch.float64
    shared = mu.dim() == 1
    m = mu.to(dt).reshape(1, -1) if shared else mu.to(dt)
    w = torch.ones_like(m) if weight is None else weight.to(dt).expand(mu.shape).reshape(m.shape)
    g = None if sigma is None else sigma.to(dt).expand(mu.shape).reshape(m.shape).contiguous()
    w = w.contiguous()
    if not bool(torch.isfinite(m).all()):
        raise ValueError("mu has non-finite entries")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or bool((w.sum(1) <= 0).any()):
        raise ValueError("weight must be finite, non-negative and not all zero in a row")
    if g is not None and (not bool(torch.isfinite(g).all()) or bool((g < 0).any())):
        raise ValueError("sigma must be finite and non-negative")
    mix = _SortedMixture(m, g, w, n_points=L, n_queries=max_iter + 20)
    probs = (torch.arange(L, dtype=dt) + 0.5) / L
    if init is not None:
        levels = init.to(dt).expand(m.shape[0], L).sort(dim=1).values
    elif g is None:
        levels = _weighted_quantiles(mix.v_rows, mix.w_rows, probs)
    else:
        levels = _mixture_quantiles(mix, m, g, w, probs)
    floor = _MASS_FLOOR * mix.total0.unsqueeze(1)
    n_iter, converged = 0, False
    while n_iter < max_iter:
        S0, S1 = mix.cells(0.5 * (levels[:, 1:] + levels[:, :-1]))
        full = S0 > floor
        new = torch.where(full, S1 / torch.where(full, S0, 1.0), levels).sort(dim=1).values
        move = (new - levels).abs().amax(dim=1)
        levels = new
        n_iter += 1
        if bool((move <= tol * (levels[:, -1] - levels[:, 0])).all()):
            converged = True
            break
    return LloydMaxResult(levels[0] if shared else levels, n_iter, converged)


@dataclass
class NonuniformGrid:
    """fp16 codebook, the codes of the posterior mean on it, and the unrounded float64 levels.

    ``codebook`` is sorted, ``(2**bits,)`` or ``(rows, 2**bits)``; ``codes`` is ``uint8``
    ``(rows, cols)`` with every code the nearest stored (fp16) level of ``mu``; ``levels`` are
    the Lloyd-Max levels before rounding (same shape as ``codebook``).
    """

    codebook: torch.Tensor
    codes: torch.Tensor | None
    levels: torch.Tensor | None = None
    n_iter: int = 0
    converged: bool = False


def design_nonuniform(
    mu: torch.Tensor,
    bits: int,
    precision: torch.Tensor | None = None,
    per_row: bool = False,
    max_iter: int = 100,
    tol: float = 1e-6,
    range_objective: str = "expected",
    round_mean: bool = True,
    weight: torch.Tensor | None = None,
) -> NonuniformGrid:
    r"""``2**bits`` fp16 levels per block (or per row) by posterior-weighted Lloyd-Max.

    ``range_objective="deployed"`` instead weights the point masses ``mu`` by ``precision`` (weighted
    k-means: the deployed risk :math:`\sum_i \lambda_i (Q(\mu_i) - \mu_i)^2` that the tables
    score); the default ``"expected"`` is the posterior mixture described next.

    The levels minimise the whitened posterior-expected distortion

    .. math::

        \sum_i \lambda_i E_{w_i \sim N(\mu_i, \lambda_i^{-1})}[(Q(w_i) - w_i)^2],

    i.e. Lloyd-Max on the mixture :math:`\sum_i \lambda_i N(\mu_i, \sigma_i^2)`,
    :math:`\sigma_i = \lambda_i^{-1/2}` (see :func:`lloyd_max`: truncated-normal centroids,
    initialisation at the mixture's quantiles :math:`(k + 1/2)/L`, empty cells keep their
    level). With ``precision=None``: plain 1-D k-means on ``mu`` (point masses, equal weights),
    initialised at the ``"hazen"`` quantiles of ``mu``.

    After the iteration the levels are rounded to fp16 and sorted, and every code is the nearest
    *stored* level of ``mu`` (``bucketize`` on the midpoints of the fp16 levels, a tie going to
    the lower level), so :func:`dequantize` returns exactly the nearest codebook entry.

    Parameters
    ----------
    mu : torch.Tensor
        Posterior mean, ``(rows, cols)``.
    bits : int
        Bit-width; ``2**bits`` levels.
    precision : torch.Tensor, optional
        Posterior precision :math:`\lambda = 1/\sigma^2`, broadcastable to ``mu`` (clamped
        below at ``1e-30``).
    per_row : bool
        One codebook per row (vectorised over rows) instead of one for the block.
    max_iter : int
        Maximum number of Lloyd updates.
    tol : float
        Convergence tolerance on level movement relative to the level spread.
    range_objective : {"expected", "deployed"}
        Posterior mixture (Lloyd-Max) or precision-weighted point masses (weighted k-means).
    round_mean : bool
        Round ``mu`` onto the codebook; ``False`` leaves ``codes=None`` (error feedback follows).
    weight : torch.Tensor, optional
        Importance of each weight in the objective (e.g. the curvature), broadcastable to
        ``mu``; default ``precision``. ``precision`` then only sets the posterior's spread.

    Returns
    -------
    NonuniformGrid
        ``codebook`` fp16 ``(2**bits,)`` or ``(rows, 2**bits)``, ``codes`` uint8
        ``(rows, cols)`` (or ``None``), float64 ``levels``, ``n_iter``, ``converged``.
    """
    bits = check_bits(bits)
    if mu.dim() != 2:
        raise ValueError(f"mu must be (rows, cols), got shape {tuple(mu.shape)}")
    if range_objective not in SEARCHED_RANGES:
        raise ValueError(f"range_objective={range_objective!r}: use one of {SEARCHED_RANGES}")
    L = 2**bits
    sigma = None
    if precision is not None:
        lam = precision.to(torch.float64).expand(mu.shape).clamp_min(1e-30)
        sigma = lam.rsqrt() if range_objective == "expected" else None
        weight = lam if weight is None else weight.to(torch.float64).expand(mu.shape).clamp_min(
            1e-30)
    else:  # plain k-means on the point values
        weight = None
    x = mu if per_row else mu.reshape(-1)
    res = lloyd_max(
        x,
        L,
        sigma=None if sigma is None else sigma.reshape(x.shape),
        weight=None if weight is None else weight.reshape(x.shape),
        max_iter=max_iter,
        tol=tol,
    )
    book = res.levels.half()
    if not bool(torch.isfinite(book).all()):
        raise ValueError("codebook levels overflow fp16; rescale the layer or exclude it")
    book = book.sort(dim=-1).values
    if not round_mean:  # the caller rounds by error feedback
        return NonuniformGrid(codebook=book, codes=None, levels=res.levels, n_iter=res.n_iter,
                              converged=res.converged)
    b64 = book.double()  # fp16 midpoints are exact in float64
    mids = 0.5 * (b64[..., 1:] + b64[..., :-1])
    mu64 = mu.double()
    if per_row:
        codes = torch.searchsorted(mids.contiguous(), mu64.contiguous())  # row-wise bucketize
    else:
        codes = torch.bucketize(mu64, mids)
    return NonuniformGrid(
        codebook=book,
        codes=codes.to(torch.uint8),
        levels=res.levels,
        n_iter=res.n_iter,
        converged=res.converged,
    )
