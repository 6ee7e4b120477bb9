// Batch-1 GEMV kernels for the decode engine (float32 weights and accumulation, OpenMP via ATen).
//
// At batch 1 a linear layer is bound by reading its weights. An input-sparse GEMV saves that traffic only
// if it never touches the weight columns of dropped inputs, in place: the weights are stored transposed
// (Wt = W^T, [in, out] row-major) so that the row of each kept input channel is contiguous, and the kernel
// accumulates  y = sum_{i kept} x_i * Wt[i, :]  over the kept rows only. Threads own disjoint blocks of
// outputs, so each reads a contiguous slice of every kept row and no reduction is needed.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

inline int64_t out_grain(int64_t out) {
  const int64_t threads = std::max(1, at::get_num_threads());
  return std::max<int64_t>(64, (out + threads - 1) / threads);
}

// y[o0:o1] = sum_k vals[k] * Wt[rows[k], o0:o1], four rows at a time (fewer passes over y).
inline void accumulate_rows(const float* __restrict__ wt, int64_t out, const int32_t* rows, const float* vals,
                            int64_t n, float* __restrict__ y, int64_t o0, int64_t o1) {
  const int64_t w = o1 - o0;
  float* __restrict__ dst = y + o0;
  for (int64_t j = 0; j < w; ++j) dst[j] = 0.0f;
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    const float* __restrict__ a = wt + int64_t(rows[k]) * out + o0;
    const float* __restrict__ b = wt + int64_t(rows[k + 1]) * out + o0;
    const float* __restrict__ c = wt + int64_t(rows[k + 2]) * out + o0;
    const float* __restrict__ d = wt + int64_t(rows[k + 3]) * out + o0;
    const float va = vals[k], vb = vals[k + 1], vc = vals[k + 2], vd = vals[k + 3];
    for (int64_t j = 0; j < w; ++j) dst[j] += va * a[j] + vb * b[j] + vc * c[j] + vd * d[j];
  }
  for (; k < n; ++k) {
    const float* __restrict__ a = wt + int64_t(rows[k]) * out + o0;
    const float va = vals[k];
    for (int64_t j = 0; j < w; ++j) dst[j] += va * a[j];
  }
}

torch::Tensor gather_accumulate(const torch::Tensor& wt, const std::vector<int32_t>& rows,
                                const std::vector<float>& vals) {
  const int64_t out = wt.size(1);
  auto y = torch::empty({out}, torch::kFloat32);
  const float* w = wt.data_ptr<float>();
  float* py = y.data_ptr<float>();
  const int64_t n = static_cast<int64_t>(rows.size());
  at::parallel_for(0, out, out_grain(out), [&](int64_t o0, int64_t o1) {
    accumulate_rows(w, out, rows.data(), vals.data(), n, py, o0, o1);
  });
  return y;
}

void check_wt(const torch::Tensor& wt, const torch::Tensor& x) {
  TORCH_CHECK(wt.dim() == 2 && wt.is_contiguous() && wt.dtype() == torch::kFloat32, "Wt must be [in, out] float32");
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous() && x.dtype() == torch::kFloat32 && x.size(0) == wt.size(0),
              "x must be a contiguous float32 vector of Wt's rows");
}

// Input-sparse GEMV, mask computed here: keep x_i when |x_i| * scale_i > threshold (scale may be empty).
// Returns (y, number of kept channels).
std::tuple<torch::Tensor, int64_t> sparse_gemv(const torch::Tensor& wt, const torch::Tensor& x,
                                               const torch::Tensor& scale, double threshold) {
  check_wt(wt, x);
  const int64_t in = wt.size(0);
  const float* px = x.data_ptr<float>();
  const float* ps = scale.defined() && scale.numel() ? scale.data_ptr<float>() : nullptr;
  const float t = static_cast<float>(threshold);
  std::vector<int32_t> rows;
  std::vector<float> vals;
  rows.reserve(in);
  vals.reserve(in);
  for (int64_t i = 0; i < in; ++i) {
    const float score = ps ? std::fabs(px[i]) * ps[i] : std::fabs(px[i]);
    if (score > t) {
      rows.push_back(static_cast<int32_t>(i));
      vals.push_back(px[i]);
    }
  }
  const int64_t kept = static_cast<int64_t>(rows.size());
  return {gather_accumulate(wt, rows, vals), kept};
}

// Input-sparse GEMV on given channels: y = sum_k vals[k] * Wt[idx[k], :].
torch::Tensor indexed_gemv(const torch::Tensor& wt, const torch::Tensor& idx, const torch::Tensor& vals) {
  TORCH_CHECK(idx.dtype() == torch::kInt64 && vals.dtype() == torch::kFloat32 && idx.numel() == vals.numel(),
              "idx int64 and vals float32 of equal length");
  auto i = idx.contiguous();
  auto v = vals.contiguous();
  std::vector<int32_t> rows(i.data_ptr<int64_t>(), i.data_ptr<int64_t>() + i.numel());
  std::vector<float> values(v.data_ptr<float>(), v.data_ptr<float>() + v.numel());
  return gather_accumulate(wt, rows, values);
}

inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {  // four independent accumulators of 16 lanes each
    for (int64_t j = 0; j < 16; ++j) {
      s0 += a[i + j] * b[i + j];
      s1 += a[i + 16 + j] * b[i + 16 + j];
      s2 += a[i + 32 + j] * b[i + 32 + j];
      s3 += a[i + 48 + j] * b[i + 48 + j];
    }
  }
  for (; i < n; ++i) s0 += a[i] * b[i];
  return (s0 + s1) + (s2 + s3);
}

// Dense GEMV y = W x for W [out, in] row-major (rows split across threads).
torch::Tensor dense_gemv(const torch::Tensor& w, const torch::Tensor& x) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.dtype() == torch::kFloat32, "W must be [out, in] float32");
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous() && x.size(0) == w.size(1), "x must match W's columns");
  const int64_t out = w.size(0), in = w.size(1);
  auto y = torch::empty({out}, torch::kFloat32);
  const float* pw = w.data_ptr<float>();
  const float* px = x.data_ptr<float>();
  float* py = y.data_ptr<float>();
  at::parallel_for(0, out, std::max<int64_t>(16, out / std::max(1, at::get_num_threads())), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) py[r] = dot(pw + r * in, px, in);
  });
  return y;
}

// Output-sparse GEMV: y[k] = W[idx[k], :] . x (rows of dropped neurons are never read).
torch::Tensor row_gemv(const torch::Tensor& w, const torch::Tensor& x, const torch::Tensor& idx) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.dtype() == torch::kFloat32, "W must be [out, in] float32");
  auto i = idx.contiguous();
  const int64_t n = i.numel(), in = w.size(1);
  auto y = torch::empty({n}, torch::kFloat32);
  const int64_t* pi = i.data_ptr<int64_t>();
  const float* pw = w.data_ptr<float>();
  const float* px = x.data_ptr<float>();
  float* py = y.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(16, n / std::max(1, at::get_num_threads())), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) py[k] = dot(pw + pi[k] * in, px, in);
  });
  return y;
}

// int8 GEMV with group scales: y_j = sum_g s[j, g] * sum_{i in g} q[j, i] x_i, and a bound on its error,
// e_j = sum_g s[j, g] / 2 * ||x_g||_1 (rounding to nearest int8 is off by at most half a step).
std::tuple<torch::Tensor, torch::Tensor> int8_gemv(const torch::Tensor& q, const torch::Tensor& s,
                                                   const torch::Tensor& x) {
  TORCH_CHECK(q.dtype() == torch::kInt8 && q.is_contiguous() && q.dim() == 2, "q must be [rows, in] int8");
  TORCH_CHECK(s.dtype() == torch::kFloat32 && s.is_contiguous() && s.size(0) == q.size(0), "scales [rows, groups]");
  const int64_t rows = q.size(0), in = q.size(1), groups = s.size(1), g = in / groups;
  TORCH_CHECK(g * groups == in, "in must be a multiple of the group count");
  std::vector<float> l1(groups, 0.f);
  const float* px = x.data_ptr<float>();
  for (int64_t k = 0; k < groups; ++k)
    for (int64_t i = k * g; i < (k + 1) * g; ++i) l1[k] += std::fabs(px[i]);
  auto y = torch::empty({rows}, torch::kFloat32);
  auto e = torch::empty({rows}, torch::kFloat32);
  const int8_t* pq = q.data_ptr<int8_t>();
  const float* ps = s.data_ptr<float>();
  float *py = y.data_ptr<float>(), *pe = e.data_ptr<float>();
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int8_t* __restrict__ row = pq + r * in;
      float acc = 0.f, err = 0.f;
      for (int64_t k = 0; k < groups; ++k) {
        float part = 0.f;
        for (int64_t i = k * g; i < (k + 1) * g; ++i) part += static_cast<float>(row[i]) * px[i];
        acc += ps[r * groups + k] * part;
        err += 0.5f * ps[r * groups + k] * l1[k];
      }
      py[r] = acc;
      pe[r] = err;
    }
  });
  return {y, e};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_gemv", &sparse_gemv, "input-sparse GEMV on Wt [in, out]: keep |x_i|*scale_i > threshold");
  m.def("indexed_gemv", &indexed_gemv, "input-sparse GEMV on given channels");
  m.def("dense_gemv", &dense_gemv, "dense GEMV on W [out, in]");
  m.def("row_gemv", &row_gemv, "output-sparse GEMV on selected rows of W [out, in]");
  m.def("int8_gemv", &int8_gemv, "int8 GEMV with group scales and a per-row error bound");
}
