// shardkl's CPU kernels: the forward and backward of every op (KL stats, generalised JSD, top-k buckets) on one
// [rows, cols] block of raw logits, for shardkl/kernels/cpu.py.
//
// Built on first use by the C++ toolchain torch.compile uses on CPU (torch._inductor's code cache: the same
// compiler flags, the same at::vec vector types for AVX2 / AVX-512 / NEON / ..., OpenMP), once per pair of input
// dtypes: SHARDKL_TA / SHARDKL_TB are float, at::BFloat16 or at::Half; everything is computed in fp32. One entry
// point, `kernel`, whose `mode` argument picks the op and the pass; rows run in parallel in one OpenMP region.
//
// KL forward, per row, per leaf of at most SHARDKL_MAX_CHUNK columns (the eager tiling's vocabulary chunk), three
// passes, the last two over data already in cache:
//   1. the maxima of a and b (from cache: the row was prefetched during pass 2 of the previous row);
//   2. ea = exp(a - max_a), eb = exp(b - max_b) into a per-thread scratch row, and their sums;
//   3. the KL terms in g-form from ea, eb, and the entropy terms: no transcendental at all.
// Two exponentials per pair of logits; leaves of a longer row are merged with the stats monoid in double. Only the
// log-sum-exps wanted (JSD's first round): passes 1 and 2, nothing stored.
// KL backward: one pass per row, P and Q recomputed from the saved log-sum-exps (two exponentials per pair).
//
// JSD terms (the second round, with the global log-sum-exps known): one pass per row, two exponentials per pair
// (P, Q) and, where |log P - log Q| >= 0.4, two log1p; below, Taylor polynomials in d = log P - log Q whose
// coefficients depend on beta (computed once per call). JSD backward: the same per pair, then one store per side.
// Top-k stats: per leaf, the max; then exp, the lanes of the teacher's ids summed apart from the tail's, so that the
// tail's log-sum-exp is a sum, never a difference; a tail that underflows against the row's max is summed again
// around its own. Top-k backward: one exponential per logit, then the K id columns overwritten.
//
// The formulas, and the handling of -inf, NaN and +inf, are those of shardkl/_stats.py (leaf_stats, merge_stats,
// chunk_grads) and shardkl/_divergences.py (jsd_tile_terms, jsd_tile_grads, topk_tile_stats, topk_tile_grads);
// the comments there explain them.

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
constexpr float NaN = std::numeric_limits<float>::quiet_NaN();
constexpr int64_t MAX_CHUNK = SHARDKL_MAX_CHUNK;
// elements summed in fp32 before the partial sum is added in double (error ~ BLOCK / W ulp, not sqrt(cols) ulp)
constexpr int64_t BLOCK = 512;
static_assert(BLOCK % 64 == 0, "BLOCK must be a multiple of every vector width");

// What `kernel` computes (cpu.py's _MODE_*).
enum Mode : int64_t { KL_STATS = 0, KL_GRADS = 1, JSD_TERMS = 2, JSD_GRADS = 3, TOPK_STATS = 4, TOPK_GRADS = 5 };
// Row vectors of the KL backward, rows of the [8, rows] `vecs` argument.
enum { LSE_A, LSE_B, KL, ENT, GRAD_KL, GRAD_ENT, GRAD_LOGP, GRAD_LOGQ };
// Row vectors of the JSD passes: [2, rows] (terms) or [5, rows] (grads).
enum { J_LSE_A, J_LSE_B, J_KL_PM, J_KL_QM, J_GRAD };
// Bits of `flags`.
enum : int64_t {
  TWO = 2, WANT_ENT = 4, SCALE = 8, HAS_GRAD_KL = 16, HAS_GRAD_ENT = 32, HAS_GRAD_LOGP = 64, HAS_GRAD_LOGQ = 128,
  WRITE_A = 256, WRITE_B = 512, WANT_KL = 1024,
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
inline bool all_of(Mask m) { return m == static_cast<Mask>(0xFFFF); }
inline bool any_of(Mask m) { return m != 0; }
#else
using Mask = Vec;
inline Mask lt(const Vec& x, const Vec& y) { return x < y; }
inline Mask gt(const Vec& x, const Vec& y) { return x > y; }
inline Mask eq(const Vec& x, const Vec& y) { return x == y; }
inline Vec select(const Mask& m, const Vec& if_true, const Vec& if_false) { return Vec::blendv(if_false, if_true, m); }
// the larger of x and y, or y where either is NaN
#if defined(CPU_CAPABILITY_AVX2)
inline Vec max_or_second(const Vec& x, const Vec& y) { return _mm256_max_ps(x, y); }
#else
inline Vec max_or_second(const Vec& x, const Vec& y) { return select(gt(x, y), x, y); }
#endif
// a true lane is all ones (a NaN), a false one +0.0: zero_mask() has a bit set for each false lane
inline bool all_of(const Mask& m) { return m.zero_mask() == 0; }
inline bool any_of(const Mask& m) { return m.zero_mask() != (1 << W) - 1; }
#endif

// the bits of a float vector as int32 lanes
inline IVec as_int(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castps_si512(x);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_castps_si256(x);
#else
  return at::vec::cast<int32_t>(x);
#endif
}

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

// exp(x) for x <= 88 (every argument here is <= 0 up to rounding), the argument clamped at -86.6, so that the
// result is at least 2e-38 (normal), never 0; NaN for NaN. For sums, where such a term is invisible next to the
// max's 1, and where a -inf logit need not give exactly 0. Cody-Waite reduction by ln 2 to r in [-ln2/2, ln2/2], a
// polynomial for e^r and 2^n from its exponent bits. Inlined, unlike the library call behind Vec::exp(), so that the
// compiler interleaves it with the rest of the loop. accurate = false: a degree-5 minimax polynomial (1.7e-7
// relative, 3 ulp, biased by -1e-8 on average), where each value's error counts once (probabilities, gradients);
// true: degree 6 (0.6 ulp, unbiased to 5e-10), where a long sum of exponentials must keep 1e-9 relative (the top-k
// tail, compared with the ids' logits directly: a bias of 1e-8 is a 3e-4 relative error at a bucket KL of 1e-9).
template <bool accurate = false>
inline Vec exp_clamped(const Vec& x) {
  // the clamp lets a NaN through (max_or_second returns its second argument then)
  const Vec xc = max_or_second(Vec(-86.6f), x);
  // t = x log2(e) + 1.5 2^23 + 127 rounds x log2(e) to the integer n in its fraction, whose low bits are n + 127
  const Vec magic(12583039.0f);
  const Vec t = at::vec::fmadd(xc, Vec(1.44269504088896341f), magic);
  const Vec n = t - magic;
  Vec r = at::vec::fmadd(n, Vec(-0.693359375f), xc);
  r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
  Vec y;
  if constexpr (accurate) {
    // degree 6 (relative error 2e-9 before rounding: the fp32 result is within 0.6 ulp, mean error 5e-10)
    y = at::vec::fmadd(Vec(1.383679728e-3f), r, Vec(8.374807338e-3f));
    y = at::vec::fmadd(y, r, Vec(4.166822585e-2f));
    y = at::vec::fmadd(y, r, Vec(1.666642027e-1f));
    y = at::vec::fmadd(y, r, Vec(4.999999208e-1f));
    y = at::vec::fmadd(y, r, Vec(1.000000036f));
    y = at::vec::fmadd(y, r, Vec(1.0f));
  } else {
    y = at::vec::fmadd(Vec(0.008312532678246498f), r, Vec(0.04189012572169304f));
    y = at::vec::fmadd(y, r, Vec(0.16667114198207855f));
    y = at::vec::fmadd(y, r, Vec(0.499992311000824f));
    y = at::vec::fmadd(y, r, Vec(1.0f));
    y = at::vec::fmadd(y, r, Vec(1.0f));
  }
  // 2^n: n + 127, in [2, 254], shifted into the exponent field (the rest of t's bits leave the word)
  return y * at::vec::cast<float>(as_int(t) << IVec(23));
}

// exp(x) for x <= 88, exactly 0 below -86.6 (results under 2e-38): a -inf logit has probability 0
template <bool accurate = false>
inline Vec exp_(const Vec& x) {
  return select(lt(x, Vec(-86.6f)), Vec(0.0f), exp_clamped<accurate>(x));
}

// A float vector's lanes summed in double, lane by lane: a sum of many exponentials that must keep 1e-9 relative
// (fp32 partial sums lose ~1e-7 per block, with a bias).
class DoubleSum {
 public:
  void add(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
    lo_ = _mm512_add_pd(lo_, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    hi_ = _mm512_add_pd(hi_, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
#elif defined(CPU_CAPABILITY_AVX2)
    lo_ = _mm256_add_pd(lo_, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    hi_ = _mm256_add_pd(hi_, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
#else
    float lanes[W];
    v.store(lanes);
    for (int64_t i = 0; i < W; ++i) lanes_[i] += lanes[i];
#endif
  }
  // the lanes of v summed in double
  static double of(const Vec& v) {
    DoubleSum s;
    s.add(v);
    return s.sum();
  }
  double sum() const {
    double lanes[W];
#if defined(CPU_CAPABILITY_AVX512)
    _mm512_storeu_pd(lanes, lo_);
    _mm512_storeu_pd(lanes + W / 2, hi_);
#elif defined(CPU_CAPABILITY_AVX2)
    _mm256_storeu_pd(lanes, lo_);
    _mm256_storeu_pd(lanes + W / 2, hi_);
#else
    std::copy(lanes_, lanes_ + W, lanes);
#endif
    double total = 0.0;
    for (int64_t i = 0; i < W; ++i) total += lanes[i];
    return total;
  }

 private:
#if defined(CPU_CAPABILITY_AVX512)
  __m512d lo_ = _mm512_setzero_pd(), hi_ = _mm512_setzero_pd();
#elif defined(CPU_CAPABILITY_AVX2)
  __m256d lo_ = _mm256_setzero_pd(), hi_ = _mm256_setzero_pd();
#else
  double lanes_[W] = {};
#endif
};

// log1p(z) and z - log1p(z) (>= 0) for z > -1 finite, both to a few ulp of their own size (other lanes: anything).
// u = 1 + z = 2^e m with m in [sqrt(1/2), sqrt(2)); log1p(z) = e ln2 + log1p(f), f = m - 1, and log1p(f) =
// f - f^2 (1/2 - f P(f)) with Cephes' logf polynomial P on that range. Where e = 0 (z in [-0.29, 0.41]) f is z itself
// (m - 1 would carry the rounding of 1 + z), so that log1p of a tiny z keeps its digits and z - log1p(z) =
// f^2 (1/2 - f P(f)) has nothing to cancel; elsewhere z - log1p(z) >= 0.05 is a difference of numbers >= 0.29.
inline void log1p_(const Vec& z, Vec& log1p_z, Vec& gap) {
  const IVec sqrt_half_bits(0x3f3504f3);
  const IVec ix = as_int(z + Vec(1.0f)) - sqrt_half_bits;
  const Vec e = at::vec::convert_to_fp_of_same_size<float>(ix >> IVec(23));
  const Vec m = at::vec::cast<float>((ix & IVec(0x007fffff)) + sqrt_half_bits);
  const Mask unit = eq(e, Vec(0.0f));
  const Vec f = select(unit, z, m - Vec(1.0f));
  Vec p = at::vec::fmadd(Vec(7.0376836292e-2f), f, Vec(-1.1514610310e-1f));
  p = at::vec::fmadd(p, f, Vec(1.1676998740e-1f));
  p = at::vec::fmadd(p, f, Vec(-1.2420140846e-1f));
  p = at::vec::fmadd(p, f, Vec(1.4249322787e-1f));
  p = at::vec::fmadd(p, f, Vec(-1.6668057665e-1f));
  p = at::vec::fmadd(p, f, Vec(2.0000714765e-1f));
  p = at::vec::fmadd(p, f, Vec(-2.4999993993e-1f));
  p = at::vec::fmadd(p, f, Vec(3.3333331174e-1f));
  // f - log1p(f) = f^2 (1/2 - f P(f)), no cancellation
  const Vec gap_f = (f * f) * at::vec::fnmadd(f, p, Vec(0.5f));
  // e ln2 in two parts (Cody-Waite), so that e ln2 + log1p(f) rounds once
  log1p_z = at::vec::fmadd(e, Vec(0.693359375f), at::vec::fmadd(e, Vec(-2.12194440e-4f), f - gap_f));
  gap = select(unit, gap_f, z - log1p_z);
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

// c[0] + c[1] d + ... + c[n - 1] d^(n-1)
template <int n>
inline Vec horner(const float* c, const Vec& d) {
  Vec s(c[n - 1]);
  for (int i = n - 2; i >= 0; --i) s = at::vec::fmadd(s, d, Vec(c[i]));
  return s;
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

inline double no_mass_to_zero(double x) { return x == -INF ? 0.0 : x; }

// log(exp(x) + exp(y)) as torch.logaddexp: NaN if either is NaN, +inf if either is +inf, -inf if both are -inf
inline double logaddexp(double x, double y) {
  if (std::isnan(x) || std::isnan(y)) return std::numeric_limits<double>::quiet_NaN();
  const double m = std::max(x, y);
  if (std::isinf(m)) return m;
  return m + std::log1p(std::exp(-std::fabs(x - y)));
}

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

// ============================================ KL stats =========================================================

struct Leaf {
  double la, ent, lb, kl;
};

// Stats of one leaf of at most MAX_CHUNK columns (leaf_stats of shardkl/_stats.py). ea, eb: scratch rows of
// round_up(n, W) floats. next_a, next_b: the same columns of the next row, prefetched into cache (or null).
// (two inputs and the temperature scaling are template arguments, so that the loops have no branches on them and
// the compiler interleaves the two inputs' independent exponentials)
// keep: pass 3 runs (entropy or KL wanted) and reads the exponentials back from the scratch rows; without it (only
// the log-sum-exps) nothing is stored, and a -inf logit may add 2e-38 to a sum whose max term is 1.
template <bool two, bool scale, bool keep>
Leaf leaf(const TA* a, const TB* b, int64_t n, float inv_t, int64_t flags, float* ea, float* eb, const TA* next_a,
          const TB* next_b) {
  const bool want_ent = flags & WANT_ENT, want_kl = two && (flags & WANT_KL);
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
  if (ma == INF && has_nan(a, n)) ma = NaN;
  if (two && mb == INF && has_nan(b, n)) mb = NaN;
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
      Vec e = keep ? exp_((scale ? x * it : x) - ma_shift) : exp_clamped((scale ? x * it : x) - ma_shift);
      if (keep) e.store(ea + j);
      acc_a = acc_a + e;
      prefetch(pre_a + j);
      if (two) {
        prefetch(pre_b + j);
        Vec y = load(b + j, c);
        Vec f = keep ? exp_((scale ? y * it : y) - mb_shift) : exp_clamped((scale ? y * it : y) - mb_shift);
        if (keep) f.store(eb + j);
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
  if (!keep) {
    // a leaf without mass (no NaN either) sums to 0, not to its columns' clamped 2e-38
    if (ma == -INF && !std::isnan(sa)) sa = 0.0;
    if (two && mb == -INF && !std::isnan(sb)) sb = 0.0;
  }
  Leaf out{};
  // lse = max + log s; +inf logits report +inf, NaN logits NaN (through max and s); no mass: -inf
  const double ma_s = ma == -INF ? 0.0 : ma, mb_s = mb == -INF ? 0.0 : mb;
  out.la = ma == INF ? INF : ma_s + std::log(sa);
  out.lb = two ? (mb == INF ? INF : mb_s + std::log(sb)) : 0.0;
  if (!keep) return out;
  // log P = (x - max) - log s, the max taken out first so that huge logits (near the dtype's limits) keep log s;
  // a leaf without mass has log s = +inf, so that its log P is -inf, not NaN
  const double a_lse = sa == 0.0 ? INF : ma_s + std::log(sa), b_lse = sb == 0.0 ? INF : mb_s + std::log(sb);
  const Vec log_sa(sa == 0.0 ? INF : static_cast<float>(std::log(sa)));
  const Vec log_sb(sb == 0.0 ? INF : static_cast<float>(std::log(sb)));
  const Vec inv_sa(sa == 0.0 ? 1.0f : static_cast<float>(1.0 / sa));
  const Vec inv_sb(sb == 0.0 ? 1.0f : static_cast<float>(1.0 / sb));
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
      if (want_kl) {
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
      const double wb = std::exp(log_wb);
      // chain rule: w (KL_i + g(log w - log v)); a leaf where P has no mass contributes its share of Q
      const double x = log_wa - log_wb;
      if (wa == 0.0) {
        out.kl += wb;
      } else if (x < -1.0) {
        // v > e w: the gap term written w x - w + v, where v dominates (nothing cancels); w g(x) would overflow
        // (expm1(-x) = inf for x < -709 while w > 0 is subnormal: a finite KL reported as inf)
        out.kl += wa * g.kl + (wa * x - wa + wb);
      } else {
        out.kl += wa * (g.kl + (x + std::expm1(-x)));
      }
    }
  }
  // a row where P has no mass at all is an empty, masked row with KL 0
  if (two && out.la == -INF) out.kl = 0.0;
  return out;
}

void kl_forward(const TA* a, const TB* b, float* out, float* scratch, int64_t rows, int64_t cols, int64_t stride_a,
                int64_t stride_b, float inv_t, int64_t flags, int64_t threads) {
  const bool two = flags & TWO;
  const int64_t chunk = std::min(cols, MAX_CHUNK);
  const int64_t padded = (chunk + W - 1) / W * W;
  const bool scale = flags & SCALE, keep = (flags & WANT_ENT) || (two && (flags & WANT_KL));
  using LeafFn = Leaf (*)(const TA*, const TB*, int64_t, float, int64_t, float*, float*, const TA*, const TB*);
  // two inputs, the temperature scaling and the third pass are template arguments of leaf()
  const LeafFn variants[2][2][2] = {
      {{leaf<false, false, false>, leaf<false, false, true>}, {leaf<false, true, false>, leaf<false, true, true>}},
      {{leaf<true, false, false>, leaf<true, false, true>}, {leaf<true, true, false>, leaf<true, true, true>}},
  };
  const LeafFn run = variants[two][scale][keep];
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
void kl_backward(const TA* a, const TB* b, TA* grad_a, TB* grad_b, const float* vecs, const int64_t* token_cols,
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

// ============================================ generalised JSD ==================================================
//
// With d = log P - log Q (taken as (a - b) - (lse_a - lse_b), as the KL's d), M = beta P + r Q, r = 1 - beta:
//   x = log P - log M = -log1p(z),  z = M/P - 1 = r (Q - P) / P     (and e^-x - 1 = z)
//   y = log Q - log M = -log1p(z'), z' = M/Q - 1 = beta (P - Q) / Q
// and the terms P g(x) = P (z - log1p(z)), Q g(y) = Q (z' - log1p(z')), each >= 0 (log1p_ gives z - log1p(z) with
// nothing to cancel). Q - P is exact (Sterbenz) where it matters, for close P and Q. Where |d| < 0.4 (the common
// case: two policies that agree on most of the vocabulary) the same quantities are power series in d, which need no
// log and keep every digit of a tiny divergence, and Q = P e^-d needs no second exponential:
//   x(d) = -log(beta + r e^-d) = sum_n (-1)^(n+1) kappa_n d^n / n!    (kappa_n: the cumulants of Bernoulli(r))
//   P g(x) = P d^2 Gp(d),  Gp = (x + r (e^-d - 1)) / d^2
//   Q g(y) = P d^2 Hq(d),  Hq = e^-d (x - d + beta (e^d - 1)) / d^2
// truncated after d^9 (relative error < 5e-8 at |d| = 0.4 for beta in [0.1, 0.9], 1.1e-7 at beta = 0.02; the series
// converge for |d| < pi).

constexpr int X_TERMS = 9;  // x(d) = d (x[0] + x[1] d + ... + x[8] d^8)
constexpr int G_TERMS = 8;  // Gp(d) = gp[0] + gp[1] d + ... + gp[7] d^7, and Hq
constexpr int E_TERMS = 9;  // e^-d = em[0] + em[1] d + ... + em[8] d^8 (|d| < 0.4: truncation < 1e-9)
constexpr float SERIES_BELOW = 0.4f;

struct Mixture {
  float beta, rest;
  float x[X_TERMS], gp[G_TERMS], hq[G_TERMS], em[E_TERMS];
};

// The mixture weights and the series' coefficients for this beta, computed in double.
Mixture mixture(float beta_f) {
  const double beta = beta_f, r = 1.0 - beta;
  constexpr int N = X_TERMS;
  // kappa_1 = r and kappa_(n+1) = r (1 - r) d kappa_n / dr, kept as polynomials in r
  std::vector<double> poly{0.0, 1.0};
  double kappa[N + 1] = {}, inv_factorial[N + 1] = {1.0};
  for (int n = 1; n <= N; ++n) {
    inv_factorial[n] = inv_factorial[n - 1] / n;
    double value = 0.0, power = 1.0;
    for (double c : poly) {
      value += c * power;
      power *= r;
    }
    kappa[n] = value;
    std::vector<double> next(poly.size() + 1, 0.0);
    for (size_t i = 1; i < poly.size(); ++i) {
      next[i] += static_cast<double>(i) * poly[i];
      next[i + 1] -= static_cast<double>(i) * poly[i];
    }
    poly = next;
  }
  // coefficients of d^n, n = 0..N: x(d), x(d) + r (e^-d - 1), x(d) - d + beta (e^d - 1), e^-d
  double xs[N + 1] = {}, gp[N + 1] = {}, gq[N + 1] = {}, em[N + 1] = {};
  for (int n = 0; n <= N; ++n) {
    const double sign = n % 2 ? 1.0 : -1.0;
    em[n] = -sign * inv_factorial[n];
    if (n == 0) continue;
    xs[n] = sign * kappa[n] * inv_factorial[n];
    gp[n] = xs[n] + r * em[n];
    gq[n] = xs[n] - (n == 1 ? 1.0 : 0.0) + beta * inv_factorial[n];
  }
  Mixture m{};
  m.beta = beta_f;
  m.rest = static_cast<float>(r);
  for (int n = 0; n < E_TERMS; ++n) m.em[n] = static_cast<float>(em[n]);
  for (int n = 0; n < X_TERMS; ++n) m.x[n] = static_cast<float>(xs[n + 1]);
  for (int n = 0; n < G_TERMS; ++n) {
    // Gp's d^2 d^n coefficient; Hq's is that of the product of e^-d and gq (both series start at d^0 and d^2)
    m.gp[n] = static_cast<float>(gp[n + 2]);
    double h = 0.0;
    for (int i = 2; i <= n + 2; ++i) h += gq[i] * em[n + 2 - i];
    m.hq[n] = static_cast<float>(h);
  }
  return m;
}

// x = log P - log M and y = log Q - log M per lane, and Q; from d, P = exp_(la) and la_q = log Q's argument.
// Lanes where P = 0 (Q = 0) may hold anything in x (y).
inline void mixture_log_ratios(const Mixture& mx, const Vec& d, const Vec& p, const Vec& la_q, Vec& q, Vec& x,
                               Vec& y) {
  const Mask small = lt(d.abs(), Vec(SERIES_BELOW));
  if (all_of(small)) {
    // the series in d, exact to fp32 rounding however small d is; y = x - d loses nothing here (|y| ~ beta |d|)
    q = p * horner<E_TERMS>(mx.em, d);
    x = d * horner<X_TERMS>(mx.x, d);
    y = x - d;
    return;
  }
  q = exp_(la_q);
  const Vec diff = q - p;
  Vec log1p_z, gap;
  log1p_(Vec(mx.rest) * diff / p, log1p_z, gap);
  x = log1p_z.neg();
  log1p_(Vec(-mx.beta) * diff / q, log1p_z, gap);
  y = log1p_z.neg();
  if (any_of(small)) {
    const Vec xs = d * horner<X_TERMS>(mx.x, d);
    x = select(small, xs, x);
    y = select(small, xs - d, y);
  }
}

// The two terms P g(x) and Q g(y) per lane, both >= 0, from d, P = exp_clamped(la) (never 0) and la_q.
inline void jsd_lane_terms(const Mixture& mx, const Vec& d, const Vec& p, const Vec& la_q, Vec& tp, Vec& tq) {
  const Mask small = lt(d.abs(), Vec(SERIES_BELOW));
  const bool all_small = all_of(small);
  if (!all_small) {
    // P, Q >= 2e-38 (exp_clamped): a -inf logit's P g(x) = r (Q - P) - P log1p(z) is M's r Q up to 1e-36, its
    // Q g(y) that of a P = 0; a -inf column (P = Q = 2e-38) has z = z' = 0 and terms 0; z < 5e37 stays finite
    const Vec q = exp_clamped(la_q), diff = q - p;
    Vec log1p_z, gap_x, gap_y;
    log1p_(Vec(mx.rest) * diff / p, log1p_z, gap_x);
    log1p_(Vec(-mx.beta) * diff / q, log1p_z, gap_y);
    tp = p * gap_x;
    tq = q * gap_y;
  }
  if (any_of(small)) {
    const Vec pd2 = p * (d * d);
    const Vec sp = pd2 * horner<G_TERMS>(mx.gp, d), sq = pd2 * horner<G_TERMS>(mx.hq, d);
    tp = all_small ? sp : select(small, sp, tp);
    tq = all_small ? sq : select(small, sq, tq);
  }
}

// Per-row sums of the terms of KL(P‖M) and KL(Q‖M) into out64[0 * rows + r], out64[1 * rows + r].
template <bool scale>
void jsd_terms(const TA* a, const TB* b, double* out, const float* vecs, int64_t rows, int64_t cols,
               int64_t stride_a, int64_t stride_b, float inv_t, float beta, int64_t threads) {
  const Mixture mx = mixture(beta);
  const Vec it(inv_t);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    const float lse_a = vecs[J_LSE_A * rows + r], lse_b = vecs[J_LSE_B * rows + r];
    const Vec v_lse_a(lse_a), v_lse_b(lse_b);
    // d = (a - b) - (lse_a - lse_b): a - b of close logits rounds once and the per-row constant is exact
    const Vec shift(static_cast<float>(static_cast<double>(lse_a) - static_cast<double>(lse_b)));
    const TA* ar = a + r * stride_a;
    const TB* br = b + r * stride_b;
    double kl_pm = 0.0, kl_qm = 0.0;
    for (int64_t j0 = 0; j0 < cols; j0 += BLOCK) {
      const int64_t j1 = std::min(cols, j0 + BLOCK);
      Vec acc_p(0.0f), acc_q(0.0f);
      auto body = [&](int64_t j, int64_t c) {
        Vec x = load(ar + j, c), y = load(br + j, c);
        x = scale ? x * it : x;
        y = scale ? y * it : y;
        Vec tp, tq;
        jsd_lane_terms(mx, (x - y) - shift, exp_clamped(x - v_lse_a), y - v_lse_b, tp, tq);
        acc_p = acc_p + tp;
        acc_q = acc_q + tq;
      };
      int64_t j = j0;
      for (; j + W <= j1; j += W) body(j, W);
      if (j < j1) body(j, j1 - j);
      kl_pm += reduce_sum(acc_p);
      kl_qm += reduce_sum(acc_q);
    }
    out[r] = kl_pm;
    out[rows + r] = kl_qm;
  }
}

// grad_a = beta g P (x - KL(P‖M)) / T, grad_b = r g Q (y - KL(Q‖M)) / T; 0 where P (Q) is 0 or g is 0.
template <bool scale>
void jsd_grads(const TA* a, const TB* b, TA* grad_a, TB* grad_b, const float* vecs, int64_t rows, int64_t cols,
               int64_t stride_a, int64_t stride_b, float inv_t, float beta, int64_t flags, int64_t threads) {
  const Mixture mx = mixture(beta);
  const bool write_a = flags & WRITE_A, write_b = flags & WRITE_B;
  const Vec it(inv_t), zero(0.0f);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    auto row = [&](int which) { return vecs[which * rows + r]; };
    const float g = row(J_GRAD);
    if (g == 0.0f) {
      // no incoming gradient: 0, not 0 * inf (an infinite or NaN divergence's rows)
      for (int64_t j = 0; j < cols; j += W) {
        const int64_t c = std::min(W, cols - j);
        if (write_a) store(grad_a + r * cols + j, zero, c);
        if (write_b) store(grad_b + r * cols + j, zero, c);
      }
      continue;
    }
    const float lse_a = row(J_LSE_A), lse_b = row(J_LSE_B);
    const Vec v_lse_a(lse_a), v_lse_b(lse_b), kl_pm(row(J_KL_PM)), kl_qm(row(J_KL_QM));
    const Vec shift(static_cast<float>(static_cast<double>(lse_a) - static_cast<double>(lse_b)));
    // the factors beta g / T and r g / T of the two sides
    const Vec coef_a(static_cast<float>(static_cast<double>(mx.beta) * g * inv_t));
    const Vec coef_b(static_cast<float>(static_cast<double>(mx.rest) * g * inv_t));
    const TA* ar = a + r * stride_a;
    const TB* br = b + r * stride_b;
    auto body = [&](int64_t j, int64_t c) {
      Vec xa = load(ar + j, c), yb = load(br + j, c);
      xa = scale ? xa * it : xa;
      yb = scale ? yb * it : yb;
      const Vec p = exp_(xa - v_lse_a);
      Vec q, x, y;
      mixture_log_ratios(mx, (xa - yb) - shift, p, yb - v_lse_b, q, x, y);
      if (write_a) store(grad_a + r * cols + j, select(eq(p, zero), zero, coef_a * p * (x - kl_pm)), c);
      if (write_b) store(grad_b + r * cols + j, select(eq(q, zero), zero, coef_b * q * (y - kl_qm)), c);
    };
    int64_t j = 0;
    for (; j + W <= cols; j += W) body(j, W);
    if (j < cols) body(j, cols - j);
  }
}

// ============================================ top-k teacher ====================================================

// a tail whose sum in the frame of the row's max is below this may have lost mass to underflow (exp_clamped
// flushes values under 2e-38 up to 2e-38, a -inf logit included): it is summed again around its own max
constexpr double TAIL_UNDERFLOW = 1e-20;

// The teacher's ids inside one leaf, as sorted leaf columns, walked by increasing column: the lanes of the vector at
// j that are ids (there are K of them among thousands of vectors, so almost every vector has none).
class Held {
 public:
  Held(const int64_t* cols, int64_t count) : cols_(cols), end_(cols + count) { next_ = count ? *cols : NONE; }
  // whether the vector at column j holds an id; j increases by W from one vector to the next, from 0
  bool at(int64_t j) const { return next_ < j + W; }
  // the lanes of the vector at j that hold ids, after at(j) returned true; moves on to the next vector's ids
  Mask lanes(int64_t j) {
    const Vec iota = Vec::arange(0.0f, 1.0f);
    Mask m = eq(iota, Vec(static_cast<float>(*cols_ - j)));
    for (++cols_; cols_ < end_ && *cols_ < j + W; ++cols_) m = m | eq(iota, Vec(static_cast<float>(*cols_ - j)));
    next_ = cols_ < end_ ? *cols_ : NONE;
    return m;
  }

 private:
  static constexpr int64_t NONE = std::numeric_limits<int64_t>::max() / 2;
  const int64_t* cols_;
  const int64_t* end_;
  int64_t next_;
};

inline bool is_held(const int64_t* cols, int64_t count, int64_t& next, int64_t j) {
  while (next < count && cols[next] < j) ++next;
  return next < count && cols[next] == j;
}

// log-sum-exp of the n logits s (scaled by inv_t) outside the sorted columns `held` (count of them), as eager's
// accurate_lse: NaN if one is NaN, +inf if one is +inf, -inf if all are -inf. Scalar: only for rows holding
// +inf or without a finite logit.
template <bool scale>
double masked_lse_scalar(const TA* s, int64_t n, float inv_t, const int64_t* held, int64_t count) {
  float m = -INF;
  bool nan = false;
  int64_t next = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (is_held(held, count, next, j)) continue;
    const float v = scale ? static_cast<float>(s[j]) * inv_t : static_cast<float>(s[j]);
    if (std::isnan(v)) nan = true;
    else m = std::max(m, v);
  }
  if (nan) return NaN;
  if (std::isinf(m)) return m;
  double sum = 0.0;
  next = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (is_held(held, count, next, j)) continue;
    const float v = scale ? static_cast<float>(s[j]) * inv_t : static_cast<float>(s[j]);
    sum += std::exp(static_cast<double>(v - m));
  }
  return m + std::log(sum);
}

// log-sum-exp of the n logits s outside the sorted columns `held`, around the max of those columns; every one is
// finite or -inf (the row's max was finite and the tail's sum was not NaN). Vectorised: a tail far below the ids
// is common at low temperatures.
template <bool scale>
double masked_lse(const TA* s, int64_t n, float inv_t, const int64_t* held, int64_t count) {
  const Vec it(inv_t), minus_inf(-INF);
  auto masked = [&](Held& h, int64_t j, int64_t c) {
    Vec x = load(s + j, c);
    x = scale ? x * it : x;
    return h.at(j) ? select(h.lanes(j), minus_inf, x) : x;
  };
  Vec vm(-INF);
  Held h1(held, count);
  int64_t j = 0;
  for (; j + W <= n; j += W) vm = max_or_second(masked(h1, j, W), vm);
  if (j < n) vm = max_or_second(masked(h1, j, n - j), vm);
  const float m = reduce_max(vm);
  if (m == -INF) return -INF;
  const Vec shift(m);
  DoubleSum sum;
  Held h2(held, count);
  for (j = 0; j + W <= n; j += W) sum.add(exp_<true>(masked(h2, j, W) - shift));
  if (j < n) sum.add(exp_<true>(masked(h2, j, n - j) - shift));
  return m + std::log(sum.sum());
}

struct TopKLeaf {
  double lse, lse_excl;
};

// One pass over a leaf: the sums of exp(s - shift) over the tail (in double) and over the ids' lanes, apart (nothing
// is subtracted), and the max of s (NaN ignored). A -inf logit's 2e-38 (exp_clamped) is invisible next to a sum whose
// largest term is about 1 or more, and a tail made of nothing else falls below TAIL_UNDERFLOW (then summed exactly).
// pre: the same columns of the next row, fetched into cache meanwhile (this pass is compute-bound).
template <bool scale>
void topk_sums(const TA* s, int64_t n, float inv_t, const int64_t* held, int64_t count, float shift, const TA* pre,
               double& tail, double& ids, float& max) {
  const Vec it(inv_t), zero(0.0f), v_shift(shift);
  Held h(held, count);
  DoubleSum tail_sum;
  Vec vm(-INF);
  ids = 0.0;
  auto body = [&](int64_t j, int64_t c) {
    Vec x = load(s + j, c);
    prefetch(pre + j);
    x = scale ? x * it : x;
    vm = max_or_second(x, vm);
    Vec e = exp_clamped<true>(x - v_shift);
    if (h.at(j)) {
      const Mask lanes = h.lanes(j);
      ids += DoubleSum::of(select(lanes, e, zero));
      e = select(lanes, zero, e);
    }
    tail_sum.add(e);
  };
  int64_t j = 0;
  for (; j + W <= n; j += W) body(j, W);
  if (j < n) body(j, n - j);
  tail = tail_sum.sum();
  max = reduce_max(vm);
}

// (lse, lse without the ids) of one leaf of n <= MAX_CHUNK columns; held: the sorted leaf columns of the ids. Usually
// one pass: the sums around the largest logit at the ids, the student's max wherever the teacher's top ids hold it
// (the rule in distillation), which the max taken on the way confirms. Otherwise the sums again around the max
// (shifted by anything else, the arguments of the largest terms would round: 1e-7 instead of 2e-8 on the lse), or,
// without a finite logit at an id, two passes: the max, then the sums.
template <bool scale>
TopKLeaf topk_leaf(const TA* s, int64_t n, float inv_t, const int64_t* held, int64_t count, const TA* next) {
  const TA* pre = next ? next : s;
  double tail = 0.0, ids = 0.0;
  float guess = -INF;
  for (int64_t i = 0; i < count; ++i) {
    const float v = scale ? static_cast<float>(s[held[i]]) * inv_t : static_cast<float>(s[held[i]]);
    guess = std::isnan(v) ? v : std::max(guess, v);
    if (std::isnan(v)) break;
  }
  float m = -INF;
  bool done = false;
  if (std::isfinite(guess)) {
    topk_sums<scale>(s, n, inv_t, held, count, guess, pre, tail, ids, m);
    // the max is at an id: the sums are those around the max
    done = m == guess;
    if (!done && std::isfinite(m)) {
      float unused_max;
      topk_sums<scale>(s, n, inv_t, held, count, m, pre, tail, ids, unused_max);
      done = true;
    }
  }
  if (!done) {
    // pass 1: the max, NaN ignored (a NaN turns the sums into NaN)
    const Vec it(inv_t);
    Vec vm(-INF);
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      Vec x = load(s + j, W);
      vm = max_or_second(scale ? x * it : x, vm);
    }
    if (j < n) {
      Vec x = load(s + j, n - j);
      vm = max_or_second(scale ? x * it : x, vm);
    }
    m = reduce_max(vm);
    if (!std::isfinite(m)) {
      // +inf somewhere, or no finite logit: the conventions, column by column (rare)
      return {masked_lse_scalar<scale>(s, n, inv_t, nullptr, 0), masked_lse_scalar<scale>(s, n, inv_t, held, count)};
    }
    float unused_max;
    topk_sums<scale>(s, n, inv_t, held, count, m, pre, tail, ids, unused_max);
  }
  TopKLeaf out{m + std::log(tail + ids), m + std::log(tail)};
  // the tail far below the shift, at most the row's max (or empty): its own log-sum-exp, around its own max
  if (tail < TAIL_UNDERFLOW) out.lse_excl = masked_lse<scale>(s, n, inv_t, held, count);
  return out;
}

template <bool scale>
void topk_stats(const TA* s, double* out, const int64_t* ids, int64_t k, int64_t rows, int64_t cols, int64_t stride,
                float inv_t, int64_t threads) {
  const int64_t chunk = std::min(cols, MAX_CHUNK);
#pragma omp parallel num_threads(threads)
  {
    std::vector<int64_t> held;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      double lse = -INF, lse_excl = -INF;
      for (int64_t c0 = 0; c0 < cols; c0 += chunk) {
        const int64_t n = std::min(chunk, cols - c0);
        // the row's ids in this leaf, as sorted leaf columns (ids outside [0, cols) are in no leaf)
        held.clear();
        for (int64_t i = 0; i < k; ++i) {
          const int64_t col = ids[r * k + i] - c0;
          if (col >= 0 && col < n) held.push_back(col);
        }
        std::sort(held.begin(), held.end());
        const TA* next = r + 1 == rows ? nullptr : s + (r + 1) * stride + c0;
        const TopKLeaf part = topk_leaf<scale>(s + r * stride + c0, n, inv_t, held.data(),
                                               static_cast<int64_t>(held.size()), next);
        lse = logaddexp(lse, part.lse);
        lse_excl = logaddexp(lse_excl, part.lse_excl);
      }
      out[r] = lse;
      out[rows + r] = lse_excl;
    }
  }
}

// vecs: lse_excl [rows], tail_coef [rows], then id_coef [rows, k].
template <bool scale>
void topk_grads(const TA* s, TA* grad, const float* vecs, const int64_t* ids, int64_t k, int64_t rows, int64_t cols,
                int64_t stride, float inv_t, int64_t threads) {
  const Vec it(inv_t), zero(0.0f);
  const float* id_coef = vecs + 2 * rows;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    const float lse_excl = vecs[r];
    const TA* sr = s + r * stride;
    TA* gr = grad + r * cols;
    // a tail column's share of the tail, exp(s - lse_excl), times the row's factor (and 1/T); none without a tail
    const bool empty = lse_excl == -INF;
    const Vec shift(empty ? 0.0f : lse_excl), coef(empty ? 0.0f : vecs[rows + r] * inv_t);
    auto body = [&](int64_t j, int64_t c) {
      Vec x = load(sr + j, c);
      store(gr + j, empty ? zero : exp_((scale ? x * it : x) - shift) * coef, c);
    };
    int64_t j = 0;
    for (; j + W <= cols; j += W) body(j, W);
    if (j < cols) body(j, cols - j);
    // then the ids' columns, each its own bucket
    for (int64_t i = 0; i < k; ++i) {
      const int64_t col = ids[r * k + i];
      if (col >= 0 && col < cols) gr[col] = static_cast<TA>(id_coef[r * k + i] * inv_t);
    }
  }
}

}  // namespace

// The one entry point of the module (the code cache binds a function named `kernel`); `mode` selects the op and
// the pass (Mode above), and unused pointer arguments may point anywhere.
//   a, b: [rows, cols] logits with row strides stride_a, stride_b (the top-k passes read a only);
//   grad_a, grad_b: [rows, cols] contiguous gradient outputs in the inputs' dtypes;
//   out: float [num_stats, rows] (KL stats); out64: double [2, rows] (JSD terms, top-k stats);
//   scratch: per-thread scratch rows (KL forward); vecs: float per-row vectors of the pass; index: int64 token columns [rows]
//   (KL backward) or ids [rows, k] (top-k); beta: the JSD's mixture weight.
extern "C" void kernel(int64_t mode, const void* a, const void* b, void* grad_a, void* grad_b, float* out,
                       double* out64, float* scratch, const float* vecs, const int64_t* index, int64_t rows,
                       int64_t cols, int64_t stride_a, int64_t stride_b, int64_t k, float inv_t, float beta,
                       int64_t flags, int64_t threads) {
  const TA* pa = static_cast<const TA*>(a);
  const TB* pb = static_cast<const TB*>(b);
  const bool two = flags & TWO, scale = flags & SCALE;
  switch (mode) {
    case KL_STATS:
      kl_forward(pa, pb, out, scratch, rows, cols, stride_a, stride_b, inv_t, flags, threads);
      break;
    case KL_GRADS: {
      auto run = two ? (scale ? kl_backward<true, true> : kl_backward<true, false>)
                     : (scale ? kl_backward<false, true> : kl_backward<false, false>);
      run(pa, pb, static_cast<TA*>(grad_a), static_cast<TB*>(grad_b), vecs, index, rows, cols, stride_a, stride_b,
          inv_t, flags, threads);
      break;
    }
    case JSD_TERMS:
      (scale ? jsd_terms<true> : jsd_terms<false>)(pa, pb, out64, vecs, rows, cols, stride_a, stride_b, inv_t, beta,
                                                   threads);
      break;
    case JSD_GRADS:
      (scale ? jsd_grads<true> : jsd_grads<false>)(pa, pb, static_cast<TA*>(grad_a), static_cast<TB*>(grad_b), vecs,
                                                   rows, cols, stride_a, stride_b, inv_t, beta, flags, threads);
      break;
    case TOPK_STATS:
      (scale ? topk_stats<true> : topk_stats<false>)(pa, out64, index, k, rows, cols, stride_a, inv_t, threads);
      break;
    case TOPK_GRADS:
      (scale ? topk_grads<true> : topk_grads<false>)(pa, static_cast<TA*>(grad_a), vecs, index, k, rows, cols,
                                                     stride_a, inv_t, threads);
      break;
    default:
      break;
  }
}
