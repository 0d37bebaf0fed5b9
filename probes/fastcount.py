"""A fused kernel for ``ActivationSparsityProbe.update`` on the CPU (issue 16 goal 3).

The probe's torch path makes one comparison and one sum over the activation tensor per count (the zero
plane, each near-zero threshold, the negative plane), plus passes for ``|a|``, its maximum, the per-channel
zero counts, the chunk unions and the float sums, then per-token bookkeeping (window sums, the token
histogram): about a dozen passes over ``[tokens, channels]`` and some fifty small operations per site and
batch. This module does all of it in one pass, in a small C function compiled on first use with the system's
C compiler and loaded with ``ctypes`` (which releases the GIL), and split over ``torch.get_num_threads()``
threads: where torch runs GNU OpenMP (its Linux wheels ship ``torch/lib/libgomp.so.1``) the kernel is built
with ``-fopenmp`` against that very runtime, so the parts run on torch's own thread team, awake from the
forward pass, each reading the rows its thread wrote (from ``2 * MIN_SPLIT_OMP`` entries); elsewhere on a
Python thread pool (from ``2 * MIN_SPLIT``: below that one thread is faster). Loading checks that no second
OpenMP runtime came into the process; if one did, the build is not used.

On a CPU with AVX-512 the row loop is written with intrinsics (counts as masked subtractions, the per-window
counts kept in vectors over up to 64 rows, the row after next asked for ahead of time); the portable loop
elsewhere. Both give the same bits (a test builds every flag set and compares). A site that takes a ReLU's output
can be counted in the ReLU's own pass instead (``relu_pass``: the ReLU written and counted in one pass over memory;
``probes.relu_pass``). A probe's update goes through ``accumulate``: the pass and the adding of its results to the
probe's state in one C call (``actsparse_merge``, in the order the numpy merge
``ActivationSparsityProbe._update_from_kernel`` uses, bit for bit), with the last batch layout's plan and buffers
kept as a C struct, so that the call converts four arguments: inside the model's forward each Python operation
costs several times what it costs elsewhere (``benchmarks/README.md``).

Exactness: the kernel reads the float32 activations as their IEEE-754 bit patterns. With
``ai = bits & 0x7fffffff`` (the bits of ``|x|``), non-negative floats order as their bit patterns, and
every NaN pattern lies above ``+inf`` (0x7f800000). So, for a threshold ``t >= 0`` given as the bits of the
float32 ``t``:

- ``|x| <= t``  is  ``ai <= bits(t)`` (false for NaN, as the float comparison);
- ``x == 0`` (``-0`` included) is ``ai == 0``;
- ``x < 0``  is  sign bit set, ``ai != 0`` and ``ai <= 0x7f800000`` (``-inf`` counts, ``-0`` and NaN do not);
- ``max |x|`` is the float whose bits are the largest ``ai``: a NaN anywhere gives a NaN, as ``torch.max``.

Every count is an integer, so the kernel's counts are exactly the torch path's (``tests/unit/
test_fastcount.py`` compares the two on random, NaN/inf/-0 and padded inputs). The float sums (``sum``,
``sum_abs``, ``sum_sq`` within a token in 16 fixed float32 lanes added in float64; across tokens, the token
fractions and the chunk sums in float64) follow the kernel's own fixed order, so they agree with the torch
path's to float rounding (at most 2.6e-9 relative in the golden tables).

Where it runs: CPU float32 tensors with at most ``MAX_EPS`` near-zero thresholds and fewer than 2^24
channels. Anything else, a machine without a C compiler, a failed build, or ``ACTSPARSE_NATIVE=0`` takes the
torch path; ``status()`` says which and why (the manifest records it). The shared library is cached under
``$ACTSPARSE_CACHE_DIR`` (default ``~/.cache/actsparse``), keyed by the source, the compiler flags, the
machine and its CPU flags, written atomically (concurrent processes never load half a file, another CPU
never gets an ``-march=native`` build it cannot run), and loaded only from a folder and file private to this
user.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

MAX_EPS = 4  # near-zero thresholds the kernel counts in one pass (the default grid has 3)
INF_BITS = 0x7F800000  # the bits of +inf: a largest |x| bit pattern at or above it means an inf or a NaN was seen

C_SOURCE = r"""
#include <stdint.h>
#include <string.h>

#define LANES 16
#define PREFETCH_ROWS 2  /* rows ahead the AVX-512 loop asks for (a 4 MiB activation just written: 289 -> 178 us) */
#define WF 8  /* per-window fields: zeros, |x| <= eps_0..eps_3, negatives, chunk-sparsity sum, full chunks */
typedef float vf __attribute__((vector_size(LANES * 4)));  /* LANES float32 lanes, whatever the CPU's width */
typedef int32_t vi __attribute__((vector_size(LANES * 4)));

/* torch.relu's bits for k entries (0 for a negative number: sign set, 0 < |x| <= inf; -0 and NaN as they are):
   the rows of a ReLU pass that no statistic counts (a unit of chunk index -2: padding, uncounted context). */
static void relu_rows(int32_t *restrict out, const int32_t *restrict in, int64_t k)
{
    for (int64_t i = 0; i < k; ++i)
        out[i] = (uint32_t)in[i] - 0x80000001u <= 0x7f7fffffu ? 0 : in[i];
}

/* A token's end: its LANES float32 partial sums added in float64 in lane order to the running sums acc[0..2], its
   non-zero fraction to acc[3] and the histogram, its zeros to its window's w[0]. */
static inline __attribute__((always_inline)) void token_done(const float *s, const float *sa, const float *sq,
                                                             int32_t z, int64_t c, int64_t nbins, int64_t *hist,
                                                             double *w, double *acc)
{
    double ts = 0, tsa = 0, tsq = 0;
    for (int l = 0; l < LANES; ++l) {
        ts += (double)s[l];
        tsa += (double)sa[l];
        tsq += (double)sq[l];
    }
    acc[0] += ts;
    acc[1] += tsa;
    acc[2] += tsq;
    const double f = (double)(c - z) / (double)c;
    acc[3] += f;
    int64_t bin = (int64_t)(f * (double)nbins);
    bin = bin < 0 ? 0 : (bin >= nbins ? nbins - 1 : bin);
    hist[bin] += 1;
    w[0] += z;
}

/* A full chunk's end: the channels non-zero somewhere in it (fewer zeros there than rows) to its window's w[6],
   w[7]. zc0 holds zc as it was at the chunk's start. */
static inline __attribute__((always_inline)) void chunk_done(const int32_t *zc, const int32_t *zc0, int64_t c,
                                                             int32_t rows, double *w)
{
    int32_t nz = 0;
    for (int64_t ch = 0; ch < c; ++ch) nz += zc[ch] - zc0[ch] < rows;
    w[6] += 1.0 - (double)nz / (double)c;
    w[7] += 1.0;
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* actsparse_counts on AVX-512 (the same results, bit for bit): the counts in mask registers, |x| <= eps_j,
   negatives and max |x| kept in vector accumulators over up to 64 rows of a unit (per-row totals are needed
   only for the zeros: the token histogram), only the thresholds in use compared, the float sums in the same
   16 lanes and order as the portable code (a masked add for the last c % 16 channels). */
static inline __attribute__((always_inline)) void avx512_block(
    const __m512i b, const __mmask16 km, const int nt, const __m512i *t, int32_t *zcp, __m512i *vz, __m512i *ve,
    __m512i *vng, __m512i *vmx, __m512 *vs, __m512 *vsa, __m512 *vsq, const int tail, const int relu)
{
    const __m512i m1 = _mm512_set1_epi32(-1);
    const __m512i ai = _mm512_and_si512(b, _mm512_set1_epi32(0x7fffffff));
    const __mmask16 kz = _mm512_mask_testn_epi32_mask(km, ai, ai);
    *vz = _mm512_mask_sub_epi32(*vz, kz, *vz, m1);
    if (tail) {
        __m512i z = _mm512_maskz_loadu_epi32(km, zcp);
        _mm512_mask_storeu_epi32(zcp, km, _mm512_mask_sub_epi32(z, kz, z, m1));
    } else {
        __m512i z = _mm512_loadu_si512(zcp);
        _mm512_storeu_si512(zcp, _mm512_mask_sub_epi32(z, kz, z, m1));
    }
    for (int j = 0; j < nt; ++j)
        ve[j] = _mm512_mask_sub_epi32(ve[j], _mm512_mask_cmple_epi32_mask(km, ai, t[j]), ve[j], m1);
    if (!relu) {  /* a ReLU's output has no negative number */
        const __mmask16 kn = _mm512_mask_cmple_epu32_mask(
            km, _mm512_sub_epi32(b, _mm512_set1_epi32((int)0x80000001u)), _mm512_set1_epi32(0x7f7fffff));
        *vng = _mm512_mask_sub_epi32(*vng, kn, *vng, m1);
    }
    *vmx = _mm512_max_epi32(*vmx, ai);  /* lanes outside km hold 0 (masked load) */
    const __m512 v = _mm512_castsi512_ps(b);
    if (tail) {
        *vs = _mm512_mask_add_ps(*vs, km, *vs, v);
        *vsa = _mm512_mask_add_ps(*vsa, km, *vsa, _mm512_castsi512_ps(ai));
        *vsq = _mm512_mask_add_ps(*vsq, km, *vsq, _mm512_mul_ps(v, v));
    } else {
        *vs = _mm512_add_ps(*vs, v);
        *vsa = _mm512_add_ps(*vsa, _mm512_castsi512_ps(ai));
        *vsq = _mm512_add_ps(*vsq, _mm512_mul_ps(v, v));
    }
}

/* torch.relu's bits: 0 for a negative number (sign set, 0 < |x| <= inf); -0 and NaN as they are. */
static inline __attribute__((always_inline)) __m512i avx512_relu(const __m512i b)
{
    const __mmask16 kneg = _mm512_cmple_epu32_mask(_mm512_sub_epi32(b, _mm512_set1_epi32((int)0x80000001u)),
                                                   _mm512_set1_epi32(0x7f7fffff));
    return _mm512_mask_mov_epi32(b, kneg, _mm512_setzero_si512());
}

static inline __attribute__((always_inline)) int32_t avx512_units(
    int32_t *restrict bits, const int32_t *restrict src, int64_t n, int64_t c, const int nt, const int32_t *tact,
    const int *slot,
    const int64_t *restrict ustart, const int64_t *restrict ulen, const int64_t *restrict uchunk,
    const int64_t *restrict uwin, int64_t u0, int64_t u1, double *restrict win, int64_t *restrict hist,
    int64_t nbins, double *restrict tot, int32_t *restrict zc, int32_t *restrict zc0)
{
    __m512i t[4];
    for (int j = 0; j < nt; ++j) t[j] = _mm512_set1_epi32(tact[j]);
    const int64_t cl = c - c % 16;
    const __mmask16 ktail = (__mmask16)((1u << (c % 16)) - 1u);
    __m512i vmx = _mm512_setzero_si512();
    double acc[4] = {0, 0, 0, 0};  /* the sums of x, |x|, x*x and of the tokens' non-zero fractions */
    for (int64_t u = u0; u < u1; ++u) {
        const int64_t ci = uchunk[u];
        if (ci == -2) {  /* rows of a ReLU pass that nothing counts: written only */
            if (src)
                relu_rows(bits + ustart[u] * c, src + ustart[u] * c, ulen[u] * c);
            continue;
        }
        double *restrict w = win + uwin[u] * 8;
        if (ci >= 0)
            memcpy(zc0, zc, (size_t)c * sizeof *zc);
        const int64_t r0 = ustart[u], r1 = r0 + ulen[u];
        for (int64_t rb = r0; rb < r1; rb += 64) {  /* lanes count at most 64 * c / 16 < 2^31 */
            const int64_t re = rb + 64 < r1 ? rb + 64 : r1;
            __m512i ve[4], vng = _mm512_setzero_si512();
            for (int j = 0; j < 4; ++j) ve[j] = _mm512_setzero_si512();
            for (int64_t r = rb; r < re; ++r) {
                int32_t *restrict row = bits + r * c;
                const int32_t *restrict in = src ? src + r * c : row;  /* with src: its ReLU, written to row */
                if (r + PREFETCH_ROWS < n) {  /* the row after next into L1: the loop alone waits on memory */
                    const char *next = (const char *)(in + PREFETCH_ROWS * c);
                    for (int64_t o = 0; o < c * 4; o += 64)
                        _mm_prefetch(next + o, _MM_HINT_T0);
                }
                __m512i vz = _mm512_setzero_si512();
                __m512 vs = _mm512_setzero_ps(), vsa = _mm512_setzero_ps(), vsq = _mm512_setzero_ps();
                for (int64_t ch = 0; ch < cl; ch += 16) {
                    __m512i b = _mm512_loadu_si512(in + ch);
                    if (src) {  /* counted from the register it is written from */
                        b = avx512_relu(b);
                        _mm512_storeu_si512(row + ch, b);
                    }
                    avx512_block(b, (__mmask16)0xffff, nt, t, zc + ch, &vz, ve, &vng, &vmx, &vs, &vsa, &vsq, 0,
                                 src != 0);
                }
                if (cl < c) {
                    __m512i b = _mm512_maskz_loadu_epi32(ktail, in + cl);
                    if (src) {
                        b = avx512_relu(b);
                        _mm512_mask_storeu_epi32(row + cl, ktail, b);
                    }
                    avx512_block(b, ktail, nt, t, zc + cl, &vz, ve, &vng, &vmx, &vs, &vsa, &vsq, 1, src != 0);
                }
                float s[16], sa[16], sq[16];
                _mm512_storeu_ps(s, vs);
                _mm512_storeu_ps(sa, vsa);
                _mm512_storeu_ps(sq, vsq);
                token_done(s, sa, sq, _mm512_reduce_add_epi32(vz), c, nbins, hist, w, acc);
            }
            for (int j = 0; j < nt; ++j) w[1 + slot[j]] += _mm512_reduce_add_epi32(ve[j]);
            w[5] += _mm512_reduce_add_epi32(vng);
        }
        if (ci >= 0)
            chunk_done(zc, zc0, c, (int32_t)ulen[u], w);
    }
    for (int k = 0; k < 4; ++k) tot[k] += acc[k];
    return _mm512_reduce_max_epi32(vmx);
}

static int32_t avx512_counts(int32_t *restrict bits, const int32_t *restrict src, int64_t n, int64_t c,
                             const int32_t *restrict tb,
                             const int64_t *restrict ustart, const int64_t *restrict ulen,
                             const int64_t *restrict uchunk, const int64_t *restrict uwin, int64_t u0, int64_t u1,
                             double *restrict win, int64_t *restrict hist, int64_t nbins, double *restrict tot,
                             int32_t *restrict zc, int32_t *restrict zc0)
{
    int32_t tact[4];
    int slot[4], nt = 0;
    for (int j = 0; j < 4; ++j)  /* a threshold slot of -1 counts nothing: leave it out */
        if (tb[j] >= 0) {
            tact[nt] = tb[j];
            slot[nt++] = j;
        }
#define UNITS(SRC, NT) avx512_units(bits, SRC, n, c, NT, tact, slot, ustart, ulen, uchunk, uwin, u0, u1, win, hist, \
                                   nbins, tot, zc, zc0)
    if (src) {  /* the ReLU pass: the same loop, another instance */
        switch (nt) {
        case 0: return UNITS(src, 0);
        case 1: return UNITS(src, 1);
        case 2: return UNITS(src, 2);
        case 3: return UNITS(src, 3);
        default: return UNITS(src, 4);
        }
    }
    switch (nt) {
    case 0: return UNITS(0, 0);
    case 1: return UNITS(0, 1);
    case 2: return UNITS(0, 2);
    case 3: return UNITS(0, 3);
    default: return UNITS(0, 4);
    }
#undef UNITS
}
#endif

/* Statistics over rows [ustart[u], ustart[u] + ulen[u]) for units u in [u0, u1) of a float32 matrix
   x[n][c] (vals), read also as its int32 bit patterns (bits, the same memory). A unit is a run of
   consecutive tokens of window uwin[u]: a full chunk of k tokens (uchunk[u] >= 0) or tokens outside any full
   chunk (uchunk[u] < 0). Adds, for this part of the units (the caller sums the parts):
   - win[w][0..7]: the window's zeros, |x| <= eps_j (j < 4), negatives, sum over its full chunks of
     1 - (channels non-zero in the chunk) / c, and its number of full chunks;
   - hist[b]: tokens whose non-zero fraction f = (c - zeros) / c falls in bin b = (int)(f * nbins), clamped;
   - tot[0..3]: the sums of x, |x| and x*x, and of f, over the tokens. A token's sums run in LANES
     interleaved float32 partial sums (lane l takes channels l, l + LANES, ...) added in float64 in lane order:
     a fixed order (and no fused multiply-add: -ffp-contract=off), whatever the CPU's vector width;
   - zc[ch]: the tokens on which channel ch is zero (zc0: c int32 of scratch, zc at the start of a chunk).
   Returns the largest |x| bit pattern seen (0 when no row): the float with those bits is max |x| (NaN when
   any entry is NaN).
   counts_impl with src (the ReLU pass, for a site that takes a ReLU's output): each row is first written as the
   ReLU of src's row (torch.relu's bits: 0 for a negative number, -0 and NaN as they are), then counted while it
   is in cache (AVX-512: from the register it is written from); actsparse_counts passes none. */
static int32_t counts_impl(int32_t *restrict bits, const float *restrict vals, int64_t n, int64_t c,
                           const int32_t *restrict tb, const int64_t *restrict ustart,
                           const int64_t *restrict ulen, const int64_t *restrict uchunk,
                           const int64_t *restrict uwin, int64_t u0, int64_t u1, double *restrict win,
                           int64_t *restrict hist, int64_t nbins, double *restrict tot, int32_t *restrict zc,
                           int32_t *restrict zc0, const int32_t *restrict src)
{
#if defined(__AVX512F__)
    (void)vals;
    return avx512_counts(bits, src, n, c, tb, ustart, ulen, uchunk, uwin, u0, u1, win, hist, nbins, tot, zc, zc0);
#endif
    const int32_t t0 = tb[0], t1 = tb[1], t2 = tb[2], t3 = tb[3];
    const int64_t cl = c - c % LANES;
    int32_t m = 0;
    double acc[4] = {0, 0, 0, 0};  /* the sums of x, |x|, x*x and of the tokens' non-zero fractions */
    (void)n;
    for (int64_t u = u0; u < u1; ++u) {
        const int64_t ci = uchunk[u];
        if (ci == -2) {  /* rows of a ReLU pass that nothing counts: written only */
            if (src)
                relu_rows(bits + ustart[u] * c, src + ustart[u] * c, ulen[u] * c);
            continue;
        }
        double *restrict w = win + uwin[u] * WF;
        if (ci >= 0)  /* the chunk's per-channel zero counts are zc's growth over it: keep zc at its start */
            memcpy(zc0, zc, (size_t)c * sizeof *zc);
        const int64_t r1 = ustart[u] + ulen[u];
        for (int64_t r = ustart[u]; r < r1; ++r) {
            if (src) {
                int32_t *restrict out = bits + r * c;
                const int32_t *restrict in = src + r * c;
                for (int64_t ch = 0; ch < c; ++ch)
                    out[ch] = (uint32_t)in[ch] - 0x80000001u <= 0x7f7fffffu ? 0 : in[ch];
            }
            const int32_t *restrict row = bits + r * c;
            const float *restrict fr = vals + r * c;
            int32_t z = 0, e0 = 0, e1 = 0, e2 = 0, e3 = 0, ng = 0, mr = 0;
            for (int64_t ch = 0; ch < c; ++ch) {
                const int32_t b = row[ch];
                const int32_t ai = b & 0x7fffffff;
                const int32_t iz = ai == 0;
                z += iz;
                zc[ch] += iz;
                e0 += ai <= t0;
                e1 += ai <= t1;
                e2 += ai <= t2;
                e3 += ai <= t3;
                ng += (uint32_t)b - 0x80000001u <= 0x7f7fffffu;  /* sign set, 0 < |x| <= inf: not -0, not NaN */
                mr = ai > mr ? ai : mr;
            }
            vf vs = {0}, vsa = {0}, vsq = {0};
            for (int64_t ch = 0; ch < cl; ch += LANES) {
                vf v;
                memcpy(&v, fr + ch, sizeof v);
                vs += v;
                vsa += (vf)((vi)v & 0x7fffffff);
                vsq += v * v;
            }
            float s[LANES], sa[LANES], sq[LANES];
            memcpy(s, &vs, sizeof s);
            memcpy(sa, &vsa, sizeof sa);
            memcpy(sq, &vsq, sizeof sq);
            for (int64_t ch = cl; ch < c; ++ch) {
                const float v = fr[ch];
                s[ch - cl] += v;
                sa[ch - cl] += __builtin_fabsf(v);
                sq[ch - cl] += v * v;
            }
            token_done(s, sa, sq, z, c, nbins, hist, w, acc);
            w[1] += e0;
            w[2] += e1;
            w[3] += e2;
            w[4] += e3;
            w[5] += ng;
            m = mr > m ? mr : m;
        }
        if (ci >= 0)
            chunk_done(zc, zc0, c, (int32_t)ulen[u], w);
    }
    for (int k = 0; k < 4; ++k) tot[k] += acc[k];
    return m;
}

int32_t actsparse_counts(const int32_t *bits, const float *vals, int64_t n, int64_t c, const int32_t *tb,
                         const int64_t *ustart, const int64_t *ulen, const int64_t *uchunk, const int64_t *uwin,
                         int64_t u0, int64_t u1, double *win, int64_t *hist, int64_t nbins, double *tot, int32_t *zc,
                         int32_t *zc0)
{
    return counts_impl((int32_t *)bits, vals, n, c, tb, ustart, ulen, uchunk, uwin, u0, u1, win, hist, nbins, tot,
                       zc, zc0, 0);
}

/* Adds one pass's per-part results to a probe's state, with the float operations in the order the numpy code of
   probes/sparsity.py's _update_from_kernel uses (parts summed first, part 0 onwards; then windows, window 0
   onwards), so the state is the same bits; and writes the pass's window rows. win [parts][nwin][WF], hist
   [parts][nbins], tot [parts][4] and zc [parts][c] are actsparse_counts' outputs, m the largest |x| bits, n the
   rows counted, lens [nwin] the counted tokens per window (as doubles). rows [nwin][5 + G] gets, per window,
   its tokens, zeros, negatives, |x| <= eps_j (j < G), chunk-sparsity sum and full chunks. st: the addresses of the
   state's n_tokens, zero, near_zero[G], neg (int64), sum, sum_abs, sum_sq, max_abs (double), channel_active[c],
   token_hist[nbins] (int64), token_nz_sum, chunk_sum (double), n_chunks (int64), in that order. */
void actsparse_merge(int64_t parts, int64_t nwin, int64_t c, int64_t nbins, int64_t G, int64_t n, int32_t m,
                     const double *win, const int64_t *hist, const double *tot, const int32_t *zc,
                     const double *lens, double *rows, void *const *st)
{
    int64_t *n_tokens = st[0], *zero = st[1], *near = st[2], *neg = st[3];
    double *sum = st[4], *sum_abs = st[5], *sum_sq = st[6], *max_abs = st[7];
    int64_t *active = st[8], *token_hist = st[9];
    double *nz_sum = st[10], *chunk_sum = st[11];
    int64_t *n_chunks = st[12];
    const int64_t F = 5 + G, S = nwin * WF;
    int cols[4 + 4];  /* window fields in row order after lens: zero, neg, eps_0..eps_{G-1}, chunk sum, chunks */
    cols[0] = 0;
    cols[1] = 5;
    for (int64_t j = 0; j < G; ++j) cols[2 + j] = 1 + (int)j;
    cols[2 + G] = 6;
    cols[3 + G] = 7;
    double wt[4 + 4];  /* the windows' sums per field */
    for (int64_t b = 0; b < nwin; ++b) {
        double *row = rows + b * F;
        row[0] = lens[b];
        for (int64_t f = 0; f < 4 + G; ++f) {
            const double *w = win + b * WF + cols[f];
            double v = w[0];
            for (int64_t p = 1; p < parts; ++p) v += w[p * S];
            row[1 + f] = v;
            wt[f] = b == 0 ? v : wt[f] + v;
        }
    }
    *n_tokens += n;
    if (nwin > 0) {
        *zero += (int64_t)wt[0];
        *neg += (int64_t)wt[1];
        for (int64_t j = 0; j < G; ++j) near[j] += (int64_t)wt[2 + j];
        *chunk_sum += wt[2 + G];
        *n_chunks += (int64_t)wt[3 + G];
    }
    double ts[4];
    for (int f = 0; f < 4; ++f) {
        double v = tot[f];
        for (int64_t p = 1; p < parts; ++p) v += tot[p * 4 + f];
        ts[f] = v;
    }
    *sum += ts[0];
    *sum_abs += ts[1];
    *sum_sq += ts[2];
    *nz_sum += ts[3];
    float mf;
    memcpy(&mf, &m, sizeof mf);
    const double md = (double)mf;
    if (md != md || md > *max_abs) *max_abs = md;
    for (int64_t ch = 0; ch < c; ++ch) {
        int64_t z = zc[ch];
        for (int64_t p = 1; p < parts; ++p) z += zc[p * c + ch];
        active[ch] += n - z;
    }
    for (int64_t i = 0; i < nbins; ++i) {
        int64_t h = hist[i];
        for (int64_t p = 1; p < parts; ++p) h += hist[p * nbins + i];
        token_hist[i] += h;
    }
}

#ifdef _OPENMP
/* The units split at bounds[0..parts] over `parts` threads of the OpenMP runtime torch already runs (the
   build links torch's own libgomp): part i zeroes and writes win[i], hist[i], tot[i], zc[i] and zc0[i], which the
   caller sums. Part 0 runs on the calling thread and part i on team thread i (static schedule, one part each): the
   rows a thread reads are those that torch's equally split elementwise kernels had that thread write. With src,
   the ReLU pass (counts_impl). */
static int32_t counts_parts_impl(int32_t *bits, const float *vals, int64_t n, int64_t c, const int32_t *tb,
                                 const int64_t *ustart, const int64_t *ulen, const int64_t *uchunk,
                                 const int64_t *uwin, const int64_t *bounds, int64_t parts, int64_t nwin,
                                 double *win, int64_t *hist, int64_t nbins, double *tot, int32_t *zc, int32_t *zc0,
                                 int32_t *mparts, const int32_t *src)
{
    #pragma omp parallel for num_threads((int)parts) schedule(static, 1)
    for (int64_t i = 0; i < parts; ++i) {
        memset(win + i * nwin * WF, 0, (size_t)(nwin * WF) * sizeof *win);  /* each part zeroes its own buffers */
        memset(hist + i * nbins, 0, (size_t)nbins * sizeof *hist);
        memset(tot + i * 4, 0, 4 * sizeof *tot);
        memset(zc + i * c, 0, (size_t)c * sizeof *zc);
        mparts[i] = counts_impl(bits, vals, n, c, tb, ustart, ulen, uchunk, uwin, bounds[i], bounds[i + 1],
                                win + i * nwin * WF, hist + i * nbins, nbins, tot + i * 4, zc + i * c, zc0 + i * c,
                                src);
    }
    int32_t m = 0;
    for (int64_t i = 0; i < parts; ++i)
        m = mparts[i] > m ? mparts[i] : m;
    return m;
}

int32_t actsparse_counts_parts(const int32_t *bits, const float *vals, int64_t n, int64_t c, const int32_t *tb,
                               const int64_t *ustart, const int64_t *ulen, const int64_t *uchunk,
                               const int64_t *uwin, const int64_t *bounds, int64_t parts, int64_t nwin,
                               double *win, int64_t *hist, int64_t nbins, double *tot, int32_t *zc, int32_t *zc0,
                               int32_t *mparts)
{
    return counts_parts_impl((int32_t *)bits, vals, n, c, tb, ustart, ulen, uchunk, uwin, bounds, parts, nwin, win,
                             hist, nbins, tot, zc, zc0, mparts, 0);
}

/* actsparse_counts_parts, then actsparse_merge into a probe's state (st), in one call. */
int32_t actsparse_counts_into(const int32_t *bits, const float *vals, int64_t n, int64_t c, const int32_t *tb,
                              const int64_t *ustart, const int64_t *ulen, const int64_t *uchunk, const int64_t *uwin,
                              const int64_t *bounds, int64_t parts, int64_t nwin, double *win, int64_t *hist,
                              int64_t nbins, double *tot, int32_t *zc, int32_t *zc0, int32_t *mparts, int64_t G,
                              const double *lens, double *rows, void *const *st)
{
    const int32_t m = actsparse_counts_parts(bits, vals, n, c, tb, ustart, ulen, uchunk, uwin, bounds, parts, nwin,
                                             win, hist, nbins, tot, zc, zc0, mparts);
    actsparse_merge(parts, nwin, c, nbins, G, n, m, win, hist, tot, zc, lens, rows, st);
    return m;
}

/* Everything actsparse_counts_into takes but the tensor, the rows and the state: set up once per batch layout,
   so that a call from Python converts four arguments, not twenty-three. */
typedef struct {
    const int32_t *tb;
    const int64_t *ustart, *ulen, *uchunk, *uwin, *bounds;
    const double *lens;
    double *win;
    int64_t *hist;
    double *tot;
    int32_t *zc, *zc0, *mparts;
    int64_t n, c, parts, nwin, nbins, G, rows;  /* n: counted rows; rows: the tensor's (a ReLU pass's uncounted) */
} actsparse_job;

int32_t actsparse_job_run(const actsparse_job *j, const int32_t *x, double *rows, void *const *st)
{
    return actsparse_counts_into(x, (const float *)x, j->n, j->c, j->tb, j->ustart, j->ulen, j->uchunk, j->uwin,
                                 j->bounds, j->parts, j->nwin, j->win, j->hist, j->nbins, j->tot, j->zc, j->zc0,
                                 j->mparts, j->G, j->lens, rows, st);
}

/* The ReLU pass of a job: out (the job's n x c) gets torch.relu of src, counted into the job's per-part buffers;
   actsparse_job_merge adds them to a probe's state later (or never, when the site does not see out). */
int32_t actsparse_job_relu(const actsparse_job *j, const int32_t *src, int32_t *out)
{
    return counts_parts_impl(out, (const float *)out, j->rows, j->c, j->tb, j->ustart, j->ulen, j->uchunk, j->uwin,
                             j->bounds, j->parts, j->nwin, j->win, j->hist, j->nbins, j->tot, j->zc, j->zc0,
                             j->mparts, src);
}

void actsparse_job_merge(const actsparse_job *j, int32_t m, double *rows, void *const *st)
{
    actsparse_merge(j->parts, j->nwin, j->c, j->nbins, j->G, j->n, m, j->win, j->hist, j->tot, j->zc, j->lens, rows,
                    st);
}
#endif
"""

# -mprefer-vector-width=512: gcc otherwise keeps AVX-512 CPUs to 256-bit vectors; the full width made the
# bundled model's 8 x 256 x 512 call 0.50 -> 0.37 ms on an Intel Xeon (gcc's -march=native: rocketlake).
# The sums' order is set by LANES, not by the vector width, so the results are the same bits (ignored
# without AVX-512).
_FLAG_SETS = (["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-fPIC", "-shared"],
              ["-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared"],
              ["-O3", "-ffp-contract=off", "-fPIC", "-shared"])


def torch_libgomp() -> str | None:
    """The folder of the GNU OpenMP runtime torch loads (``torch/lib/libgomp.so.1`` in the Linux wheels), or
    None (another runtime, or none). A kernel built with ``-fopenmp`` against that very file shares torch's
    thread team: one runtime in the process, threads already awake from the forward pass."""
    import importlib.util

    if not sys.platform.startswith("linux"):
        return None
    spec = importlib.util.find_spec("torch")
    for root in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(root) / "lib"
        if (lib / "libgomp.so.1").is_file():
            return str(lib)
    return None


def _flag_sets() -> list[list[str]]:
    """Compiler flags to try, best first: the first set again with OpenMP on torch's runtime (where torch has
    GNU OpenMP), then ``_FLAG_SETS``."""
    lib = torch_libgomp()
    omp = [[*_FLAG_SETS[0], "-fopenmp", f"-L{lib}", f"-Wl,-rpath,{lib}"]] if lib else []
    return [*omp, *_FLAG_SETS]


def _gomp_files() -> set[str]:
    """The OpenMP runtime files mapped into this process (Linux): torch's, and any other library's own (e.g.
    scikit-learn vendors one under another name), which a build of ours must not add to."""
    try:
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line or "libomp" in line}
    except OSError:
        return set()
_LOCK = threading.Lock()
_STATE: dict = {"fn": None, "tried": False, "status": "not tried", "parts_fn": None, "into_fn": None,
                "merge_fn": None, "job_fn": None, "relu_fn": None, "job_merge_fn": None}
_POOL: dict = {"executor": None, "size": 0}


def enabled_by_env() -> bool:
    return os.environ.get("ACTSPARSE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    env = os.environ.get("ACTSPARSE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "actsparse"


def _cpu_signature() -> str:
    """What a ``-march=native`` build depends on: the machine, and the CPU's model and feature flags."""
    parts = [platform.machine(), platform.system()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name", "Features", "CPU part")):
                parts.append(line)
                if len(parts) > 6:
                    break
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _private(path: Path) -> bool:
    """Whether ``path`` (a folder or a file) belongs to this user and nobody else can write to it: a shared
    library from a place another user can write to would run their code."""
    if not hasattr(os, "getuid"):
        return True
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _build(cc: str, flags: list[str], target: Path) -> None:
    """Compile ``C_SOURCE`` to ``target`` atomically (a temporary file in the same folder, then a rename)."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _private(target.parent):
        raise OSError(f"{target.parent} is not private to this user")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        src = Path(tmp) / "actsparse_counts.c"
        src.write_text(C_SOURCE)
        out = Path(tmp) / target.name
        subprocess.run([cc, *flags, "-o", str(out), str(src)], check=True, capture_output=True, timeout=120)
        os.replace(out, target)


def _load_library():
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc or clang) on PATH"
    errors = []
    for flags in _flag_sets():
        key = hashlib.sha256("\n".join([C_SOURCE, " ".join(flags), _cpu_signature(), sys.platform]).encode())
        name = f"actsparse_counts-{key.hexdigest()[:16]}.so"
        uid = os.getuid() if hasattr(os, "getuid") else 0
        for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"actsparse-{uid}"):
            target = folder / name
            try:
                if not target.exists():
                    _build(cc, flags, target)
                if not (_private(target) and _private(target.parent)):
                    raise OSError(f"{target} is not private to this user")
                omp = "-fopenmp" in flags
                before = _gomp_files() if omp else set()
                if omp and os.path.realpath(Path(torch_libgomp() or "") / "libgomp.so.1") not in {
                        os.path.realpath(f) for f in before}:  # torch's runtime is not loaded: nothing to share
                    raise OSError("torch's OpenMP runtime is not loaded")
                lib = ctypes.CDLL(str(target))
                fn = lib.actsparse_counts
                if omp and _gomp_files() != before:  # pragma: no cover - a second runtime came in; do not use it
                    raise OSError("the OpenMP build loaded a second OpenMP runtime")
            except (OSError, subprocess.SubprocessError, AttributeError) as e:
                errors.append(f"{' '.join(flags)} in {folder}: {type(e).__name__}")
                continue
            i64, p = ctypes.c_int64, ctypes.c_void_p
            fn.argtypes = [p, p, i64, i64, p, p, p, p, p, i64, i64, p, p, i64, p, p, p]
            fn.restype = ctypes.c_int32
            merge_fn = lib.actsparse_merge
            merge_fn.argtypes = [i64, i64, i64, i64, i64, i64, ctypes.c_int32, p, p, p, p, p, p, p]
            merge_fn.restype = None
            _STATE["merge_fn"] = merge_fn
            if omp:
                parts_fn = lib.actsparse_counts_parts
                parts_fn.argtypes = [p, p, i64, i64, p, p, p, p, p, p, i64, i64, p, p, i64, p, p, p, p]
                parts_fn.restype = ctypes.c_int32
                _STATE["parts_fn"] = parts_fn
                into_fn = lib.actsparse_counts_into
                into_fn.argtypes = [*parts_fn.argtypes, i64, p, p, p]
                into_fn.restype = ctypes.c_int32
                _STATE["into_fn"] = into_fn
                job_fn = lib.actsparse_job_run
                job_fn.argtypes = [p, p, p, p]
                job_fn.restype = ctypes.c_int32
                _STATE["job_fn"] = job_fn
                relu_fn = lib.actsparse_job_relu
                relu_fn.argtypes = [p, p, p]
                relu_fn.restype = ctypes.c_int32
                _STATE["relu_fn"] = relu_fn
                job_merge_fn = lib.actsparse_job_merge
                job_merge_fn.argtypes = [p, ctypes.c_int32, p, p]
                job_merge_fn.restype = None
                _STATE["job_merge_fn"] = job_merge_fn
            marks = " ".join(f for f in flags if f.startswith("-m")) or "portable"
            split = "; parts on torch's OpenMP threads" if omp else ""
            return fn, f"native kernel ({marks}{split}; {target})"
    return None, "the C kernel did not build: " + "; ".join(errors)


def kernel():
    """The compiled counting function, or None (then ``status()`` says why). Built and loaded once per process."""
    if _STATE["tried"]:
        return _STATE["fn"]
    with _LOCK:
        if not _STATE["tried"]:
            if not enabled_by_env():
                fn, why = None, "ACTSPARSE_NATIVE=0"
            else:
                try:
                    fn, why = _load_library()
                except Exception as e:  # never let an optional accelerator break a run
                    fn, why = None, f"the C kernel did not load: {type(e).__name__}: {e}"
            _STATE.update(fn=fn, status=why, tried=True)
    return _STATE["fn"]


def status() -> dict:
    """``{"kernel": "native" | "torch", "detail": ...}`` for the manifest (after ``kernel()`` was asked)."""
    return {"kernel": "native" if _STATE["fn"] is not None else "torch", "detail": _STATE["status"]}


def reset_for_tests() -> None:
    _STATE.update(fn=None, tried=False, status="not tried", parts_fn=None, into_fn=None, merge_fn=None, job_fn=None,
                  relu_fn=None, job_merge_fn=None)
    _JOB[0] = None
    _RELU_JOBS[0], _RELU_JOBS[1] = None, []


def supports(x, n_eps: int) -> bool:
    """Whether the kernel can count ``x`` (a 2-D tensor) with ``n_eps`` thresholds."""
    import torch

    return (n_eps <= MAX_EPS and x.dtype is torch.float32 and x.dim() == 2 and x.device.type == "cpu"
            and x.shape[-1] < (1 << 24) and (_STATE["fn"] is not None or kernel() is not None))


def threshold_bits(eps_grid) -> "object":
    """int32 ``[MAX_EPS]``: the bit patterns of the float32 thresholds (``-0.0`` as ``+0``), -1 for unused slots
    (no ``|x|`` bit pattern is <= -1, so an unused slot counts nothing)."""
    import numpy as np

    out = np.full(MAX_EPS, -1, dtype=np.int32)
    for j, e in enumerate(eps_grid):
        f = np.float32(e)
        if f == 0:
            f = np.float32(0.0)
        out[j] = f.view(np.int32) if f >= 0 else -1  # |x| <= a negative threshold never holds
    return out


def units(lens: list[int], k: int, at: list[int] | None = None, rows: int | None = None):
    """Row ranges the kernel walks: each window's full chunks of ``k`` tokens (with their chunk index, in
    window order) and its leftover tokens (index -1). Returns ``(start, length, chunk, window, n_chunks)``
    (int64 arrays and a count). Rows are the counted rows one after another, or, with ``at`` (a ReLU pass over
    a tensor of ``rows`` rows, ``len(lens)`` windows of ``rows // len(lens)``), window ``w``'s counted rows start
    at row ``at[w]`` and the rows around them are units of their own that are only written (index -2)."""
    import numpy as np

    starts, lengths, chunks, windows = [], [], [], []
    off, ci = 0, 0
    T = rows // len(lens) if at is not None and lens else 0
    for w, L in enumerate(lens):
        if at is not None:
            off = at[w]
            if off > w * T:  # uncounted rows before
                starts.append(w * T)
                lengths.append(off - w * T)
                chunks.append(-2)
                windows.append(w)
        full = L // k if k > 0 else 0
        for j in range(full):
            starts.append(off + j * k)
            lengths.append(k)
            chunks.append(ci)
            windows.append(w)
            ci += 1
        rest = L - full * k
        if rest:
            starts.append(off + full * k)
            lengths.append(rest)
            chunks.append(-1)
            windows.append(w)
        off += L
        if at is not None and off < (w + 1) * T:  # uncounted rows after
            starts.append(off)
            lengths.append((w + 1) * T - off)
            chunks.append(-2)
            windows.append(w)
    i64 = np.int64
    return (np.asarray(starts, i64), np.asarray(lengths, i64), np.asarray(chunks, i64), np.asarray(windows, i64),
            ci)


MIN_SPLIT = 1 << 20  # inside a forward, splitting 8 x 256 x 512 over two Python threads cost more than it gained
# On torch's OpenMP team (already awake from the forward pass) a split costs microseconds, and each thread reads
# the rows it wrote: the bundled model's 8 x 256 x 512 in two parts made its four counts 1.111x -> 1.064x of a
# bare forward on a 2-core Intel Xeon.
MIN_SPLIT_OMP = 1 << 16


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: start a new pool there when one is needed."""
    _POOL["executor"], _POOL["size"] = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _executor(size: int):
    from concurrent.futures import ThreadPoolExecutor

    if _POOL["executor"] is None or _POOL["size"] < size:
        if _POOL["executor"] is not None:
            _POOL["executor"].shutdown(wait=False)
        _POOL["executor"] = ThreadPoolExecutor(max_workers=size, thread_name_prefix="actsparse-count")
        _POOL["size"] = size
    return _POOL["executor"]


_PLAN: list = [None]  # (key, plan) of the batch seen last: every site of a batch shares it
N_WINDOW_FIELDS = 8  # the kernel's per-window fields (see C_SOURCE)


def _plan(lens: list[int], k: int, n: int, c: int, parts: int, eps_grid, at: list[int] | None = None,
          rows: int | None = None) -> dict:
    """What one ``count`` call needs besides the data, worked out once per batch layout (the sites of one
    forward share it): the units, their split over ``parts`` threads and the threshold bits. ``at``, ``rows``: a
    ReLU pass with uncounted rows (``units``)."""
    import numpy as np

    key = (tuple(lens), k, n, c, parts, tuple(eps_grid), None if at is None else (tuple(at), rows))
    last = _PLAN[0]  # one (key, plan) tuple: read and replaced whole, so threads never mix two batches
    if last is not None and last[0] == key:
        return last[1]
    ustart, ulen, uchunk, uwin, n_chunks = units(lens, k, at, rows)
    U = len(ustart)
    cum = np.cumsum(ulen)  # split the units so that each part has about the same number of rows
    total = n if at is None else rows
    bounds = [0] + [int(np.searchsorted(cum, total * i / parts, side="left")) + 1 for i in range(1, parts)] + [U]
    bounds = [min(max(b, 0), U) for b in bounds]
    tb = threshold_bits(eps_grid)
    bounds_arr = np.asarray(bounds, dtype=np.int64)
    lens_d = np.asarray(lens, dtype=np.float64)
    plan = {"arrays": (ustart, ulen, uchunk, uwin, tb, bounds_arr, lens_d), "bounds": bounds, "n_chunks": n_chunks,
            "ptrs": tuple(a.ctypes.data for a in (tb, ustart, ulen, uchunk, uwin, bounds_arr)),
            "lens_ptr": lens_d.ctypes.data}
    _PLAN[0] = (key, plan)
    return plan


def count(valid, eps_grid, lens: list[int], k: int, threads: int = 1, nbins: int = 1000) -> dict:
    """One pass over ``valid`` (``[n, c]`` float32, contiguous CPU; rows in window order, ``lens`` counted tokens
    per window) for every statistic of ``probes.sparsity.ActivationSparsityProbe.update``. numpy arrays:

    - ``windows`` ``[len(lens), 4 + len(eps_grid)]`` float64 (exact integers but the chunk sums): per window
      ``zero``, ``neg``, one column per threshold (``|x| <= eps``), ``chunk_sum`` (sum over its full chunks of
      k tokens of 1 - union of non-zero channels / c) and ``n_chunks``;
    - ``hist`` ``[nbins]`` int64: tokens by non-zero fraction; ``zero_channel`` ``[c]`` int64;
    - ``sums`` ``[4]`` float64: the sums of x, |x|, x*x and of the tokens' non-zero fractions;
    - ``max_abs``: max |x| as a Python float (NaN when any entry is NaN).

    ``launch`` + ``finish`` are the same in two steps (the pass, then the results from its per-part buffers)."""
    return finish(launch(valid, eps_grid, lens, k, threads, nbins))


class Raw:
    """What ``launch`` leaves for ``finish``: the per-part buffers the kernel wrote and the largest ``|x|`` bits."""

    __slots__ = ("bufs", "key", "mbits", "parts", "G")

    def __init__(self, bufs, key, mbits: int, parts: int, G: int):
        self.bufs, self.key, self.mbits, self.parts, self.G = bufs, key, mbits, parts, G

    @property
    def max_abs(self) -> float:
        return float_of_bits(self.mbits)


def float_of_bits(bits: int) -> float:
    """The float32 whose bit pattern is ``bits`` (the kernel's largest ``|x|`` bits: max ``|x|``, NaN past inf)."""
    import numpy as np

    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


# Per-part buffers by shape, reused: ``launch`` takes a set (zeroed) and ``finish`` gives it back, so a pass in
# steady state allocates nothing (a probe's update runs inside the model's forward; see sparsity.py).
_BUFS: dict[tuple, list] = {}
_BUFS_LOCK = threading.Lock()
_BUFS_KEEP = 16  # sets kept per shape


def _part_buffers(parts: int, B: int, c: int, nbins: int) -> tuple:
    """The kernel's per-part buffers (see C_SOURCE): windows' fields, token histogram, sums, per-channel zero
    counts and their copy at a chunk's start, largest ``|x|`` bits."""
    import numpy as np

    return (np.zeros((parts, B, N_WINDOW_FIELDS)), np.zeros((parts, nbins), dtype=np.int64), np.zeros((parts, 4)),
            np.zeros((parts, c), dtype=np.int32), np.empty((parts, c), dtype=np.int32), np.zeros(parts, dtype=np.int32))


def _take(parts: int, B: int, c: int, nbins: int, zero: bool = True):
    """A set of per-part buffers from the pool (zeroed unless ``zero`` is False: the OpenMP entry points zero
    their parts themselves, each thread its own, in the cache it is about to write them from)."""
    key = (parts, B, c, nbins)
    with _BUFS_LOCK:
        free = _BUFS.get(key)
        bufs = free.pop() if free else None
    if bufs is None:
        arrays = _part_buffers(parts, B, c, nbins)
        return key, (*arrays, tuple(a.ctypes.data for a in arrays))  # the addresses, looked up once
    if zero:
        for a in bufs[:4]:
            a.fill(0)
    return key, bufs


def _give_back(key, bufs) -> None:
    with _BUFS_LOCK:
        free = _BUFS.setdefault(key, [])
        if len(free) < _BUFS_KEEP:
            free.append(bufs)


def _parts(n: int, c: int, lens: list[int], k: int, threads: int) -> int:
    """How many parts the pass over an ``[n, c]`` matrix is split into."""
    n_units = len(lens) * (1 + (max(lens) // k if k > 0 and lens else 0))  # an upper bound is enough here
    # a Python thread hand-off costs tens of microseconds: split only tensors worth it (>= MIN_SPLIT entries a
    # part); torch's OpenMP team, where the build shares it, from MIN_SPLIT_OMP
    split = MIN_SPLIT if _STATE["parts_fn"] is None else MIN_SPLIT_OMP
    return max(1, min(int(threads), n_units, (n * c) // split))


def launch(valid, eps_grid, lens: list[int], k: int, threads: int = 1, nbins: int = 1000) -> Raw:
    """The kernel's pass over ``valid`` (``count``'s arguments) into pooled per-part buffers; ``finish`` turns
    them into ``count``'s results. Between the two the buffers belong to the caller (nothing else writes them)."""
    fn = kernel()
    valid = valid.contiguous()
    n, c = valid.shape
    parts = _parts(n, c, lens, k, threads)
    plan = _plan(lens, k, n, c, parts, eps_grid)
    parts_fn = _STATE["parts_fn"]
    key, bufs = _take(parts, len(lens), c, nbins, zero=parts_fn is None or parts == 1)
    mbits = _run(fn, parts_fn, valid, n, c, parts, len(lens), nbins, plan, bufs)
    return Raw(bufs, key, int(mbits), parts, len(eps_grid))


def _run(fn, parts_fn, valid, n: int, c: int, parts: int, B: int, nbins: int, plan: dict, bufs) -> int:
    """The kernel's pass over ``valid`` in ``parts`` parts into ``bufs``; returns the largest ``|x|`` bits."""
    tb_p, us_p, ul_p, uc_p, uw_p, bounds_p = plan["ptrs"]
    bounds = plan["bounds"]
    win, hist, tot, zc, zc0, mparts, addr = bufs
    win_p, hist_p, tot_p, zc_p, zc0_p, m_p = addr
    x_p = valid.data_ptr()
    stride = (B * N_WINDOW_FIELDS * 8, nbins * 8, 4 * 8, c * 4)

    def run(i):
        return fn(x_p, x_p, n, c, tb_p, us_p, ul_p, uc_p, uw_p, bounds[i], bounds[i + 1], win_p + i * stride[0],
                  hist_p + i * stride[1], nbins, tot_p + i * stride[2], zc_p + i * stride[3], zc0_p + i * stride[3])

    if parts == 1:
        return run(0)
    if parts_fn is not None:  # mparts: held by bufs, the kernel writes through its address
        return parts_fn(x_p, x_p, n, c, tb_p, us_p, ul_p, uc_p, uw_p, bounds_p, parts, B, win_p, hist_p, nbins, tot_p,
                        zc_p, zc0_p, m_p)
    futures = [_executor(parts - 1).submit(run, i) for i in range(1, parts)]
    return max([run(0)] + [f.result() for f in futures])


# actsparse_merge's state (``st``): which entries are doubles (the others int64) and which are not one number.
_ST_DOUBLE = frozenset({4, 5, 6, 7, 10, 11})
_ST_SIZE = {2: "n_eps", 8: "width", 9: "nbins"}
N_STATE = 13


def addresses(tensors) -> "ctypes.Array":
    """The tensors' data addresses as a ctypes array (``accumulate``'s ``state_ptrs``), unchecked."""
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def state_addresses(tensors, width: int, n_eps: int, nbins: int):
    """``addresses`` of a probe's state tensors in ``actsparse_merge``'s order (see its comment), or None when one
    is not a contiguous CPU tensor of the dtype (float64 or int64) and size the merge writes there."""
    import torch

    sizes = {"n_eps": n_eps, "width": width, "nbins": nbins}
    if len(tensors) != N_STATE:
        return None
    for i, t in enumerate(tensors):
        want = torch.float64 if i in _ST_DOUBLE else torch.int64
        if (not torch.is_tensor(t) or t.device.type != "cpu" or t.dtype != want or not t.is_contiguous()
                or t.numel() != sizes.get(_ST_SIZE.get(i), 1)):
            return None
    return addresses(tensors)


class _Job(ctypes.Structure):
    """``actsparse_job`` (C_SOURCE): one batch layout's plan and per-part buffers, for ``actsparse_job_run``."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("tb", "ustart", "ulen", "uchunk", "uwin", "bounds", "lens", "win",
                                                      "hist", "tot", "zc", "zc0", "mparts")] + \
               [(name, ctypes.c_int64) for name in ("n", "c", "parts", "nwin", "nbins", "G", "rows")]


class _JobHolder:
    __slots__ = ("struct", "address", "keep", "lock", "rows", "rows_address", "key")


_JOB: list = [None]  # (key, _JobHolder) of the batch layout seen last (the sites of a forward share it)


def _new_job(key: tuple, lens: list[int], k: int, threads: int, nbins: int, eps_grid) -> "_JobHolder":
    """``make_job``, kept as the last job (``accumulate``'s)."""
    job = make_job(key, lens, k, threads, nbins, eps_grid)
    _JOB[0] = (key, job)
    return job


def make_job(key: tuple, lens: list[int], k: int, threads: int, nbins: int, eps_grid, at: list[int] | None = None,
             rows: int | None = None) -> "_JobHolder":
    """The plan and per-part buffers of the batch layout ``key`` (``(n, c, ...)``: its counted rows and channels
    first) as an ``actsparse_job``: ``accumulate``'s last job, or one for a ReLU pass (``relu_job``; ``at`` and
    ``rows`` where not every row of its tensor counts, see ``units``)."""
    import numpy as np

    n, c = key[0], key[1]
    B = len(lens)
    parts = _parts(n if at is None else rows, c, lens, k, threads)  # an OpenMP build: MIN_SPLIT_OMP
    plan = _plan(lens, k, n, c, parts, eps_grid, at, rows)
    bufs = _part_buffers(parts, B, c, nbins)
    ustart, ulen, uchunk, uwin, tb, bounds, lens_d = plan["arrays"]
    job = _JobHolder()
    job.struct = _Job(*[a.ctypes.data for a in (tb, ustart, ulen, uchunk, uwin, bounds, lens_d, *bufs)],
                      n, c, parts, B, nbins, len(eps_grid), n if at is None else rows)
    job.address = ctypes.addressof(job.struct)
    job.keep = (plan, bufs)  # what the struct points into
    job.lock = threading.Lock()
    job.rows = np.empty((B, 5 + len(eps_grid)))
    job.rows_address = job.rows.ctypes.data
    return job


_RELU_JOBS: list = [None, []]  # the ReLU passes' free jobs: [layout key, jobs] of the last layout
_RELU_LOCK = threading.Lock()
RELU_JOBS_KEEP = 256  # free jobs kept (one per site of a forward)


def relu_job(key: tuple, lens: list[int], k: int, threads: int, nbins: int, eps_grid, at: list[int] | None = None,
             rows: int | None = None) -> "_JobHolder":
    """A job (``make_job``'s) of the batch layout ``key`` for one ``relu_pass``, the caller's own until it gives it
    back (``relu_job_back``): its buffers hold the pass's counts until they are added to a probe's state, after
    the forward. Free jobs of the last layout are kept for the next forward."""
    with _RELU_LOCK:
        free = _RELU_JOBS[1] if _RELU_JOBS[0] == key else None
        if free:
            return free.pop()
    job = make_job(key, lens, k, threads, nbins, eps_grid, at, rows)
    job.key = key
    return job


def relu_job_back(job: "_JobHolder") -> None:
    with _RELU_LOCK:
        if _RELU_JOBS[0] != job.key:  # another layout: the last one's jobs go
            _RELU_JOBS[0], _RELU_JOBS[1] = job.key, []
        if len(_RELU_JOBS[1]) < RELU_JOBS_KEEP:
            _RELU_JOBS[1].append(job)


def relu_pass(job: "_JobHolder", src, out) -> int:
    """``out`` (a contiguous float32 CPU tensor of ``job``'s ``n x c``) gets ``torch.relu(src)`` (``src`` the same
    shape; the same bits as torch's), counted into ``job``'s per-part buffers on the way: one pass over memory
    where a ReLU and a count after it take two. Returns the largest ``|x|`` bits; ``relu_merge`` adds the counts
    to a probe's state. Only where ``_STATE["relu_fn"]`` is there (an OpenMP build)."""
    return int(_STATE["relu_fn"](job.address, src.data_ptr(), out.data_ptr()))


def relu_merge(job: "_JobHolder", mbits: int, state_ptrs):
    """``relu_pass``'s counts (in ``job``'s buffers) added to the probe state at ``state_ptrs``
    (``state_addresses``), as ``accumulate`` adds its pass; returns the pass's window rows (``accumulate``'s
    ``rows``)."""
    _STATE["job_merge_fn"](job.address, mbits, job.rows_address, state_ptrs)
    return job.rows.copy()


def job_results(job: "_JobHolder", mbits: int, G: int) -> dict:
    """``count``'s results from a job's buffers (``relu_pass``'s counts), for a state the C merge does not take."""
    win, hist, tot, zc = job.keep[1][:4]
    return _results(win, hist, tot, zc, int(job.struct.parts), G, float_of_bits(mbits))


def accumulate(valid, eps_grid, lens: list[int], k: int, threads: int, nbins: int, state_ptrs):
    """``launch`` + ``finish`` + adding the results to a probe's state, with the merge in C: the state tensors at
    ``state_ptrs`` (``state_addresses``) get the pass's counts and sums, the same bits as
    ``ActivationSparsityProbe._update_from_kernel`` would add. Returns ``(rows, mbits)``: the pass's window rows
    ``[len(lens), 5 + len(eps_grid)]`` float64 (tokens, zeros, negatives, the thresholds' counts, chunk-sparsity
    sum, full chunks) and the largest ``|x|`` bit pattern (>= 0x7f800000: an inf or NaN was seen)."""
    import numpy as np

    job_fn = _STATE["job_fn"]
    if job_fn is not None and valid.is_contiguous():  # the common case, with as little Python as it takes
        n, c = valid.shape
        key = (n, c, tuple(lens), k, threads, tuple(eps_grid), nbins, MIN_SPLIT_OMP)
        last = _JOB[0]
        job = last[1] if last is not None and last[0] == key else _new_job(key, lens, k, threads, nbins, eps_grid)
        if job.lock.acquire(False):  # else another thread runs it now: the general path below
            try:  # (the job's own rows buffer, copied: numpy's .ctypes of a new array runs Python code)
                mbits = job_fn(job.address, valid.data_ptr(), job.rows_address, state_ptrs)
                rows = job.rows.copy()
            finally:
                job.lock.release()
            return rows, int(mbits)
    fn = kernel()
    valid = valid.contiguous()
    n, c = valid.shape
    B, G = len(lens), len(eps_grid)
    parts_fn, into_fn = _STATE["parts_fn"], _STATE["into_fn"]
    parts = _parts(n, c, lens, k, threads)
    plan = _plan(lens, k, n, c, parts, eps_grid)
    key, bufs = _take(parts, B, c, nbins, zero=into_fn is None)
    rows = np.empty((B, 5 + G))
    win_p, hist_p, tot_p, zc_p, zc0_p, m_p = bufs[6]
    try:
        if into_fn is not None:  # the pass on torch's OpenMP team and the merge, in one call
            tb_p, us_p, ul_p, uc_p, uw_p, bounds_p = plan["ptrs"]
            x_p = valid.data_ptr()
            mbits = into_fn(x_p, x_p, n, c, tb_p, us_p, ul_p, uc_p, uw_p, bounds_p, parts, B, win_p, hist_p, nbins,
                            tot_p, zc_p, zc0_p, m_p, G, plan["lens_ptr"], rows.ctypes.data, state_ptrs)
        else:
            mbits = _run(fn, parts_fn, valid, n, c, parts, B, nbins, plan, bufs)
            _STATE["merge_fn"](parts, B, c, nbins, G, n, mbits, win_p, hist_p, tot_p, zc_p, plan["lens_ptr"],
                               rows.ctypes.data, state_ptrs)
    finally:
        _give_back(key, bufs)
    return rows, int(mbits)


def finish(raw: Raw) -> dict:
    """``count``'s results from ``launch``'s buffers, which go back to the pool."""
    win, hist, tot, zc = raw.bufs[:4]
    out = _results(win, hist, tot, zc, raw.parts, raw.G, raw.max_abs)
    _give_back(raw.key, raw.bufs)
    raw.bufs = None
    return out


def _results(win, hist, tot, zc, parts: int, G: int, max_abs: float) -> dict:
    """``count``'s results from per-part buffers (copies: the buffers are reused)."""
    import numpy as np

    if parts > 1:
        win, hist, tot, zc = win.sum(0), hist.sum(0), tot.sum(0), zc.sum(0, dtype=np.int64)
    else:
        win, hist, tot, zc = win[0].copy(), hist[0].copy(), tot[0].copy(), zc[0].astype(np.int64)
    cols = [0, 5, *range(1, 1 + G), 6, 7]  # zero, neg, the grid's thresholds, chunk_sum, n_chunks
    return {"windows": win[:, cols], "hist": hist, "zero_channel": zc, "sums": tot, "max_abs": max_abs}
