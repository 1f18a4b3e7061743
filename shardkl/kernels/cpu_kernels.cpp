// shardkl's CPU kernels: the per-token stats (forward) and the logit gradients (backward) of one [rows, cols]
// block of raw logits, for shardkl/kernels/cpu.py.
//
// Built on first use by the C++ toolchain torch.compile uses on CPU (torch._inductor's code cache: the same
// compiler flags, the same at::vec vector types for AVX2 / AVX-512 / NEON / ..., OpenMP), once per pair of input
// dtypes: SHARDKL_TA / SHARDKL_TB are float, at::BFloat16 or at::Half; everything is computed in fp32.
//
// Forward, per row (rows in parallel), per leaf of at most SHARDKL_MAX_CHUNK columns (the eager tiling's vocabulary
// chunk), three passes, the last two over data already in cache:
//   1. the maxima of a and b (from cache: the row was prefetched during pass 2 of the previous row);
//   2. ea = exp(a - max_a), eb = exp(b - max_b) into a per-thread scratch row, and their sums;
//   3. the KL terms in g-form from ea, eb, and the entropy terms: no transcendental at all.
// Two exponentials per pair of logits; leaves of a longer row are merged with the stats monoid in double.
// Backward: one pass per row, P and Q recomputed from the saved log-sum-exps (two exponentials per pair).
// The formulas, and the handling of -inf, NaN and +inf, are those of shardkl/_stats.py (leaf_stats, merge_stats,
// chunk_grads); the comments there explain them.

#include <torch/csrc/inductor/cpp_prefix.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using TA = SHARDKL_TA;
using TB = SHARDKL_TB;
using Vec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;
constexpr int64_t W = Vec::size();
constexpr float INF = std::numeric_limits<float>::infinity();
constexpr int64_t MAX_CHUNK = SHARDKL_MAX_CHUNK;
// elements summed in fp32 before the partial sum is added in double (error ~ BLOCK / W ulp, not sqrt(cols) ulp)
constexpr int64_t BLOCK = 512;
static_assert(BLOCK % 64 == 0, "BLOCK must be a multiple of every vector width");

// Row vectors of the backward, rows of the [8, rows] `vecs` argument.
enum { LSE_A, LSE_B, KL, ENT, GRAD_KL, GRAD_ENT, GRAD_LOGP, GRAD_LOGQ };
// Bits of `flags`.
enum : int64_t {
  BACKWARD = 1, TWO = 2, WANT_ENT = 4, SCALE = 8, HAS_GRAD_KL = 16, HAS_GRAD_ENT = 32, HAS_GRAD_LOGP = 64,
  HAS_GRAD_LOGQ = 128, WRITE_A = 256, WRITE_B = 512,
};

// Lane masks and selects. at::vec's comparisons return vectors of all-ones lanes and its blendv compares them back
// into a mask: four instructions where AVX-512's mask registers need two, on every compare-and-select of the hot
// loops. So AVX-512 uses its mask registers directly, any other ISA at::vec's portable form.
#if defined(CPU_CAPABILITY_AVX512)
using Mask = __mmask16;
inline Mask lt(const Vec& x, const Vec& y) { return _mm512_cmp_ps_mask(x, y, _CMP_LT_OQ); }
inline Mask gt(const Vec& x, const Vec& y) { return _mm512_cmp_ps_mask(x, y, _CMP_GT_OQ); }
inline Mask eq(const Vec& x, const Vec& y) { return _mm512_cmp_ps_mask(x, y, _CMP_EQ_OQ); }
inline Vec select(Mask m, const Vec& if_true, const Vec& if_false) {
  return _mm512_mask_blend_ps(m, if_false, if_true);
}
// the larger of x and y, or y where either is NaN
inline Vec max_or_second(const Vec& x, const Vec& y) { return _mm512_max_ps(x, y); }
#else
using Mask = Vec;
inline Mask lt(const Vec& x, const Vec& y) { return x < y; }
inline Mask gt(const Vec& x, const Vec& y) { return x > y; }
inline Mask eq(const Vec& x, const Vec& y) { return x == y; }
inline Vec select(const Mask& m, const Vec& if_true, const Vec& if_false) { return Vec::blendv(if_false, if_true, m); }
inline Vec max_or_second(const Vec& x, const Vec& y) { return select(gt(x, y), x, y); }
#endif

// n <= W elements of p as fp32; the lanes past n are -inf (no mass)
template <typename T>
inline Vec load(const T* p, int64_t n) {
  Vec x;
  if constexpr (std::is_same_v<T, float>) {
    x = n == W ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
    x = at::vec::convert<float, 1, T, 1>(at::vec::Vectorized<T>::loadu(p, n));
  }
  return n == W ? x : Vec::set(Vec(-INF), x, n);
}

template <typename T>
inline void store(T* p, const Vec& v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, n);
  } else {
    at::vec::convert<T, 1, float, 1>(v).store(p, n);
  }
}

// exp(x) for x <= 88 (every argument here is <= 0 up to rounding): Cody-Waite reduction by ln 2, a degree-5
// minimax polynomial on [-ln2/2, ln2/2] (1.7e-7 relative, 3 ulp) and 2^n from its exponent bits; 0 below -86.6
// (results under 2e-38, where 2^n would leave the normal range), NaN for NaN. Inlined, unlike the
// library call behind Vec::exp(), so that the compiler interleaves it with the rest of the loop.
inline Vec exp_(const Vec& x) {
  const Vec lo(-86.6f);
  Mask under = lt(x, lo);
  Vec xc = select(under, lo, x);
  Vec n = (xc * Vec(1.44269504088896341f)).round();
  Vec r = at::vec::fmadd(n, Vec(-0.693359375f), xc);
  r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
  Vec y = at::vec::fmadd(Vec(0.008312532678246498f), r, Vec(0.04189012572169304f));
  y = at::vec::fmadd(y, r, Vec(0.16667114198207855f));
  y = at::vec::fmadd(y, r, Vec(0.499992311000824f));
  y = at::vec::fmadd(y, r, Vec(1.0f));
  y = at::vec::fmadd(y, r, Vec(1.0f));
  // 2^n from its exponent bits, n in [-125, 127]
  IVec bits = (at::vec::convert_to_int_of_same_size(n) + IVec(127)) << IVec(23);
  return select(under, Vec(0.0f), y * at::vec::cast<float>(bits));
}

// (exp(d) - 1 - d) / d^2 for |d| < 0.5: its Taylor series to d^6 (truncation < 5e-8 relative)
inline Vec gap_series(const Vec& d) {
  Vec s = at::vec::fmadd(Vec(1.0f / 40320), d, Vec(1.0f / 5040));
  s = at::vec::fmadd(s, d, Vec(1.0f / 720));
  s = at::vec::fmadd(s, d, Vec(1.0f / 120));
  s = at::vec::fmadd(s, d, Vec(1.0f / 24));
  s = at::vec::fmadd(s, d, Vec(1.0f / 6));
  return at::vec::fmadd(s, d, Vec(0.5f));
}

inline float reduce_max(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, v);
}

inline double reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v);
}

inline void prefetch(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 2);
#endif
}

template <typename T>
bool has_nan(const T* p, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(static_cast<float>(p[j]))) return true;
  }
  return false;
}

struct Leaf {
  double la, ent, lb, kl;
};

// Stats of one leaf of at most MAX_CHUNK columns (leaf_stats of shardkl/_stats.py). ea, eb: scratch rows of
// round_up(n, W) floats. next_a, next_b: the same columns of the next row, prefetched into cache (or null).
// (two inputs and the temperature scaling are template arguments, so that the loops have no branches on them and
// the compiler interleaves the two inputs' independent exponentials)
template <bool two, bool scale>
Leaf leaf(const TA* a, const TB* b, int64_t n, float inv_t, int64_t flags, float* ea, float* eb, const TA* next_a,
          const TB* next_b) {
  const bool want_ent = flags & WANT_ENT;
  const Vec it(inv_t);
  // pass 1: the maxima, without propagating NaN (the running max keeps its value past a NaN, or becomes NaN and
  // moves on): a NaN still turns the sums of pass 2 into NaN (exp(NaN)) and with them the lse, except where the
  // max is +inf, and that (rare) leaf is searched for NaN.
  Vec vma(-INF), vmb(-INF);
  auto maxima = [&](int64_t j, int64_t c) {
    Vec x = load(a + j, c);
    vma = max_or_second(scale ? x * it : x, vma);
    if (two) {
      Vec y = load(b + j, c);
      vmb = max_or_second(scale ? y * it : y, vmb);
    }
  };
  int64_t j = 0;
  for (; j + W <= n; j += W) maxima(j, W);
  if (j < n) maxima(j, n - j);
  float ma = reduce_max(vma), mb = two ? reduce_max(vmb) : 0.0f;
  if (ma == INF && has_nan(a, n)) ma = std::numeric_limits<float>::quiet_NaN();
  if (two && mb == INF && has_nan(b, n)) mb = std::numeric_limits<float>::quiet_NaN();
  // a leaf without mass is shifted by 0, not by -inf (-inf - -inf = NaN)
  const Vec ma_shift(ma == -INF ? 0.0f : ma), mb_shift(mb == -INF ? 0.0f : mb);
  // pass 2: e = exp(x - max) into the scratch rows, and the sums s. Prefetching the current row when there is no
  // next one is harmless and keeps the loop free of branches.
  const TA* pre_a = next_a ? next_a : a;
  const TB* pre_b = next_b ? next_b : b;
  double sa = 0.0, sb = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
    const int64_t j1 = std::min(n, j0 + BLOCK);
    Vec acc_a(0.0f), acc_b(0.0f);
    auto body = [&](int64_t j, int64_t c) {
      Vec x = load(a + j, c);
      Vec e = exp_((scale ? x * it : x) - ma_shift);
      e.store(ea + j);
      acc_a = acc_a + e;
      prefetch(pre_a + j);
      if (two) {
        prefetch(pre_b + j);
        Vec y = load(b + j, c);
        Vec f = exp_((scale ? y * it : y) - mb_shift);
        f.store(eb + j);
        acc_b = acc_b + f;
      }
    };
    // full vectors (the width a constant, so no tail handling inside), then the tail
    j = j0;
    for (; j + W <= j1; j += W) body(j, W);
    if (j < j1) body(j, j1 - j);
    sa += reduce_sum(acc_a);
    if (two) sb += reduce_sum(acc_b);
  }
  Leaf out{};
  // lse = max + log s; +inf logits report +inf, NaN logits NaN (through max and s); no mass: -inf
  const double ma_s = ma == -INF ? 0.0 : ma, mb_s = mb == -INF ? 0.0 : mb;
  out.la = ma == INF ? INF : ma_s + std::log(sa);
  out.lb = two ? (mb == INF ? INF : mb_s + std::log(sb)) : 0.0;
  // log P = (x - max) - log s, the max taken out first so that huge logits (near the dtype's limits) keep log s;
  // a leaf without mass has log s = +inf, so that its log P is -inf, not NaN
  const double a_lse = sa == 0.0 ? INF : ma_s + std::log(sa), b_lse = sb == 0.0 ? INF : mb_s + std::log(sb);
  const Vec log_sa(sa == 0.0 ? INF : static_cast<float>(std::log(sa)));
  const Vec log_sb(sb == 0.0 ? INF : static_cast<float>(std::log(sb)));
  const Vec inv_sa(sa == 0.0 ? 1.0f : static_cast<float>(1.0 / sa));
  const Vec inv_sb(sb == 0.0 ? 1.0f : static_cast<float>(1.0 / sb));
  if (!two && !want_ent) return out;
  // pass 3: entropy terms -P log P and KL terms P g(x) from the cached e, no transcendental.
  // d = log Q - log P = (b - a) - shift, shift = (max_b + log s_b) - (max_a + log s_a): for close logits b - a
  // rounds once and the subtraction of the shift is exact, 4x less error than (b - lse_b) - (a - lse_a)
  const Vec shift(static_cast<float>(b_lse - a_lse));
  // huge finite logits (near the dtype's limits) can make the shift overflow fp32 where each log-probability is
  // fine (P and Q both uniform over logits at +max and -max): then d = log Q - log P, each side on its own
  const bool per_side = !std::isfinite(static_cast<float>(b_lse - a_lse)) && std::isfinite(a_lse) &&
                        std::isfinite(b_lse);
  const Vec zero(0.0f), half(0.5f);
  double ent = 0.0, kl = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
    const int64_t j1 = std::min(n, j0 + BLOCK);
    Vec acc_ent(0.0f), acc_kl(0.0f);
    auto body = [&](int64_t j, int64_t c) {
      Vec e = Vec::loadu(ea + j);
      Vec x = load(a + j, c);
      x = scale ? x * it : x;
      Vec p = e * inv_sa;
      // P = 0 (a -inf logit or an underflow): 0 log 0 = 0, and the KL term's limit is Q
      Mask p_zero = eq(e, zero);
      if (want_ent) acc_ent = acc_ent + select(p_zero, zero, p * ((x - ma_shift) - log_sa));
      if (two) {
        Vec y = load(b + j, c);
        y = scale ? y * it : y;
        Vec q = Vec::loadu(eb + j) * inv_sb;
        // P g(x) with d = -x: P (e^d - 1 - d) = Q - P - P d, or P d^2 series(d) for small |d|, where
        // Q - P - P d would lose the digits of a tiny KL (the series' value in the other lanes is not used)
        Vec d = per_side ? ((y - mb_shift) - log_sb) - ((x - ma_shift) - log_sa) : (y - x) - shift;
        Mask small = lt(d.abs(), half);
        Vec term = select(small, p * (d * d) * gap_series(d), q - at::vec::fmadd(p, d, p));
        acc_kl = acc_kl + select(p_zero, q, term);
      }
    };
    j = j0;
    for (; j + W <= j1; j += W) body(j, W);
    if (j < j1) body(j, j1 - j);
    ent += reduce_sum(acc_ent);
    kl += reduce_sum(acc_kl);
  }
  out.ent = -ent;
  out.kl = kl;
  return out;
}

inline double no_mass_to_zero(double x) { return x == -INF ? 0.0 : x; }

// log-sum-exp of xs, as torch.logsumexp: NaN if any is NaN, +inf if any is +inf, -inf if all are -inf
double logsumexp(const double* xs, int64_t k, int64_t stride) {
  double m = -INF;
  for (int64_t i = 0; i < k; ++i) {
    double x = xs[i * stride];
    if (std::isnan(x)) return x;
    m = std::max(m, x);
  }
  if (std::isinf(m)) return m;
  double s = 0.0;
  for (int64_t i = 0; i < k; ++i) s += std::exp(xs[i * stride] - m);
  return m + std::log(s);
}

// The stats of the union of k leaves (merge_stats of shardkl/_stats.py, in double).
Leaf merge(const std::vector<Leaf>& leaves, bool two) {
  const int64_t k = static_cast<int64_t>(leaves.size());
  const int64_t stride = sizeof(Leaf) / sizeof(double);
  Leaf out{};
  out.la = logsumexp(&leaves[0].la, k, stride);
  if (two) out.lb = logsumexp(&leaves[0].lb, k, stride);
  for (const Leaf& g : leaves) {
    // log of the leaf's share of P's mass (Q's); -inf for a leaf without mass
    const double log_wa = g.la - no_mass_to_zero(out.la);
    const double wa = std::exp(log_wa);
    if (wa != 0.0) out.ent += wa * (g.ent - log_wa);
    if (two) {
      const double log_wb = g.lb - no_mass_to_zero(out.lb);
      // chain rule: w (KL_i + g(log w - log v)); a leaf where P has no mass contributes its share of Q
      const double x = log_wa - log_wb;
      out.kl += wa == 0.0 ? std::exp(log_wb) : wa * (g.kl + (x + std::expm1(-x)));
    }
  }
  // a row where P has no mass at all is an empty, masked row with KL 0
  if (two && out.la == -INF) out.kl = 0.0;
  return out;
}

void forward(const TA* a, const TB* b, float* out, float* scratch, int64_t rows, int64_t cols, int64_t stride_a,
             int64_t stride_b, float inv_t, int64_t flags, int64_t threads) {
  const bool two = flags & TWO;
  const int64_t chunk = std::min(cols, MAX_CHUNK);
  const int64_t padded = (chunk + W - 1) / W * W;
#pragma omp parallel num_threads(threads)
  {
    float* ea = scratch + 2 * padded * omp_get_thread_num();
    float* eb = ea + padded;
    std::vector<Leaf> leaves;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const TA* ar = a + r * stride_a;
      const TB* br = b + r * stride_b;
      const bool last = r + 1 == rows;
      leaves.clear();
      for (int64_t c0 = 0; c0 < cols; c0 += chunk) {
        const int64_t n = std::min(chunk, cols - c0);
        // the next row's columns are fetched while this row computes (passes 2 and 3 are compute-bound)
        const TA* next_a = last ? nullptr : ar + stride_a + c0;
        const TB* next_b = last || !two ? nullptr : br + stride_b + c0;
        const bool scale = flags & SCALE;
        auto run = two ? (scale ? leaf<true, true> : leaf<true, false>) : (scale ? leaf<false, true> : leaf<false, false>);
        leaves.push_back(run(ar + c0, br + c0, n, inv_t, flags, ea, eb, next_a, next_b));
      }
      const Leaf s = leaves.size() == 1 ? leaves[0] : merge(leaves, two);
      out[r] = static_cast<float>(s.la);
      out[rows + r] = static_cast<float>(s.ent);
      if (two) {
        out[2 * rows + r] = static_cast<float>(s.lb);
        out[3 * rows + r] = static_cast<float>(s.kl);
      }
    }
  }
}

// (two inputs and the temperature scaling are template arguments, as for leaf())
template <bool two, bool scale>
void backward(const TA* a, const TB* b, TA* grad_a, TB* grad_b, const float* vecs, const int64_t* token_cols,
              int64_t rows, int64_t cols, int64_t stride_a, int64_t stride_b, float inv_t, int64_t flags,
              int64_t threads) {
  const bool has_kl = two && (flags & HAS_GRAD_KL), has_ent = flags & HAS_GRAD_ENT;
  const bool has_logp = flags & HAS_GRAD_LOGP, has_logq = two && (flags & HAS_GRAD_LOGQ);
  const bool write_a = flags & WRITE_A, write_b = two && (flags & WRITE_B);
  const Vec it(inv_t), zero(0.0f), one(1.0f);
  const Vec iota = Vec::arange(0.0f, 1.0f);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    auto row = [&](int which) { return vecs[which * rows + r]; };
    // a row without mass is shifted by 0 (its P is 0 everywhere), not by -inf
    const Vec lse_a(static_cast<float>(no_mass_to_zero(row(LSE_A))));
    const Vec lse_b(two ? static_cast<float>(no_mass_to_zero(row(LSE_B))) : 0.0f);
    const float g_kl = has_kl ? row(GRAD_KL) : 0.0f;
    const Vec kl(has_kl ? row(KL) : 0.0f), ent(has_ent ? row(ENT) : 0.0f);
    const Vec v_kl(g_kl), v_ent(has_ent ? row(GRAD_ENT) : 0.0f);
    const Vec v_logp(has_logp ? row(GRAD_LOGP) : 0.0f), v_logq(has_logq ? row(GRAD_LOGQ) : 0.0f);
    const int64_t token = token_cols && (has_logp || has_logq) ? token_cols[r] : -1;
    const TA* ar = a + r * stride_a;
    const TB* br = b + r * stride_b;
    auto body = [&](int64_t j, int64_t c) {
      Vec x = load(ar + j, c);
      Vec log_p = (scale ? x * it : x) - lse_a;
      Vec p = exp_(log_p);
      Mask p_zero = eq(p, zero);
      Vec one_hot = zero;
      if (token >= j && token < j + W) one_hot = select(eq(iota, Vec(static_cast<float>(token - j))), one, zero);
      Vec ga = zero;
      // dH/da = -P (log P + H); P = 0 contributes 0, not 0 * -inf
      if (has_ent) ga = ga - v_ent * select(p_zero, zero, p * (log_p + ent));
      if (has_logp) ga = ga + v_logp * (one_hot - p);
      if (two) {
        Vec y = load(br + j, c);
        Vec log_q = (scale ? y * it : y) - lse_b;
        Vec q = exp_(log_q);
        Vec gb = zero;
        if (has_kl) {
          // dKL/da = P (log P - log Q - KL); a row with no incoming gradient gets 0, not 0 * inf
          if (g_kl != 0.0f) ga = ga + v_kl * select(p_zero, zero, p * (log_p - log_q - kl));
          gb = gb + v_kl * (q - p);
        }
        if (has_logq) gb = gb + v_logq * (one_hot - q);
        if (write_b) store(grad_b + r * cols + j, scale ? gb * it : gb, c);
      }
      if (write_a) store(grad_a + r * cols + j, scale ? ga * it : ga, c);
    };
    int64_t j = 0;
    for (; j + W <= cols; j += W) body(j, W);
    if (j < cols) body(j, cols - j);
  }
}

}  // namespace

// The one entry point of the module (the code cache binds a function named `kernel`). flags & BACKWARD selects
// the pass; unused pointer arguments may point anywhere.
extern "C" void kernel(const void* a, const void* b, void* grad_a, void* grad_b, float* out, float* scratch,
                       const float* vecs, const int64_t* token_cols, int64_t rows, int64_t cols, int64_t stride_a,
                       int64_t stride_b, float inv_t, int64_t flags, int64_t threads) {
  const TA* pa = static_cast<const TA*>(a);
  const TB* pb = static_cast<const TB*>(b);
  if (flags & BACKWARD) {
    const bool two = flags & TWO, scale = flags & SCALE;
    auto run = two ? (scale ? backward<true, true> : backward<true, false>)
                   : (scale ? backward<false, true> : backward<false, false>);
    run(pa, pb, static_cast<TA*>(grad_a), static_cast<TB*>(grad_b), vecs, token_cols, rows, cols, stride_a, stride_b,
        inv_t, flags, threads);
  } else {
    forward(pa, pb, out, scratch, rows, cols, stride_a, stride_b, inv_t, flags, threads);
  }
}
