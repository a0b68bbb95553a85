// All transformer blocks of a decode step (B sequences, one new token each) in one native call,
// registered as the op `mistral7b::decode_step`.
//
// Why: at 135M parameters a decode token is ~450 small eager torch ops (norms, RoPE, cache writes,
// SDPA, SiLU, residual adds, GEMVs), and their fixed costs (Python, dispatcher, allocation, a thread
// fork/join per op) outweighed the reads of the weights. Here one OpenMP team runs every layer, as
// llama.cpp's thread pool does: each GEMV's rows are split over the threads, the small per-token work
// (RMSNorm, RoPE, cache writes, attention heads, SiLU) is split or repeated per thread, and phases
// meet at barriers instead of forking threads again.
//
// Numerics: the residual stream stays fp32 for the whole step and is rounded to the model's dtype at
// its end; RMSNorm, RoPE, softmax and SiLU run in fp32; keys and values are rounded to the cache dtype
// when written, as the eager path does. GEMVs are gemv.h's, as on the per-op path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <vector>

#include "gemv.h"
#include "simd.h"

namespace mistral7b {
namespace {

// A linear layer's weights as the Python side passes them: {weight} (fp32 / bf16), {qweight, scales}
// (int8) or {qweight, scales, mins} (int4), resolved to raw pointers once per step.
struct Linear {
  enum Kind { kFloat, kBFloat16, kInt8, kInt4 } kind;
  const void* w;
  const void* scales = nullptr;  // fp32, or fp16 when half_scales
  const void* mins = nullptr;
  bool half_scales = false;
  int64_t N, K, G = 0;

  int64_t row_bytes() const {
    switch (kind) {
      case kFloat: return K * 4;
      case kBFloat16: return K * 2;
      case kInt8: return K;
      default: return K / 2;
    }
  }
};

Linear resolve(at::TensorList t, int64_t K, const char* name) {
  for (const auto& x : t) TORCH_CHECK(x.is_contiguous() && x.is_cpu(), "decode_step: ", name, " tensors must be contiguous CPU tensors");
  Linear l{};
  l.w = t[0].data_ptr();
  l.N = t[0].size(0);
  l.K = K;
  if (t.size() == 1) {
    TORCH_CHECK(t[0].size(1) == K, "decode_step: ", name, " weight ", t[0].sizes(), " does not take ", K, " inputs");
    TORCH_CHECK(t[0].scalar_type() == at::kFloat || t[0].scalar_type() == at::kBFloat16, "decode_step: float weights must be fp32 or bf16");
    l.kind = t[0].scalar_type() == at::kFloat ? Linear::kFloat : Linear::kBFloat16;
    return l;
  }
  TORCH_CHECK(t.size() <= 3, "decode_step: a linear layer is 1 (float), 2 (int8) or 3 (int4) tensors, got ", t.size());
  l.kind = t.size() == 2 ? Linear::kInt8 : Linear::kInt4;
  TORCH_CHECK(t[0].scalar_type() == (l.kind == Linear::kInt8 ? at::kChar : at::kByte) && t[0].size(1) == l.row_bytes(),
              "decode_step: ", name, " qweight ", t[0].sizes(), " does not take ", K, " inputs");
  TORCH_CHECK((t[1].scalar_type() == at::kFloat || t[1].scalar_type() == at::kHalf) && t[1].size(0) == l.N &&
                  K % t[1].size(1) == 0, "decode_step: bad ", name, " scales");
  l.scales = t[1].data_ptr();
  l.half_scales = t[1].scalar_type() == at::kHalf;
  l.G = K / t[1].size(1);
  if (l.kind == Linear::kInt4) {
    TORCH_CHECK(t[2].scalar_type() == t[1].scalar_type() && t[2].sizes() == t[1].sizes(), "decode_step: bad ", name, " mins");
    l.mins = t[2].data_ptr();
  }
  return l;
}

// out[m, n] for m < M and n in each of the row ranges [n0, n1) (row stride l.N), x [M, K] fp32.
// Quantizes x into this thread's activation buffer once for all ranges (each thread quantizes all
// of x: cheaper than a barrier).
void gemv_rows(const Linear& l, const float* x, int64_t M, std::initializer_list<std::pair<int64_t, int64_t>> ranges,
               float* out) {
  auto over_ranges = [&](auto kernel) {
    for (auto [n0, n1] : ranges)
      if (n0 < n1) over_panels(M, n0, n1, l.row_bytes(), kernel);
  };
  if (l.kind == Linear::kFloat || l.kind == Linear::kBFloat16) {
    over_ranges([&](auto R, int64_t m0, int64_t p0, int64_t p1) {
      if (l.kind == Linear::kFloat)
        float_rows<decltype(R)::value>(x, m0, static_cast<const float*>(l.w), l.K, l.N, p0, p1, out);
      else
        float_rows<decltype(R)::value>(x, m0, static_cast<const c10::BFloat16*>(l.w), l.K, l.N, p0, p1, out);
    });
    return;
  }
  const Activations& a = quantize_activations(x, M, l.K, l.G, l.kind == Linear::kInt8 && Int8Block::wide);
  const auto* q = static_cast<const uint8_t*>(l.w);
  with_scales(l.scales, l.mins, l.half_scales, [&](const auto* scales, const auto* mins) {
    over_ranges([&](auto R, int64_t m0, int64_t p0, int64_t p1) {
      if (l.kind == Linear::kInt8)
        quantized_rows<Int8Block, decltype(R)::value>(a, m0, q, scales, mins, l.K, l.G, l.N, p0, p1, out);
      else
        quantized_rows<Int4Block, decltype(R)::value>(a, m0, q, scales, mins, l.K, l.G, l.N, p0, p1, out);
    });
  });
}

// This thread's share [begin, end) of n items.
inline std::pair<int64_t, int64_t> share(int64_t n, int tid, int nth) { return {n * tid / nth, n * (tid + 1) / nth}; }

// out[b] = x[b] / rms(x[b]) * weight, x and out [B, D] fp32.
void rms_norm(const float* x, const float* weight, int64_t B, int64_t D, float eps, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * D;
    const float inv = 1.f / std::sqrt(dot(xb, xb, D) / D + eps);
    for (int64_t i = 0; i < D; ++i) out[b * D + i] = xb[i] * inv * weight[i];
  }
}

// Rotates one head x [hd] in interleaved pairs by rot [hd / 2, 2] (cos, sin).
void rope(float* x, const float* rot, int64_t hd) {
  for (int64_t i = 0; i < hd / 2; ++i) {
    const float a = x[2 * i], b = x[2 * i + 1], c = rot[2 * i], s = rot[2 * i + 1];
    x[2 * i] = a * c - b * s;
    x[2 * i + 1] = a * s + b * c;
  }
}

template <typename C>
inline float dot_cached(const float* q, const C* k, int64_t hd) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < hd; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), acc);
  return hsum(acc);
}

template <typename C>
inline void prefetch_slot(const C* p, int64_t hd) {
  for (int64_t i = 0; i < hd * static_cast<int64_t>(sizeof(C)); i += 64) prefetch(reinterpret_cast<const char*>(p) + i);
}

// Attention of the `group` query heads q [group, hd] that share one kv head over cached slots
// [j0, j1): keys and values of slot j at k + at(j) * stride and v + at(j) * stride, at(j) = slot_of[j]
// (a paged row's slots, scattered over blocks) or j (nullptr: a contiguous row), each read once for
// the whole group (and prefetched ahead: the cache comes from DRAM); mask [used] (nullptr: all valid).
// Leaves, per head g, the unnormalized partial out[g] = sum_j e^(s_j - top[g]) v_j [hd] and
// total[g] = sum_j e^(s_j - top[g]), for merge_partials. scores: scratch [group, j1 - j0].
template <typename C>
void attend_slots(const float* q, int64_t group, const C* k, const C* v, int64_t stride, const int64_t* slot_of,
                  int64_t j0, int64_t j1, int64_t hd, const bool* mask, float scale, float* scores, float* out,
                  float* top, float* total) {
  constexpr int64_t ahead = 6;  // slots prefetched ahead
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // Scores per head padded to whole vectors of 8 (the padding scores as a masked slot): every slot's
  // score sits in the same lane whatever j1 is, so the sums below do not depend on the range's length.
  const int64_t n = j1 - j0, n8 = (n + 7) / 8 * 8;
  auto at = [&](int64_t j) { return slot_of ? slot_of[std::min(j, j1 - 1)] : j; };
  for (int64_t j = j0; j < j1; ++j) {
    prefetch_slot(k + at(j + ahead) * stride, hd);
    const bool valid = !mask || mask[j];
    for (int64_t g = 0; g < group; ++g)
      scores[g * n8 + j - j0] = valid ? dot_cached(q + g * hd, k + at(j) * stride, hd) * scale : neg_inf;
  }
  for (int64_t g = 0; g < group; ++g) {  // e^(s - top) in place, 8 slots a step
    float* sg = scores + g * n8;
    std::fill(sg + n, sg + n8, neg_inf);
    top[g] = n ? *std::max_element(sg, sg + n) : neg_inf;
    total[g] = 0.f;
    if (top[g] == neg_inf) continue;  // nothing valid here: no weight at all
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < n8; j += 8) {
      // exp8 clamps: a masked slot (-inf) gets ~1e-38, zeroed by the blend
      const __m256 x = _mm256_loadu_ps(sg + j);
      const __m256 e = _mm256_blendv_ps(exp8(_mm256_sub_ps(x, _mm256_set1_ps(top[g]))), _mm256_setzero_ps(),
                                        _mm256_cmp_ps(x, _mm256_set1_ps(neg_inf), _CMP_EQ_OQ));
      _mm256_storeu_ps(sg + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    total[g] = hsum(sum);
  }
  std::fill(out, out + group * hd, 0.f);
  for (int64_t j = j0; j < j1; ++j) {
    prefetch_slot(v + at(j + ahead) * stride, hd);
    if (mask && !mask[j]) continue;
    const C* vj = v + at(j) * stride;
    for (int64_t i = 0; i < hd; i += 8) {
      const __m256 vv = load8(vj + i);
      for (int64_t g = 0; g < group; ++g)
        _mm256_storeu_ps(out + g * hd + i, _mm256_fmadd_ps(_mm256_set1_ps(scores[g * n8 + j - j0]), vv,
                                                           _mm256_loadu_ps(out + g * hd + i)));
    }
  }
}

// Softmax-weighted output of one head from `parts` partials over disjoint slot ranges:
// out = sum_c e^(top_c - M) out_c / sum_c e^(top_c - M) total_c, M = max_c top_c. part c's vector is
// at outs + c * part_stride, its top and total at tops[c * tt_stride], totals[c * tt_stride].
void merge_partials(int64_t parts, const float* outs, int64_t part_stride, const float* tops, const float* totals,
                    int64_t tt_stride, int64_t hd, float* out) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < parts; ++c) top = std::max(top, tops[c * tt_stride]);
  float denom = 0.f;
  std::fill(out, out + hd, 0.f);
  for (int64_t c = 0; c < parts; ++c) {
    if (totals[c * tt_stride] == 0.f) continue;
    const float w = std::exp(tops[c * tt_stride] - top);
    denom += w * totals[c * tt_stride];
    for (int64_t i = 0; i < hd; ++i) out[i] += w * outs[c * part_stride + i];
  }
  for (int64_t i = 0; i < hd; ++i) out[i] /= denom;
}

// out[i] = silu(gate[i]) * up[i] for i in [i0, i1).
void silu_mul(const float* gate, const float* up, int64_t i0, int64_t i1, float* out) {
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 sig = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(sig, _mm256_loadu_ps(up + i)));
  }
  for (; i < i1; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

template <typename C>
void store(C* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<C>(src[i]);
}

// Slots per attention range (a multiple of 8): a row's slots [0, used) are cut at multiples of it.
constexpr int64_t kSlotRange = 64;

struct Step {
  int64_t B, D, H, Hkv, hd, S, used, layers;
  int64_t layer_stride;      // cache elements per layer: rows * S * Hkv * hd
  float eps;
  const int64_t* write_dst;  // [B] flat slot index row * S + slot
  const int64_t* slots;      // [B, used] flat slot index of each row's slot j, or nullptr: row * S + j
  const bool* mask;          // [B, used] or nullptr
  const float* rot;          // [B, hd / 2, 2]: cos, sin of each token's RoPE angles
};

struct LayerWeights {
  const float* attention_norm;
  const float* ffn_norm;
  Linear qkv, wo, gate_up, down;
};

// The whole step on one OpenMP team. x [B, D] is the residual stream (fp32, updated in place);
// k_cache, v_cache [layers, rows, S, Hkv, hd]. Every phase splits its work over the threads, and
// a barrier ends each phase whose results other threads read.
template <typename C>
void run_step(const Step& s, const std::vector<LayerWeights>& layers, float* x, C* k_cache, C* v_cache) {
  const int64_t B = s.B, D = s.D, H = s.H, Hkv = s.Hkv, hd = s.hd, width = (H + 2 * Hkv) * hd, kv = Hkv * hd;
  const int64_t F = layers[0].gate_up.N / 2;
  // Shared buffers: qkv [B, width], attention output [B, H hd], projections [B, max(D, 2F)], act [B, F].
  std::vector<float> qkv(B * width), attn(B * H * hd), proj(B * std::max(D, 2 * F)), act(B * F);
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  // Attention: each (row, kv head) over slot ranges of kSlotRange, fixed in the row's slot order (never
  // cut by the batch size, the longest row or the thread count), so that a row's attention sums the
  // same partials in the same order whichever rows share its step: batch-invariant output.
  const int64_t group = H / Hkv, threads = std::max(1, at::get_num_threads());
  const int64_t chunks = std::max<int64_t>(1, (s.used + kSlotRange - 1) / kSlotRange);
  std::vector<float> partial(B * Hkv * chunks * group * hd), tops(B * Hkv * chunks * group), totals(tops.size());

#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    std::vector<float> xn(B * D), scores(group * kSlotRange);
    const auto [a0, a1] = share(B * Hkv * chunks, tid, nth);  // attention tasks: (row, kv head, slot range)
    const auto [m0, m1] = share(B * H, tid, nth);              // merges: (row, head)
    // Adds proj[:, n0:n1] (row stride N) into x's columns n0..n1: the rows this thread computed.
    auto add_rows = [&](int64_t N, int64_t n0, int64_t n1) {
      for (int64_t b = 0; b < B; ++b)
        for (int64_t n = n0; n < n1; ++n) x[b * D + n] += proj[b * N + n];
    };
    for (int64_t l = 0; l < s.layers; ++l) {
      const LayerWeights& w = layers[l];
      C* kc = k_cache + l * s.layer_stride;
      C* vc = v_cache + l * s.layer_stride;

      // q, k, v = wqkv(norm(x))
      rms_norm(x, w.attention_norm, B, D, s.eps, xn.data());
      auto [q0, q1] = share(w.qkv.N, tid, nth);
      gemv_rows(w.qkv, xn.data(), B, {{q0, q1}}, qkv.data());
#pragma omp barrier
      // RoPE on the q and k heads; k and v into their cache slots.
      auto [h0, h1] = share(B * (H + 2 * Hkv), tid, nth);
      for (int64_t t = h0; t < h1; ++t) {
        const int64_t b = t / (H + 2 * Hkv), head = t % (H + 2 * Hkv);
        float* v = qkv.data() + b * width + head * hd;
        if (head < H + Hkv) rope(v, s.rot + b * hd, hd);
        if (head >= H + Hkv) store(vc + s.write_dst[b] * kv + (head - H - Hkv) * hd, v, hd);
        else if (head >= H) store(kc + s.write_dst[b] * kv + (head - H) * hd, v, hd);
      }
#pragma omp barrier
      // Each kv head's query heads over its row's first `used` slots, the slots cut into `chunks`
      // ranges so that every thread streams its share of the cache; partials merged after a barrier.
      for (int64_t t = a0; t < a1; ++t) {
        const int64_t c = t % chunks, bk = t / chunks, b = bk / Hkv, kvh = bk % Hkv;
        const int64_t base = (s.slots ? 0 : s.write_dst[b] / s.S * s.S * kv) + kvh * hd;
        const int64_t j0 = c * kSlotRange, j1 = std::min(s.used, j0 + kSlotRange);
        attend_slots(qkv.data() + b * width + kvh * group * hd, group, kc + base, vc + base, kv,
                     s.slots ? s.slots + b * s.used : nullptr, j0, j1, hd,
                     s.mask ? s.mask + b * s.used : nullptr, scale, scores.data(), partial.data() + t * group * hd,
                     tops.data() + t * group, totals.data() + t * group);
      }
#pragma omp barrier
      for (int64_t t = m0; t < m1; ++t) {  // t = (b, kv head, head in group)
        const int64_t bk = t / group, g = t % group;
        merge_partials(chunks, partial.data() + (bk * chunks * group + g) * hd, group * hd,
                       tops.data() + bk * chunks * group + g, totals.data() + bk * chunks * group + g, group, hd,
                       attn.data() + (bk * group + g) * hd);
      }
#pragma omp barrier
      // x += wo(attn)
      auto [o0, o1] = share(D, tid, nth);
      gemv_rows(w.wo, attn.data(), B, {{o0, o1}}, proj.data());
      add_rows(D, o0, o1);
#pragma omp barrier
      // act = silu(w1 norm(x)) * w3 norm(x): this thread's gate rows and the same up rows.
      rms_norm(x, w.ffn_norm, B, D, s.eps, xn.data());
      auto [f0, f1] = share(F, tid, nth);
      gemv_rows(w.gate_up, xn.data(), B, {{f0, f1}, {F + f0, F + f1}}, proj.data());
      for (int64_t b = 0; b < B; ++b) silu_mul(proj.data() + b * 2 * F, proj.data() + b * 2 * F + F, f0, f1, act.data() + b * F);
#pragma omp barrier
      // x += w2(act)
      gemv_rows(w.down, act.data(), B, {{o0, o1}}, proj.data());
      add_rows(D, o0, o1);
#pragma omp barrier
    }
  }
}

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

}  // namespace

// h [B, D] (model dtype) -> h after every block [B, D], then RMSNorm-ed by final_norm if given.
// weights: per layer attention_norm, ffn_norm, then the tensors of qkv, wo, gate_up and down,
// linear_sizes [4 * layers] telling how many each (see Linear). k_cache, v_cache [layers, rows, S,
// Hkv, hd] get the new keys/values at flat slots write_dst [B] (row * S + slot); attention reads
// slots [0, used) of each row where mask [B, used] allows (None: all); positions [B] set RoPE.
// slots [B, used]: where each row's slot j is (a flat slot index): rows are then blocks of a paged
// cache [layers, blocks, block_size, Hkv, hd] and a sequence's slots lie in the blocks of its table.
at::Tensor decode_step(const at::Tensor& h, at::TensorList weights, at::IntArrayRef linear_sizes, double eps,
                       int64_t n_heads, int64_t n_kv_heads, at::Tensor k_cache, at::Tensor v_cache,
                       const at::Tensor& write_dst, int64_t used, const c10::optional<at::Tensor>& mask,
                       const at::Tensor& positions, double rope_theta, const c10::optional<at::Tensor>& final_norm,
                       const c10::optional<at::Tensor>& slots) {
  TORCH_CHECK(h.dim() == 2, "decode_step: h must be [B, D]");
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
              "decode_step: caches must be contiguous [layers, rows, S, Hkv, hd] of one dtype");
  Step s{};
  s.B = h.size(0), s.D = h.size(1), s.H = n_heads, s.Hkv = n_kv_heads, s.eps = static_cast<float>(eps);
  s.layers = static_cast<int64_t>(linear_sizes.size()) / 4, s.S = k_cache.size(2), s.hd = k_cache.size(4), s.used = used;
  s.layer_stride = k_cache[0].numel();
  TORCH_CHECK(s.layers >= 1 && k_cache.size(0) == s.layers, "decode_step: ", s.layers, " layers of weights for a ", k_cache.size(0), "-layer cache");
  TORCH_CHECK(k_cache.size(3) == s.Hkv && s.H % s.Hkv == 0 && s.hd % 8 == 0, "decode_step: bad head layout");
  TORCH_CHECK(used >= 1 && (slots || used <= s.S), "decode_step: used slots ", used, " not in [1, ", s.S, "]");
  const auto dst = write_dst.to(at::kLong).contiguous();
  TORCH_CHECK(dst.numel() == s.B, "decode_step: write_dst must have B entries");
  s.write_dst = dst.data_ptr<int64_t>();
  const auto pos = positions.to(at::kLong).contiguous();
  TORCH_CHECK(pos.numel() == s.B, "decode_step: positions must have B entries");
  std::vector<float> rot(s.B * s.hd);  // [B, hd / 2, (cos, sin)], in fp32 as model.rope_rotation
  for (int64_t i = 0; i < s.hd / 2; ++i) {
    const float inv_freq = 1.f / std::pow(static_cast<float>(rope_theta), static_cast<float>(2 * i) / static_cast<float>(s.hd));
    for (int64_t b = 0; b < s.B; ++b) {
      const float angle = static_cast<float>(pos.data_ptr<int64_t>()[b]) * inv_freq;
      rot[b * s.hd + 2 * i] = std::cos(angle);
      rot[b * s.hd + 2 * i + 1] = std::sin(angle);
    }
  }
  s.rot = rot.data();
  at::Tensor slot_index;
  if (slots) {
    slot_index = slots->to(at::kLong).contiguous();
    TORCH_CHECK(slot_index.numel() == s.B * used, "decode_step: slots must be [B, used]");
    const int64_t n_slots = k_cache.size(1) * s.S;
    TORCH_CHECK(slot_index.min().item<int64_t>() >= 0 && slot_index.max().item<int64_t>() < n_slots,
                "decode_step: slots out of the cache's ", n_slots);
    s.slots = slot_index.data_ptr<int64_t>();
  }
  at::Tensor valid;
  if (mask) {
    valid = mask->to(at::kBool).contiguous();
    TORCH_CHECK(valid.numel() == s.B * used, "decode_step: mask must be [B, used]");
    s.mask = valid.data_ptr<bool>();
  }

  // Resolve every layer's weights (norms as fp32 copies when the model is not fp32).
  std::vector<LayerWeights> layers(s.layers);
  std::vector<at::Tensor> norms;
  size_t next = 0;
  auto take = [&](int64_t count) {
    TORCH_CHECK(count >= 1 && next + count <= weights.size(), "decode_step: linear_sizes do not match the weights");
    auto part = weights.slice(next, count);
    next += count;
    return part;
  };
  const int64_t qkv_out = (s.H + 2 * s.Hkv) * s.hd;
  for (int64_t l = 0; l < s.layers; ++l) {
    LayerWeights& w = layers[l];
    norms.push_back(as_float(take(1)[0]));
    norms.push_back(as_float(take(1)[0]));
    TORCH_CHECK(norms[2 * l].numel() == s.D && norms[2 * l + 1].numel() == s.D, "decode_step: norm weights must have D entries");
    w.attention_norm = norms[2 * l].data_ptr<float>();
    w.ffn_norm = norms[2 * l + 1].data_ptr<float>();
    w.qkv = resolve(take(linear_sizes[4 * l]), s.D, "qkv");
    w.wo = resolve(take(linear_sizes[4 * l + 1]), s.H * s.hd, "wo");
    w.gate_up = resolve(take(linear_sizes[4 * l + 2]), s.D, "gate_up");
    TORCH_CHECK(w.qkv.N == qkv_out && w.wo.N == s.D && w.gate_up.N % 2 == 0 && w.gate_up.N == layers[0].gate_up.N,
                "decode_step: projection sizes do not match the heads and dim");
    w.down = resolve(take(linear_sizes[4 * l + 3]), w.gate_up.N / 2, "down");
    TORCH_CHECK(w.down.N == s.D, "decode_step: down projection gives ", w.down.N, " outputs, expected ", s.D);
  }
  TORCH_CHECK(next == weights.size(), "decode_step: more weights than linear_sizes describe");

  auto x = h.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
  dispatch_float(k_cache.scalar_type(), [&](auto tag) {
    using C = decltype(tag);
    run_step(s, layers, x.data_ptr<float>(), k_cache.data_ptr<C>(), v_cache.data_ptr<C>());
  });
  if (final_norm) {
    const auto weight = as_float(*final_norm);
    TORCH_CHECK(weight.numel() == s.D, "decode_step: final_norm must have D entries");
    auto normed = at::empty_like(x);
    rms_norm(x.data_ptr<float>(), weight.data_ptr<float>(), s.B, s.D, s.eps, normed.data_ptr<float>());
    x = normed;
  }
  return x.to(h.scalar_type());
}

}  // namespace mistral7b

TORCH_LIBRARY_FRAGMENT(mistral7b, m) {
  m.def("decode_step(Tensor h, Tensor[] weights, int[] linear_sizes, float eps, int n_heads, int n_kv_heads, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor write_dst, int used, Tensor? mask, Tensor positions, "
        "float rope_theta, Tensor? final_norm, Tensor? slots=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(mistral7b, CPU, m) { m.impl("decode_step", &mistral7b::decode_step); }
