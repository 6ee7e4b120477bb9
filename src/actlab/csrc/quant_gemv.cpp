// Batch-1 GEMV on quantized weights for the decode engine: 8-bit codes (a byte each) or 4-bit codes (two a
// byte; 2- and 3-bit grids are stored as 4-bit), a float32 scale d and offset m per group of `group`
// consecutive input channels of each output row:  w = d * c + m  (a symmetric grid has m = -d * 2^(bits-1)).
//
//   y_j = sum_g ( d_jg * sum_{i in g} c_ji x_i  +  m_jg * sum_{i in g} x_i )
//
// Dense: codes [out, in] by rows, a row's groups one after another; a 4-bit group of G codes is G/2 bytes whose
// low nibbles are its first G/2 channels and high nibbles the last G/2 (both halves then stream contiguously).
// Input-sparse: codes transposed [in, out] so that a kept input channel's codes are one contiguous row (4-bit:
// low nibbles outputs [0, out/2), high nibbles [out/2, out)), and the scales [groups, out]. The kernel keeps x_i
// when |x_i| * score_scale_i > threshold and reads only the kept rows (scaled by value_scale_i); a group with no kept channel is skipped
// with its scales. Threads own disjoint runs of kept rows with private accumulators, summed at the end.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

inline float group_dot4(const uint8_t* __restrict__ b, const float* __restrict__ x, int64_t half) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < half; ++k)
    s += static_cast<float>(b[k] & 15) * x[k] + static_cast<float>(b[k] >> 4) * x[k + half];
  return s;
}

inline float group_dot8(const uint8_t* __restrict__ b, const float* __restrict__ x, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += static_cast<float>(b[k]) * x[k];
  return s;
}

void check_scales(const torch::Tensor& s, const torch::Tensor& m, int64_t a, int64_t b, const char* what) {
  TORCH_CHECK(s.dtype() == torch::kFloat32 && m.dtype() == torch::kFloat32 && s.is_contiguous() &&
                  m.is_contiguous() && s.dim() == 2 && s.size(0) == a && s.size(1) == b && m.sizes() == s.sizes(),
              what);
}

// Dense y = W x for codes [out, in (8-bit) or in/2 (4-bit)], scale/offset [out, groups].
torch::Tensor q_gemv(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& offset,
                     const torch::Tensor& x, int64_t group, bool four_bit) {
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.is_contiguous() && codes.dim() == 2, "codes [out, *] uint8");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 1, "x float32 vector");
  const int64_t out = codes.size(0), in = x.size(0), groups = in / group;
  TORCH_CHECK(groups * group == in && codes.size(1) == (four_bit ? in / 2 : in) && (!four_bit || group % 2 == 0),
              "codes must hold the input channels in whole groups");
  check_scales(scale, offset, out, groups, "scale and offset [out, groups] float32");
  const float* px = x.data_ptr<float>();
  std::vector<float> xsum(groups);
  for (int64_t g = 0; g < groups; ++g) {
    float s = 0.f;
    for (int64_t i = g * group; i < (g + 1) * group; ++i) s += px[i];
    xsum[g] = s;
  }
  auto y = torch::empty({out}, torch::kFloat32);
  const uint8_t* pc = codes.data_ptr<uint8_t>();
  const float *pd = scale.data_ptr<float>(), *pm = offset.data_ptr<float>();
  float* py = y.data_ptr<float>();
  const int64_t row_bytes = codes.size(1), group_bytes = four_bit ? group / 2 : group;
  at::parallel_for(0, out, std::max<int64_t>(16, out / std::max(1, at::get_num_threads())), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = pc + r * row_bytes;
      const float *d = pd + r * groups, *m = pm + r * groups;
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const float dot = four_bit ? group_dot4(row + g * group_bytes, px + g * group, group / 2)
                                   : group_dot8(row + g * group_bytes, px + g * group, group);
        acc += d[g] * dot + m[g] * xsum[g];
      }
      py[r] = acc;
    }
  });
  return y;
}

// acc[0:out] += v * codes of one transposed row (4-bit: low nibbles the first half of the outputs).
inline void add_row4(const uint8_t* __restrict__ b, float v, float* __restrict__ acc, int64_t half) {
#pragma omp simd
  for (int64_t j = 0; j < half; ++j) {
    acc[j] += v * static_cast<float>(b[j] & 15);
    acc[j + half] += v * static_cast<float>(b[j] >> 4);
  }
}

inline void add_row8(const uint8_t* __restrict__ b, float v, float* __restrict__ acc, int64_t out) {
#pragma omp simd
  for (int64_t j = 0; j < out; ++j) acc[j] += v * static_cast<float>(b[j]);
}

// y += d_g * acc + m_g * xs over the outputs, for the kept rows [k0, k1) of the kept list (ascending channels).
void accumulate_kept(const uint8_t* pc, const float* pd, const float* pm, const int32_t* rows, const float* vals,
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
    while (e < k1 && rows[e] / group == g) {
      const uint8_t* row = pc + int64_t(rows[e]) * row_bytes;
      if (four_bit)
        add_row4(row, vals[e], acc, out / 2);
      else
        add_row8(row, vals[e], acc, out);
      xs += vals[e];
      ++e;
    }
    const float *d = pd + g * out, *m = pm + g * out;
#pragma omp simd
    for (int64_t j = 0; j < out; ++j) y[j] += d[j] * acc[j] + m[j] * xs;
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
  check_scales(scale_t, offset_t, groups, out, "scale and offset [groups, out] float32");
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
  const float *pd = scale_t.data_ptr<float>(), *pm = offset_t.data_ptr<float>();
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
  m.def("q_gemv", &q_gemv, "dense GEMV on 8- or 4-bit grouped codes [out, in]");
  m.def("q_sparse_gemv", &q_sparse_gemv, "input-sparse GEMV on 8- or 4-bit grouped codes, transposed [in, out]");
}
