// AVX2 GEMV kernels (gemv.h) for weight-only int8 / int4 and float linear layers, and dequantization,
// registered as torch ops `mistral7b::*` so that torch.compile treats them as extern calls. Why they
// exist, the formats and the measurements: mistral7b/kernels/__init__.py. Work is split over output
// rows with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "gemv.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace mistral7b {
namespace {

constexpr int64_t kTaskBytes = 32 * 1024;  // least weight bytes per thread: below, threads cost more than they save

// Splits rows over threads (at::parallel_for), each thread's share in panels (over_panels).
template <typename Kernel>
void over_rows(int64_t M, int64_t N, int64_t row_bytes, Kernel kernel) {
  at::parallel_for(0, N, std::max<int64_t>(1, kTaskBytes / row_bytes), [&](int64_t begin, int64_t end) {
    over_panels(M, begin, end, row_bytes, kernel);
  });
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

// x [..., K] @ dequantized(qweight).T -> [..., N] in x.dtype; mins undefined for int8. Scales (and
// mins) fp32 or fp16.
template <typename Block>
at::Tensor quantized_gemv(const at::Tensor& x_, const at::Tensor& qw_, const at::Tensor& scales_,
                          const c10::optional<at::Tensor>& mins_) {
  const auto x = x_.contiguous(), qw = qw_.contiguous(), scales = scales_.contiguous();
  const int64_t K = x.size(-1), N = qw.size(0), M = x.numel() / std::max<int64_t>(K, 1);
  TORCH_CHECK(qw.dim() == 2 && qw.size(1) == K / QK * Block::bytes,
              "qweight ", qw.sizes(), " does not match K = ", K);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) > 0 && K % scales.size(1) == 0,
              "scales ", scales.sizes(), " does not match qweight ", qw.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf, "scales must be fp32 or fp16");
  const int64_t G = K / scales.size(1);
  TORCH_CHECK(G % QK == 0, "group size ", G, " is not a multiple of ", QK);
  at::Tensor mins;
  if (mins_) {
    mins = mins_->contiguous();
    TORCH_CHECK(mins.sizes() == scales.sizes() && mins.scalar_type() == scales.scalar_type(),
                "mins ", mins.sizes(), " do not match scales ", scales.sizes());
  }
  auto out = at::empty(out_shape(x, N), x.options());
  if (M == 0 || N == 0) return out;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const Activations& a = quantize_activations(x.data_ptr<T>(), M, K, G, Block::wide);
    const auto* q = reinterpret_cast<const uint8_t*>(qw.data_ptr());
    T* y = out.data_ptr<T>();
    with_scales(scales.data_ptr(), mins.defined() ? mins.data_ptr() : nullptr, scales.scalar_type() == at::kHalf,
                [&](const auto* s, const auto* mn) {
                  over_rows(M, N, K / QK * Block::bytes, [&](auto R, int64_t m0, int64_t n0, int64_t n1) {
                    quantized_rows<Block, decltype(R)::value>(a, m0, q, s, mn, K, G, N, n0, n1, y);
                  });
                });
  });
  return out;
}

}  // namespace

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "int8 qweight must be int8");
  return quantized_gemv<Int8Block>(x, qweight, scales, c10::nullopt);
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& mins) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte, "int4 qweight must be uint8");
  return quantized_gemv<Int4Block>(x, qweight, scales, mins);
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

namespace {

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
}  // namespace mistral7b

TORCH_LIBRARY(mistral7b, m) {
  m.def("int8_gemv(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor qweight, Tensor scales, Tensor mins) -> Tensor");
  m.def("float_gemv(Tensor x, Tensor weight) -> Tensor");
  m.def("dequantize_int8(Tensor qweight, Tensor scales, ScalarType dtype) -> Tensor");
  m.def("dequantize_int4(Tensor qweight, Tensor scales, Tensor mins, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(mistral7b, CPU, m) {
  m.impl("int8_gemv", &mistral7b::int8_gemv);
  m.impl("int4_gemv", &mistral7b::int4_gemv);
  m.impl("float_gemv", &mistral7b::float_gemv);
  m.impl("dequantize_int8", &mistral7b::dequantize_int8);
  m.impl("dequantize_int4", &mistral7b::dequantize_int4);
}
