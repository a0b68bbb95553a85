// AVX2 GEMV kernels for weight-only int8 / int4 and float linear layers, registered as torch ops
// `mistral7b::*` so that torch.compile treats them as extern calls. Why they exist, the formats and
// the measurements: mistral7b/kernels/__init__.py.
//
// Quantized kernels (llama.cpp's approach): the activations are quantized per 32-block to int8 with an
// fp32 scale, each weight block is dotted with them in integers (maddubs + madd), and the int32 block
// sums are scaled and accumulated in fp32. Work is split over output rows with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t QK = 32;    // weights per quantization block (GGUF's block size)
constexpr int kMaxTile = 4;   // activation rows dotted with each weight block while it is in registers
constexpr int64_t kTaskBytes = 32 * 1024;   // least weight bytes per thread: below, threads cost more than they save
constexpr int64_t kPanelBytes = 64 * 1024;  // weight rows re-read per activation tile stay in L2

// ---- fp32 <-> storage types, 8 lanes at a time --------------------------------------------------
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::BFloat16* p, __m256 v) {  // round to nearest even, as c10::BFloat16(float)
  __m256i b = _mm256_castps_si256(v);
  __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
  __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// ---- activations --------------------------------------------------------------------------------
// x [M, K] quantized per 32-block: q [M, K] int8 with q * d ~ x, d [M, K/32]. Per weight group
// [M, K/G]: gsum, the exact sum of x (the int4 min term is min * gsum), and gerr, gsum minus the sum
// of the quantized x (the int4 centring term, see quantized_rows). grp [K/32] maps a block to its
// group. Reused per calling thread to spare allocations per call.
struct Activations {
  std::vector<int8_t> q;
  std::vector<float> d, gsum, gerr;
  std::vector<int32_t> grp;
};

template <typename T>
Activations& quantize_activations(const T* x, int64_t M, int64_t K, int64_t G) {
  thread_local Activations a;
  const int64_t nb = K / QK, ng = K / G;
  a.q.resize(M * K);
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
      const float mx = hmax(amax), d = mx / 127.f;
      const __m256 inv = _mm256_set1_ps(mx > 0.f ? 127.f / mx : 0.f);
      __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], inv));  // rounds to nearest even
      __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], inv));
      __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], inv));
      __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], inv));
      const __m256i isum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
      const float xsum = hsum(sum);
      a.d[m * nb + b] = d;
      a.gsum[m * ng + a.grp[b]] += xsum;
      a.gerr[m * ng + a.grp[b]] += xsum - d * hsum(_mm256_cvtepi32_ps(isum));
      __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
      q = _mm256_permutevar8x32_epi32(q, order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q.data() + m * K + b * QK), q);
    }
  }
  return a;
}

// ---- weight blocks: 32 weights as 32 bytes, and their int32 dot with 32 int8 activations ------
// int8: w * x = |w| * (x * sign(w)), so maddubs (unsigned x signed) applies. |x| <= 127 and |w| <= 128
// (sign(-128, -128) is the byte 0x80, 128 unsigned) keep the pair sums within int16.
struct Int8Block {
  static inline __m256i load(const uint8_t* row, int64_t b) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * bytes));
  }
  static inline __m256i lhs(__m256i w) { return _mm256_sign_epi8(w, w); }
  static inline __m256i rhs(__m256i w, __m256i x) { return _mm256_sign_epi8(x, w); }
  static constexpr int64_t bytes = 32;  // per block
};

// int4: 16 bytes, byte j = weight j (low nibble) | weight j+16 (high nibble); weights are 0..15.
// The bytes go to both 128-bit lanes (a broadcast load, no shuffle), the high lane shifted by 4.
struct Int4Block {
  static inline __m256i load(const uint8_t* row, int64_t b) {
    const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * bytes)));
    const __m256i both = _mm256_srlv_epi32(raw, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
  }
  static inline __m256i lhs(__m256i w) { return w; }
  static inline __m256i rhs(__m256i, __m256i x) { return x; }
  static constexpr int64_t bytes = 16;  // per block
};

// out[m0 + r, n] for r < R and n in [n0, n1): weight rows dotted block by block with R activation rows,
// two blocks per step into two accumulators to hide the fma latency.
// int4: w = q s + m with q in 0..15 and the activations x ~ xq d. Summing s q xq d + m x leaves the
// error s q (xq d - x), as large as the weight range; adding 7.5 s (x - xq d) centres it to
// s (q - 7.5) (xq d - x), halving it, at the cost of one dot of length K/G per row (gerr).
template <typename Block, int R, typename T>
void quantized_rows(const Activations& a, int64_t m0, const uint8_t* qw, const float* scales,
                    const float* mins, int64_t K, int64_t G, int64_t N, int64_t n0, int64_t n1, T* out) {
  const int64_t nb = K / QK, ng = K / G, row_bytes = K / QK * Block::bytes;
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xq[R];
  const float* xd[R];
  for (int r = 0; r < R; ++r) {
    xq[r] = a.q.data() + (m0 + r) * K;
    xd[r] = a.d.data() + (m0 + r) * nb;
  }
  const int32_t* grp = a.grp.data();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = qw + n * row_bytes;
    const float* s = scales + n * ng;
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    auto step = [&](int64_t b, int u) {
      const __m256i w = Block::load(row, b), lhs = Block::lhs(w);
      const float sw = s[grp[b]];
      for (int r = 0; r < R; ++r) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[r] + b * QK));
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(lhs, Block::rhs(w, x)), ones);
        acc[r][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(sw * xd[r][b]), acc[r][u]);
      }
    };
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
      step(b, 0);
      step(b + 1, 1);
    }
    if (b < nb) step(b, 0);
    for (int r = 0; r < R; ++r) {
      float y = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
      if (mins) {
        y += dot(mins + n * ng, a.gsum.data() + (m0 + r) * ng, ng);
        y += 7.5f * dot(s, a.gerr.data() + (m0 + r) * ng, ng);
      }
      out[(m0 + r) * N + n] = static_cast<T>(y);
    }
  }
}

// Splits rows over threads; within a thread, a panel of rows is dotted with every activation tile
// before moving on, so for M > kMaxTile the panel is read from DRAM once.
template <typename Kernel>
void over_rows(int64_t M, int64_t N, int64_t row_bytes, Kernel kernel) {
  const int64_t grain = std::max<int64_t>(1, kTaskBytes / row_bytes);
  const int64_t panel = std::max<int64_t>(1, kPanelBytes / row_bytes);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p0 = begin; p0 < end; p0 += panel) {
      const int64_t p1 = std::min(end, p0 + panel);
      for (int64_t m0 = 0; m0 < M; m0 += kMaxTile) {
        switch (std::min<int64_t>(kMaxTile, M - m0)) {
          case 1: kernel(std::integral_constant<int, 1>{}, m0, p0, p1); break;
          case 2: kernel(std::integral_constant<int, 2>{}, m0, p0, p1); break;
          case 3: kernel(std::integral_constant<int, 3>{}, m0, p0, p1); break;
          default: kernel(std::integral_constant<int, 4>{}, m0, p0, p1); break;
        }
      }
    }
  });
}

template <typename Fn>
void dispatch_float(at::ScalarType t, Fn fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, "mistral7b kernels: expected float32, bfloat16 or float16, got ", t);
  }
}

// Contiguous fp32 without a dispatch when it already is (the common case, per decode call).
at::Tensor contiguous_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.contiguous().to(at::kFloat);
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

// x [..., K] @ dequantized(qweight).T -> [..., N] in x.dtype; mins undefined for int8.
template <typename Block>
at::Tensor quantized_gemv(const at::Tensor& x_, const at::Tensor& qw_, const at::Tensor& scales_,
                          const c10::optional<at::Tensor>& mins_) {
  const auto x = x_.contiguous(), qw = qw_.contiguous(), scales = contiguous_float(scales_);
  const int64_t K = x.size(-1), N = qw.size(0), M = x.numel() / std::max<int64_t>(K, 1);
  TORCH_CHECK(qw.dim() == 2 && qw.size(1) == K / QK * Block::bytes,
              "qweight ", qw.sizes(), " does not match K = ", K);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) > 0 && K % scales.size(1) == 0,
              "scales ", scales.sizes(), " does not match qweight ", qw.sizes());
  const int64_t G = K / scales.size(1);
  TORCH_CHECK(G % QK == 0, "group size ", G, " is not a multiple of ", QK);
  at::Tensor mins;
  if (mins_) {
    mins = contiguous_float(*mins_);
    TORCH_CHECK(mins.sizes() == scales.sizes(), "mins ", mins.sizes(), " != scales ", scales.sizes());
  }
  auto out = at::empty(out_shape(x, N), x.options());
  if (M == 0 || N == 0) return out;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const Activations& a = quantize_activations(x.data_ptr<T>(), M, K, G);
    const auto* q = reinterpret_cast<const uint8_t*>(qw.data_ptr());
    const float* s = scales.data_ptr<float>();
    const float* mn = mins.defined() ? mins.data_ptr<float>() : nullptr;
    T* y = out.data_ptr<T>();
    over_rows(M, N, K / QK * Block::bytes, [&](auto R, int64_t m0, int64_t n0, int64_t n1) {
      quantized_rows<Block, decltype(R)::value>(a, m0, q, s, mn, K, G, N, n0, n1, y);
    });
  });
  return out;
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "int8 qweight must be int8");
  return quantized_gemv<Int8Block>(x, qweight, scales, c10::nullopt);
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& mins) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte, "int4 qweight must be uint8");
  return quantized_gemv<Int4Block>(x, qweight, scales, mins);
}

// ---- float weights ---------------------------------------------------------------------------------
// out[m0 + r, n] = x[m0 + r] . w[n]; x already fp32 [M, K]; w fp32 or bf16 [N, K].
template <int R, typename W, typename T>
void float_rows(const float* x, int64_t m0, const W* w, int64_t K, int64_t N, int64_t n0, int64_t n1, T* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const W* row = w + n * K;
    const float* xr = x + m0 * K;
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
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

at::Tensor float_gemv(const at::Tensor& x_, const at::Tensor& w_) {
  const auto w = w_.contiguous();
  const int64_t K = x_.size(-1), N = w.size(0), M = x_.numel() / std::max<int64_t>(K, 1);
  TORCH_CHECK(w.dim() == 2 && w.size(1) == K, "weight ", w.sizes(), " does not match K = ", K);
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, "weight must be float32 or bfloat16");
  const auto x = contiguous_float(x_);
  auto out = at::empty(out_shape(x_, N), x_.options());
  if (M == 0 || N == 0) return out;
  dispatch_float(x_.scalar_type(), [&](auto out_tag) {
    using T = decltype(out_tag);
    T* y = out.data_ptr<T>();
    auto run = [&](const auto* wp) {
      using W = std::remove_cv_t<std::remove_pointer_t<decltype(wp)>>;
      over_rows(M, N, K * int64_t(sizeof(W)), [&](auto R, int64_t m0, int64_t n0, int64_t n1) {
        float_rows<decltype(R)::value>(x.data_ptr<float>(), m0, wp, K, N, n0, n1, y);
      });
    };
    if (w.scalar_type() == at::kFloat) run(w.data_ptr<float>());
    else run(w.data_ptr<c10::BFloat16>());
  });
  return out;
}

// ---- dequantization (the prefill path: dequantize, then a compute-bound matmul) --------------------
template <typename Block>
at::Tensor dequantize(const at::Tensor& qw_, const at::Tensor& scales_, const c10::optional<at::Tensor>& mins_,
                      at::ScalarType dtype) {
  const auto qw = qw_.contiguous(), scales = contiguous_float(scales_);
  const int64_t N = qw.size(0), K = qw.size(1) / Block::bytes * QK;
  const int64_t ng = scales.size(1), G = K / ng, row_bytes = qw.size(1);
  TORCH_CHECK(scales.size(0) == N && K % ng == 0 && G % QK == 0, "scales ", scales.sizes(), " do not match ", qw.sizes());
  at::Tensor mins = mins_ ? contiguous_float(*mins_) : at::Tensor();
  auto out = at::empty({N, K}, qw.options().dtype(dtype));
  const auto* q = reinterpret_cast<const uint8_t*>(qw.data_ptr());
  const float* s = scales.data_ptr<float>();
  const float* mn = mins.defined() ? mins.data_ptr<float>() : nullptr;
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* y = out.data_ptr<T>();
    at::parallel_for(0, N, std::max<int64_t>(1, kTaskBytes / row_bytes), [&](int64_t n0, int64_t n1) {
      alignas(32) int8_t w[QK];
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t b = 0; b < K / QK; ++b) {
          const int64_t g = n * ng + b * QK / G;
          _mm256_store_si256(reinterpret_cast<__m256i*>(w), Block::load(q + n * row_bytes, b));
          const __m256 sv = _mm256_set1_ps(s[g]), mv = _mm256_set1_ps(mn ? mn[g] : 0.f);
          for (int i = 0; i < 4; ++i) {
            const __m256 wi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 8 * i))));
            store8(y + n * K + b * QK + 8 * i, _mm256_add_ps(_mm256_mul_ps(wi, sv), mv));  // as torch: 2 roundings
          }
        }
      }
    });
  });
  return out;
}

at::Tensor dequantize_int8(const at::Tensor& qweight, const at::Tensor& scales, at::ScalarType dtype) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "int8 qweight must be int8");
  return dequantize<Int8Block>(qweight, scales, c10::nullopt, dtype);
}

at::Tensor dequantize_int4(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                           at::ScalarType dtype) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte, "int4 qweight must be uint8");
  return dequantize<Int4Block>(qweight, scales, mins, dtype);
}

}  // namespace

TORCH_LIBRARY(mistral7b, m) {
  m.def("int8_gemv(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor qweight, Tensor scales, Tensor mins) -> Tensor");
  m.def("float_gemv(Tensor x, Tensor weight) -> Tensor");
  m.def("dequantize_int8(Tensor qweight, Tensor scales, ScalarType dtype) -> Tensor");
  m.def("dequantize_int4(Tensor qweight, Tensor scales, Tensor mins, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(mistral7b, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int4_gemv", &int4_gemv);
  m.impl("float_gemv", &float_gemv);
  m.impl("dequantize_int8", &dequantize_int8);
  m.impl("dequantize_int4", &dequantize_int4);
}
