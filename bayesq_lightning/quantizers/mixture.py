r"""Partial sums of a weighted Gaussian mixture, sorted once and queried many times.

:class:`SortedMixture` answers :math:`G_0(t) = \sum_i \lambda_i \Phi(z_i)` and
:math:`G_1(t) = \sum_i \lambda_i (\mu_i \Phi(z_i) - \sigma_i \phi(z_i))` at a few points per
query, exactly near each point or from a tabulated Hermite interpolant for wide posteriors, so
that :func:`~bayesq_lightning.quantizers.lloyd.lloyd_max` never evaluates ``n x L`` terms.
"""

from __future__ import annotations

import math

import torch

from .normal import INV_SQRT2PI, SQRT2, Phi, phi

CHUNK = 1 << 20  # weights per pass of the cell walks: temporaries stay O(CHUNK), never n x L
_GRID_PER_SIGMA = 1.5  # tabulated partial sums: nodes per smallest sigma (septic Hermite, ~1e-9)
_MAX_GRID = 1 << 20  # nodes per tabulated segment at most


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


class SortedMixture:
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
      in chunks of about ``CHUNK`` weights. For a ``sigma`` below the cell width this touches
      only the weights near a threshold;
    * tabulated (wide segments, whose windows span many cells): :math:`G_0, G_1` and their
      derivatives up to the third (:math:`G_0^{(1)} = \sum \lambda\phi(z)/\sigma`, ...) are
      computed once, exactly, on a grid of spacing :math:`h = \sigma_{min} /`
      ``_GRID_PER_SIGMA`` and queried by septic two-point Hermite interpolation (error about
      :math:`2 \cdot 10^{-9}` of the mass), so each weight is evaluated about
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
            # queries [k0, k1) hold about CHUNK exact evaluations (at least one query)
            done = int(cum[k0 - 1].item()) if k0 else 0
            k1 = int(torch.searchsorted(cum, min(done + CHUNK, total), right=True).item())
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
