// The GEMV kernels, shared by kernels.cpp (the per-op torch entry points) and decode.cpp (the whole
// decode step): activation quantization, weight blocks, and row kernels that compute output rows
// [n0, n1) for up to kMaxTile activation rows. Threading is the caller's.
//
// Quantized kernels (llama.cpp's approach): the activations are quantized per 32-block to int8 with an
// fp32 scale, each weight block is dotted with them in integers (maddubs + madd), and the int32 block
// sums are scaled and accumulated in fp32.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace mistral7b {

constexpr int64_t QK = 32;    // weights per quantization block (GGUF's block size)
constexpr int kMaxTile = 4;   // activation rows dotted with each weight block while it is in registers
// Weights are streamed from DRAM once per token; the hardware prefetcher alone left a 2-thread decode
// step at ~8 GB/s (latency-bound), so the kernels prefetch this far ahead of the row they read.
constexpr int64_t kPrefetchBytes = 2048;

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

// ---- activations --------------------------------------------------------------------------------
// x [M, K] quantized per 32-block: q [M, K] int8 with q * d ~ x, d [M, K/32] (or, `wide`, q16 int16
// with q16 * d ~ x: for int8 weights, whose own error is small enough that int8 activations would
// dominate it: +1.6-2.1% perplexity on SmolLM2 against +0.2% with int16). Per weight group
// [M, K/G]: gsum, the exact sum of x (the int4 min term is min * gsum), and gerr, 7.5 x (gsum minus
// the sum of the quantized x) (the int4 centring term, see quantized_rows). tail [M, 2, 8]: gsum and
// gerr of the last 8 groups with the lanes before the final ng % 8 zeroed, so that group_terms ends a
// row with one vector step over groups [ng - 8, ng) instead of a scalar loop (whose store-forwarding
// stalls cost K = 576 rows a quarter of their time). grp [K/32] maps a block to its group. Reused per calling thread to spare
// allocations per call.
struct Activations {
  std::vector<int8_t> q;
  std::vector<int16_t> q16;
  std::vector<float> d, gsum, gerr, tail;
  std::vector<int32_t> grp;
};

template <typename T>
Activations& quantize_activations(const T* x, int64_t M, int64_t K, int64_t G, bool wide) {
  thread_local Activations a;
  const int64_t nb = K / QK, ng = K / G;
  const float top = wide ? 32767.f : 127.f;
  (wide ? a.q16.resize(M * K) : a.q.resize(M * K));
  a.d.resize(M * nb);
  a.gsum.assign(M * ng, 0.f);
  a.gerr.assign(M * ng, 0.f);
  a.grp.resize(nb);
  for (int64_t b = 0; b < nb; ++b) a.grp[b] = static_cast<int32_t>(b * QK / G);
  const __m256 sign = _mm256_set1_ps(-0.f);
  // Order the bytes of packs(packs(v0, v1), packs(v2, v3)) back to v0..v3.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const T* xb = x + m * K + b * QK;
      __m256 v[4], amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = load8(xb + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
        sum = _mm256_add_ps(sum, v[i]);
      }
      const float mx = hmax(amax), d = mx / top;
      const __m256 inv = _mm256_set1_ps(mx > 0.f ? top / mx : 0.f);
      __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], inv));  // rounds to nearest even
      __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], inv));
      __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], inv));
      __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], inv));
      const __m256i isum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
      const float xsum = hsum(sum);
      a.d[m * nb + b] = d;
      a.gsum[m * ng + a.grp[b]] += xsum;
      a.gerr[m * ng + a.grp[b]] += 7.5f * (xsum - d * hsum(_mm256_cvtepi32_ps(isum)));
      if (wide) {  // packs interleaves 128-bit lanes: 0xD8 puts the quarters back in order
        auto* out = reinterpret_cast<__m256i*>(a.q16.data() + m * K + b * QK);
        _mm256_storeu_si256(out, _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8));
        _mm256_storeu_si256(out + 1, _mm256_permute4x64_epi64(_mm256_packs_epi32(i2, i3), 0xD8));
        continue;
      }
      __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
      q = _mm256_permutevar8x32_epi32(q, order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q.data() + m * K + b * QK), q);
    }
  }
  a.tail.assign(M * 16, 0.f);
  if (ng >= 8) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t i = 8 - ng % 8; i < 8; ++i) {  // none when ng % 8 == 0
        a.tail[m * 16 + i] = a.gsum[m * ng + ng - 8 + i];
        a.tail[m * 16 + 8 + i] = a.gerr[m * ng + ng - 8 + i];
      }
    }
  }
  return a;
}

// ---- weight blocks: 32 weights, and their dot with 32 quantized activations as 8 int32 sums ------
// int8: 32 bytes against int16 activations (wide): both halves sign-extended to int16, then madd
// (|w x| <= 128 * 32767, so the pair sums fit int32).
struct Int8Block {
  using X = int16_t;
  static constexpr bool wide = true;
  static inline __m256i load(const uint8_t* row, int64_t b) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * bytes));
  }
  static inline __m256i dot(__m256i w, const X* x) {
    const __m256i lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(w));
    const __m256i hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(w, 1));
    return _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
                            _mm256_madd_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))));
  }
  static const X* activations(const Activations& a) { return a.q16.data(); }
  static constexpr int64_t bytes = 32;  // per block
};

// int4: 16 bytes, byte j = weight j (low nibble) | weight j+16 (high nibble); weights are 0..15.
// The bytes go to both 128-bit lanes (a broadcast load, no shuffle), the high lane shifted by 4.
struct Int4Block {
  using X = int8_t;
  static constexpr bool wide = false;
  static inline __m256i load(const uint8_t* row, int64_t b) {
    const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * bytes)));
    const __m256i both = _mm256_srlv_epi32(raw, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
  }
  // maddubs (unsigned w x signed x) gives int16 pair sums (|.| <= 2 * 15 * 127), madd adds pairs.
  static inline __m256i dot(__m256i w, const X* x) {
    const __m256i p = _mm256_maddubs_epi16(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
  }
  static const X* activations(const Activations& a) { return a.q.data(); }
  static constexpr int64_t bytes = 16;  // per block
};

// acc + min[g] * gsum[g] + scale[g] * gerr[g] over g < ng, 8 groups a step; min and scale fp32 or
// fp16 (S). The last ng % 8 groups: one step over [ng - 8, ng) with `tail` (see Activations) when
// ng >= 8, else a zero-padded copy.
template <typename S>
inline __m256 group_terms(__m256 acc, const S* min, const S* scale, const float* gsum, const float* gerr,
                          const float* tail, int64_t ng) {
  int64_t g = 0;
  for (; g + 8 <= ng; g += 8) {
    acc = _mm256_fmadd_ps(load8(min + g), _mm256_loadu_ps(gsum + g), acc);
    acc = _mm256_fmadd_ps(load8(scale + g), _mm256_loadu_ps(gerr + g), acc);
  }
  if (g == ng) return acc;
  if (ng >= 8) {
    acc = _mm256_fmadd_ps(load8(min + ng - 8), _mm256_loadu_ps(tail), acc);
    return _mm256_fmadd_ps(load8(scale + ng - 8), _mm256_loadu_ps(tail + 8), acc);
  }
  alignas(32) float pad[4][8] = {};
  for (int64_t i = 0; i < ng; ++i) {
    pad[0][i] = static_cast<float>(min[i]), pad[1][i] = gsum[i];
    pad[2][i] = static_cast<float>(scale[i]), pad[3][i] = gerr[i];
  }
  acc = _mm256_fmadd_ps(_mm256_load_ps(pad[0]), _mm256_load_ps(pad[1]), acc);
  return _mm256_fmadd_ps(_mm256_load_ps(pad[2]), _mm256_load_ps(pad[3]), acc);
}

inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) { return _cvtsh_ss(v.x); }  // F16C, one instruction

// Calls fn(scales, mins) with both typed as stored: fp16 when `half`, else fp32 (mins may be null).
template <typename Fn>
void with_scales(const void* scales, const void* mins, bool half, Fn fn) {
  if (half) fn(static_cast<const c10::Half*>(scales), static_cast<const c10::Half*>(mins));
  else fn(static_cast<const float*>(scales), static_cast<const float*>(mins));
}

// The weight scales of blocks [b, b + 8) of a row whose groups are s (grp: block -> group).
template <typename S>
inline __m256 block_scales(const S* s, const int32_t* grp, int64_t b, bool per_block) {
  if (per_block) return load8(s + b);
  if (grp[b] == grp[b + 7]) return _mm256_set1_ps(to_float(s[grp[b]]));  // per channel; G >= 256
  const int32_t* g = grp + b;
  return _mm256_setr_ps(to_float(s[g[0]]), to_float(s[g[1]]), to_float(s[g[2]]), to_float(s[g[3]]),
                        to_float(s[g[4]]), to_float(s[g[5]]), to_float(s[g[6]]), to_float(s[g[7]]));
}

// out[m0 + r, n] for r < R and n in [n0, n1): weight rows dotted block by block with R activation rows,
// blocks alternating between two accumulators to hide the fma latency. Scales (and mins) of type S:
// fp32, or fp16 (int4's default: 20 bytes per 32 weights instead of 24).
// int4: w = q s + m with q in 0..15 and the activations x ~ xq d. Summing s q xq d + m x leaves the
// error s q (xq d - x), as large as the weight range; adding 7.5 s (x - xq d) centres it to
// s (q - 7.5) (xq d - x), halving it. Both per-group terms, min * gsum + s * gerr, are summed per row
// in one vector pass over the groups (group_terms), in the accumulator before its horizontal sum.
template <typename Block, int R, typename T, typename S>
void quantized_rows(const Activations& a, int64_t m0, const uint8_t* qw, const S* scales, const S* mins,
                    int64_t K, int64_t G, int64_t N, int64_t n0, int64_t n1, T* out) {
  const int64_t nb = K / QK, ng = K / G, row_bytes = K / QK * Block::bytes;
  const typename Block::X* xq[R];
  const float* xd[R];
  for (int r = 0; r < R; ++r) {
    xq[r] = Block::activations(a) + (m0 + r) * K;
    xd[r] = a.d.data() + (m0 + r) * nb;
  }
  const int32_t* grp = a.grp.data();
  const bool per_block = G == QK;  // loop-invariant: the compiler unswitches the loop on it
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = qw + n * row_bytes;
    const S* s = scales + n * ng;
    prefetch(s + 4 * ng);  // scales and mins of rows ahead (ng values a row)
    if (mins) prefetch(mins + (n + 4) * ng);
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    auto step = [&](int64_t b, int u) {  // one block, the scalar way
      const __m256i w = Block::load(row, b);
      const float sw = to_float(s[per_block ? b : grp[b]]);
      for (int r = 0; r < R; ++r) {
        const __m256i p = Block::dot(w, xq[r] + b * QK);
        acc[r][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(sw * xd[r][b]), acc[r][u]);
      }
    };
    // 8 blocks a step: their 8 weight scales times the activation scales in one vector multiply,
    // each block's lane broadcast by a permute (a scalar product spends ~4 instructions a block).
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
      for (int64_t ahead = 0; ahead < 8 * Block::bytes; ahead += 64) prefetch(row + b * Block::bytes + ahead + kPrefetchBytes);
      const __m256 sw = block_scales(s, grp, b, per_block);
      __m256 sd[R];
      for (int r = 0; r < R; ++r) sd[r] = _mm256_mul_ps(sw, _mm256_loadu_ps(xd[r] + b));
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const __m256i w = Block::load(row, b + j);
        for (int r = 0; r < R; ++r) {
          const __m256i p = Block::dot(w, xq[r] + (b + j) * QK);
          const __m256 lane = _mm256_permutevar8x32_ps(sd[r], _mm256_set1_epi32(j));
          acc[r][j & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), lane, acc[r][j & 1]);
        }
      }
    }
    for (; b < nb; ++b) step(b, b & 1);
    for (int r = 0; r < R; ++r) {
      __m256 total = _mm256_add_ps(acc[r][0], acc[r][1]);
      if (mins) {
        total = group_terms(total, mins + n * ng, s, a.gsum.data() + (m0 + r) * ng, a.gerr.data() + (m0 + r) * ng,
                            a.tail.data() + (m0 + r) * 16, ng);
      }
      out[(m0 + r) * N + n] = static_cast<T>(hsum(total));
    }
  }
}

// ---- float weights ---------------------------------------------------------------------------------
// bf16 rows: a 256-bit load holds 16 weights as 8 pairs in 32-bit lanes; shifting a lane left by 16
// gives its even weight as an fp32, masking its low half the odd one. So x is split once per call into
// the even and odd elements of each 16, and 16 weights cost a load, a shift, an and and two FMAs
// (widening 8 at a time cost two more instructions).
template <int R, typename T>
void bf16_rows(const float* x, int64_t m0, const c10::BFloat16* w, int64_t K, int64_t N, int64_t n0, int64_t n1, T* out) {
  const int64_t K16 = K / 16 * 16;
  thread_local std::vector<float> split;  // [R, K16]: per 16 of x, its 8 even elements, then its 8 odd
  split.resize(R * K16);
  for (int r = 0; r < R; ++r) {
    for (int64_t k = 0; k < K16; k += 16) {
      const __m256 a = _mm256_loadu_ps(x + (m0 + r) * K + k), b = _mm256_loadu_ps(x + (m0 + r) * K + k + 8);
      // shuffle_ps picks within 128-bit lanes: [a0 a2 b0 b2 | a4 a6 b4 b6]; 0xD8 orders the quarters.
      const __m256d even = _mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), odd = _mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD));
      _mm256_storeu_ps(split.data() + r * K16 + k, _mm256_castpd_ps(_mm256_permute4x64_pd(even, 0xD8)));
      _mm256_storeu_ps(split.data() + r * K16 + k + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(odd, 0xD8)));
    }
  }
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t n = n0; n < n1; ++n) {
    const c10::BFloat16* row = w + n * K;
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K16; k += 16) {
      prefetch(row + k + kPrefetchBytes / 2);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
      for (int r = 0; r < R; ++r) {
        acc[r][0] = _mm256_fmadd_ps(even, _mm256_loadu_ps(split.data() + r * K16 + k), acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(split.data() + r * K16 + k + 8), acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float y = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
      for (int64_t j = K16; j < K; ++j) y += static_cast<float>(row[j]) * x[(m0 + r) * K + j];
      out[(m0 + r) * N + n] = static_cast<T>(y);
    }
  }
}

// out[m0 + r, n] = x[m0 + r] . w[n]; x already fp32 [M, K]; w fp32 or bf16 [N, K].
template <int R, typename W, typename T>
void float_rows(const float* x, int64_t m0, const W* w, int64_t K, int64_t N, int64_t n0, int64_t n1, T* out) {
  if constexpr (std::is_same_v<W, c10::BFloat16>) {
    bf16_rows<R>(x, m0, w, K, N, n0, n1, out);
    return;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const W* row = w + n * K;
    const float* xr = x + m0 * K;
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      prefetch(row + k + kPrefetchBytes / sizeof(W));
      const __m256 w0 = load8(row + k), w1 = load8(row + k + 8);
      for (int r = 0; r < R; ++r) {
        acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr + r * K + k), acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + r * K + k + 8), acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float y = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
      for (int64_t j = k; j < K; ++j) y += static_cast<float>(row[j]) * xr[r * K + j];
      out[(m0 + r) * N + n] = static_cast<T>(y);
    }
  }
}

constexpr int64_t kPanelBytes = 64 * 1024;  // weight rows re-read per activation tile stay in L2

// Calls kernel(R, m0, p0, p1) over weight rows [n0, n1) for every tile of R <= kMaxTile activation
// rows in [0, M): a panel of rows is dotted with every tile before moving on, so for M > kMaxTile
// the panel is read from DRAM once.
template <typename Kernel>
inline void over_panels(int64_t M, int64_t n0, int64_t n1, int64_t row_bytes, Kernel kernel) {
  const int64_t panel = std::max<int64_t>(1, kPanelBytes / row_bytes);
  for (int64_t p0 = n0; p0 < n1; p0 += panel) {
    const int64_t p1 = std::min(n1, p0 + panel);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxTile) {
      switch (std::min<int64_t>(kMaxTile, M - m0)) {
        case 1: kernel(std::integral_constant<int, 1>{}, m0, p0, p1); break;
        case 2: kernel(std::integral_constant<int, 2>{}, m0, p0, p1); break;
        case 3: kernel(std::integral_constant<int, 3>{}, m0, p0, p1); break;
        default: kernel(std::integral_constant<int, 4>{}, m0, p0, p1); break;
      }
    }
  }
}

}  // namespace mistral7b
