// Batch-1 GEMV on quantized weights for the decode engine: 8-bit codes (a byte each) or 4-bit codes (two a
// byte; 2- and 3-bit grids are stored as 4-bit), a float16 scale d and offset m per group of `group`
// consecutive input channels of each output row:  w = d * c + m  (a symmetric grid has m = -d * 2^(bits-1)).
//
//   y_j = sum_g ( d_jg * sum_{i in g} c_ji x_i  +  m_jg * sum_{i in g} x_i )
//
// Codes are transposed, [in, out], so that an input channel's codes are one contiguous row (4-bit: low nibbles
// outputs [0, out/2), high nibbles [out/2, out)), and the scales [groups, out]; y accumulates x_i times row i
// (an axpy per kept channel, vectorised across the outputs), group by group, and each group's accumulator is
// scaled once. The kernel keeps x_i when |x_i| * score_scale_i > threshold (a negative threshold keeps every
// channel: the dense product) and reads only the kept rows; a group with no kept channel is skipped with its
// scales. Threads own disjoint runs of kept rows with private accumulators, summed at the end. (A row-major
// dense layout with a dot product per group was measured 2x slower: a horizontal sum per group of 32.)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

void check_scales(const torch::Tensor& s, const torch::Tensor& m, int64_t a, int64_t b, const char* what) {
  TORCH_CHECK(s.dtype() == torch::kFloat16 && m.dtype() == torch::kFloat16 && s.is_contiguous() &&
                  m.is_contiguous() && s.dim() == 2 && s.size(0) == a && s.size(1) == b && m.sizes() == s.sizes(),
              what);
}

// acc[0:out] += sum_r v[r] * codes of transposed row r, for `n` rows (1 to ROWS) at once: every pass over acc
// (kept in L1) serves up to ROWS rows. 4-bit: low nibbles are the first half of the outputs, high nibbles the second.
// Written with AVX-512 or AVX2 intrinsics where the compiler targets them (-march=native): the compiler does
// not vectorize the byte -> float conversions well on its own (measured: 3 GB/s of codes instead of ~20).
constexpr int ROWS = 8;

template <bool FOUR>
inline void add_rows(const uint8_t* const* rows, const float* v, int n, float* __restrict__ acc, int64_t out) {
  const int64_t width = FOUR ? out / 2 : out;  // code bytes per row
  int64_t j = 0;
#if defined(__AVX512F__)
  {
    __m512 vv[ROWS];
    for (int r = 0; r < n; ++r) vv[r] = _mm512_set1_ps(v[r]);
    const __m512i low = _mm512_set1_epi32(15);
    for (; j + 16 <= width; j += 16) {
      if (FOUR) {
        __m512 lo = _mm512_loadu_ps(acc + j), hi = _mm512_loadu_ps(acc + width + j);
        for (int r = 0; r < n; ++r) {
          const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + j)));
          lo = _mm512_fmadd_ps(vv[r], _mm512_cvtepi32_ps(_mm512_and_si512(c, low)), lo);
          hi = _mm512_fmadd_ps(vv[r], _mm512_cvtepi32_ps(_mm512_srli_epi32(c, 4)), hi);
        }
        _mm512_storeu_ps(acc + j, lo);
        _mm512_storeu_ps(acc + width + j, hi);
      } else {
        __m512 a = _mm512_loadu_ps(acc + j);
        for (int r = 0; r < n; ++r) {
          const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + j)));
          a = _mm512_fmadd_ps(vv[r], _mm512_cvtepi32_ps(c), a);
        }
        _mm512_storeu_ps(acc + j, a);
      }
    }
  }
#elif defined(__AVX2__) && defined(__FMA__)
  {
    __m256 vv[ROWS];
    for (int r = 0; r < n; ++r) vv[r] = _mm256_set1_ps(v[r]);
    const __m256i low = _mm256_set1_epi32(15);
    for (; j + 8 <= width; j += 8) {
      if (FOUR) {
        __m256 lo = _mm256_loadu_ps(acc + j), hi = _mm256_loadu_ps(acc + width + j);
        for (int r = 0; r < n; ++r) {
          const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(rows[r] + j)));
          lo = _mm256_fmadd_ps(vv[r], _mm256_cvtepi32_ps(_mm256_and_si256(c, low)), lo);
          hi = _mm256_fmadd_ps(vv[r], _mm256_cvtepi32_ps(_mm256_srli_epi32(c, 4)), hi);
        }
        _mm256_storeu_ps(acc + j, lo);
        _mm256_storeu_ps(acc + width + j, hi);
      } else {
        __m256 a = _mm256_loadu_ps(acc + j);
        for (int r = 0; r < n; ++r) {
          const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(rows[r] + j)));
          a = _mm256_fmadd_ps(vv[r], _mm256_cvtepi32_ps(c), a);
        }
        _mm256_storeu_ps(acc + j, a);
      }
    }
  }
#endif
  for (; j < width; ++j) {  // the tail (and the whole row without vector intrinsics)
    for (int r = 0; r < n; ++r) {
      const uint8_t b = rows[r][j];
      if (FOUR) {
        acc[j] += v[r] * static_cast<float>(b & 15);
        acc[j + width] += v[r] * static_cast<float>(b >> 4);
      } else {
        acc[j] += v[r] * static_cast<float>(b);
      }
    }
  }
}

// y[0:out] += d * acc + m * xs, with d and m float16 (one group's scale and offset rows).
inline void scale_group(const at::Half* __restrict__ d, const at::Half* __restrict__ m, const float* __restrict__ acc,
                        float xs, float* __restrict__ y, int64_t out) {
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 vx = _mm512_set1_ps(xs);
  for (; j + 16 <= out; j += 16) {
    const __m512 vd = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + j)));
    const __m512 vm = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + j)));
    const __m512 t = _mm512_fmadd_ps(vd, _mm512_loadu_ps(acc + j), _mm512_loadu_ps(y + j));
    _mm512_storeu_ps(y + j, _mm512_fmadd_ps(vm, vx, t));
  }
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  const __m256 vx = _mm256_set1_ps(xs);
  for (; j + 8 <= out; j += 8) {
    const __m256 vd = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + j)));
    const __m256 vm = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + j)));
    const __m256 t = _mm256_fmadd_ps(vd, _mm256_loadu_ps(acc + j), _mm256_loadu_ps(y + j));
    _mm256_storeu_ps(y + j, _mm256_fmadd_ps(vm, vx, t));
  }
#endif
  for (; j < out; ++j) y[j] += static_cast<float>(d[j]) * acc[j] + static_cast<float>(m[j]) * xs;
}

// y += d_g * acc + m_g * xs over the outputs, for the kept rows [k0, k1) of the kept list (ascending channels).
void accumulate_kept(const uint8_t* pc, const at::Half* pd, const at::Half* pm, const int32_t* rows, const float* vals,
                     int64_t k0, int64_t k1, int64_t out, int64_t group, bool four_bit, float* __restrict__ y,
                     float* __restrict__ acc) {
  const int64_t row_bytes = four_bit ? out / 2 : out;
  for (int64_t j = 0; j < out; ++j) y[j] = 0.f;
  int64_t k = k0;
  while (k < k1) {
    const int64_t g = rows[k] / group;
    int64_t e = k;
    float xs = 0.f;
    for (int64_t j = 0; j < out; ++j) acc[j] = 0.f;
    while (e < k1 && rows[e] / group == g) {  // this group's kept rows, ROWS at a time
      const uint8_t* block[ROWS];
      int n = 0;
      for (; n < ROWS && e + n < k1 && rows[e + n] / group == g; ++n) {
        block[n] = pc + int64_t(rows[e + n]) * row_bytes;
        xs += vals[e + n];
      }
#if defined(__x86_64__) || defined(__i386__)
      // the next block's rows, a block ahead: the compute between reads leaves the prefetchers too little
      // lead on their own (measured: 9 GB/s from memory against 15 in cache)
      for (int64_t f = e + ROWS; f < std::min(k1, e + 2 * ROWS); ++f) {
        const char* next = reinterpret_cast<const char*>(pc + int64_t(rows[f]) * row_bytes);
        for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
      }
#endif
      if (four_bit)
        add_rows<true>(block, vals + e, n, acc, out);
      else
        add_rows<false>(block, vals + e, n, acc, out);
      e += n;
    }
    scale_group(pd + g * out, pm + g * out, acc, xs, y, out);
    k = e;
  }
}

// Input-sparse GEMV on transposed codes [in, out (8-bit) or out/2 (4-bit)], scale/offset [groups, out].
// Returns (y, number of kept channels).
// The mask is decided on x itself (|x_i| * score_scale_i > threshold, exactly as the float32 kernels decide it);
// the kept values are x_i * value_scale_i (an input scale's 1 / s; empty: x_i).
std::tuple<torch::Tensor, int64_t> q_sparse_gemv(const torch::Tensor& codes_t, const torch::Tensor& scale_t,
                                                 const torch::Tensor& offset_t, const torch::Tensor& x,
                                                 const torch::Tensor& score_scale, double threshold,
                                                 const torch::Tensor& value_scale, int64_t group, bool four_bit) {
  TORCH_CHECK(codes_t.dtype() == torch::kUInt8 && codes_t.is_contiguous() && codes_t.dim() == 2, "codes [in, *] uint8");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 1 && x.size(0) == codes_t.size(0),
              "x float32, one value per code row");
  const int64_t in = codes_t.size(0), out = four_bit ? codes_t.size(1) * 2 : codes_t.size(1), groups = in / group;
  TORCH_CHECK(groups * group == in, "the groups must tile the input channels");
  check_scales(scale_t, offset_t, groups, out, "scale and offset [groups, out] float16");
  const float* px = x.data_ptr<float>();
  const float* ps = score_scale.defined() && score_scale.numel() ? score_scale.data_ptr<float>() : nullptr;
  const float* pv0 = value_scale.defined() && value_scale.numel() ? value_scale.data_ptr<float>() : nullptr;
  TORCH_CHECK(!pv0 || value_scale.numel() == in, "value_scale: one per input channel");
  const float t = static_cast<float>(threshold);
  static thread_local std::vector<int32_t> rows;
  static thread_local std::vector<float> vals;
  rows.resize(in);
  vals.resize(in);
  int64_t n = 0;
  for (int64_t i = 0; i < in; ++i) {  // branch-free compaction, as in sparse_gemv
    const float score = ps ? std::fabs(px[i]) * ps[i] : std::fabs(px[i]);
    rows[n] = static_cast<int32_t>(i);
    vals[n] = pv0 ? px[i] * pv0[i] : px[i];
    n += score > t;
  }
  auto y = torch::empty({out}, torch::kFloat32);
  float* py = y.data_ptr<float>();
  const uint8_t* pc = codes_t.data_ptr<uint8_t>();
  const at::Half *pd = scale_t.data_ptr<at::Half>(), *pm = offset_t.data_ptr<at::Half>();
  const int64_t threads = std::min<int64_t>(std::max(1, at::get_num_threads()), std::max<int64_t>(1, n / 16));
  static thread_local std::vector<float> buffer;
  buffer.resize((2 * threads - 1) * out);
  float* partial = buffer.data();  // threads-1 partial outputs, then one accumulator per thread
  const int32_t* pr = rows.data();
  const float* pv = vals.data();
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t th = t0; th < t1; ++th) {
      const int64_t k0 = n * th / threads, k1 = n * (th + 1) / threads;
      float* dst = th == 0 ? py : partial + (th - 1) * out;
      accumulate_kept(pc, pd, pm, pr, pv, k0, k1, out, group, four_bit, dst, partial + (threads - 1 + th) * out);
    }
  });
  for (int64_t th = 1; th < threads; ++th) {
    const float* src = partial + (th - 1) * out;
    for (int64_t j = 0; j < out; ++j) py[j] += src[j];
  }
  return {y, n};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q_sparse_gemv", &q_sparse_gemv, "input-sparse GEMV on 8- or 4-bit grouped codes, transposed [in, out]");
}
