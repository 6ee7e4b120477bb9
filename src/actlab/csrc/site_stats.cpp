// One pass over a [tokens, channels] float32 activation, the profiler's hot loop:
//   per channel: sum, sum of squares, sum of |x| (float64 accumulators), min, max, count of exact zeros;
//   per tensor:  histogram of |x| on 2048 log-spaced bins (float32 exponent + top 3 mantissa bits),
//                added into `hist` in place.
// Tasks own blocks of rows with private accumulators, merged once at the end; each task keeps
// 4 interleaved private histograms (consecutive values often hit the same bin, and one
// histogram would serialise on that store-to-load dependency) and merges them once at the end.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

namespace {

constexpr int kShift = 20;
constexpr int kBins = 2048;
constexpr int kSubHists = 4;

constexpr int64_t kBlockRows = 32;  // float32 partial sums over at most this many rows, then float64

// Sums of (x - shift) and (x - shift)^2: with the shift near the mean (a task's first row) the float32
// partial sums do not cancel catastrophically for channels whose |mean| >> std (massive activations).
inline void row_moments(const float* __restrict__ row, const float* __restrict__ shift, float* __restrict__ s,
                        float* __restrict__ q, float* __restrict__ a, float* __restrict__ lo,
                        float* __restrict__ hi, int32_t* __restrict__ z, int64_t w) {
  for (int64_t j = 0; j < w; ++j) {
    const float f = row[j];
    const float d = f - shift[j];
    s[j] += d;
    q[j] += d * d;
    a[j] += std::fabs(f);
    lo[j] = f < lo[j] ? f : lo[j];
    hi[j] = f > hi[j] ? f : hi[j];
    z[j] += f == 0.0f;
  }
}

inline void flush(float* __restrict__ f, double* __restrict__ d, int64_t w) {
  for (int64_t j = 0; j < w; ++j) {
    d[j] += f[j];
    f[j] = 0.0f;
  }
}

inline void row_histogram(const float* row, uint32_t* __restrict__ h, int64_t w) {
  int64_t j = 0;
  for (; j + kSubHists <= w; j += kSubHists) {
    for (int k = 0; k < kSubHists; ++k) {
      uint32_t bits;
      std::memcpy(&bits, row + j + k, sizeof(bits));
      h[k * kBins + ((bits & 0x7fffffffu) >> kShift)] += 1;
    }
  }
  for (; j < w; ++j) {
    uint32_t bits;
    std::memcpy(&bits, row + j, sizeof(bits));
    h[(bits & 0x7fffffffu) >> kShift] += 1;
  }
}

std::vector<torch::Tensor> site_stats(const torch::Tensor& x_in, torch::Tensor hist) {
  TORCH_CHECK(x_in.dim() == 2, "site_stats expects [tokens, channels]");
  TORCH_CHECK(hist.dtype() == torch::kInt64 && hist.numel() == kBins && hist.is_contiguous(), "bad histogram");
  TORCH_CHECK(x_in.size(0) < (int64_t(1) << 31), "too many tokens in one call");
  auto x = x_in.to(torch::kFloat32).contiguous();
  const int64_t n = x.size(0), c = x.size(1);
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  auto sum = torch::zeros({c}, f64), sumsq = torch::zeros({c}, f64), abssum = torch::zeros({c}, f64);
  auto mn = torch::full({c}, std::numeric_limits<float>::infinity(), torch::kFloat32);
  auto mx = torch::full({c}, -std::numeric_limits<float>::infinity(), torch::kFloat32);
  auto zeros = torch::zeros({c}, torch::kInt32);
  std::mutex merge_lock;
  const float* data = x.data_ptr<float>();
  double *s = sum.data_ptr<double>(), *q = sumsq.data_ptr<double>(), *a = abssum.data_ptr<double>();
  float *lo = mn.data_ptr<float>(), *hi = mx.data_ptr<float>();
  int32_t* z = zeros.data_ptr<int32_t>();
  int64_t* global_hist = hist.data_ptr<int64_t>();
  // tasks own blocks of rows (contiguous memory) with private accumulators, merged once at the end
  const int64_t grain = std::max<int64_t>(1, (n * c < (int64_t(1) << 16)) ? n : 32);
  at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
    std::vector<double> ls(c, 0.0), lq(c, 0.0), la(c, 0.0);
    std::vector<float> fs(c, 0.0f), fq(c, 0.0f), fa(c, 0.0f);
    std::vector<float> llo(c, std::numeric_limits<float>::infinity()), lhi(c, -std::numeric_limits<float>::infinity());
    std::vector<int32_t> lz(c, 0);
    std::vector<uint32_t> local(kSubHists * kBins, 0);
    const float* shift = data + r0 * c;
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = data + r * c;
      row_moments(row, shift, fs.data(), fq.data(), fa.data(), llo.data(), lhi.data(), lz.data(), c);
      row_histogram(row, local.data(), c);
      if ((r - r0 + 1) % kBlockRows == 0 || r + 1 == r1) {
        flush(fs.data(), ls.data(), c);
        flush(fq.data(), lq.data(), c);
        flush(fa.data(), la.data(), c);
      }
    }
    const double rows = static_cast<double>(r1 - r0);
    std::lock_guard<std::mutex> guard(merge_lock);
    for (int64_t j = 0; j < c; ++j) {  // undo the shift in float64
      const double k = shift[j];
      s[j] += ls[j] + rows * k;
      q[j] += lq[j] + 2.0 * k * ls[j] + rows * k * k;
      a[j] += la[j];
      lo[j] = std::min(lo[j], llo[j]);
      hi[j] = std::max(hi[j], lhi[j]);
      z[j] += lz[j];
    }
    for (int k = 0; k < kSubHists; ++k)
      for (int b = 0; b < kBins; ++b) global_hist[b] += local[k * kBins + b];
  });
  return {sum, sumsq, abssum, mn, mx, zeros};
}

// Per channel, how many rows have |x| > t for each threshold t: int64 [thresholds, channels].
torch::Tensor count_above(const torch::Tensor& x_in, const std::vector<double>& thresholds) {
  TORCH_CHECK(x_in.dim() == 2, "count_above expects [tokens, channels]");
  auto x = x_in.to(torch::kFloat32).contiguous();
  const int64_t n = x.size(0), c = x.size(1), k = static_cast<int64_t>(thresholds.size());
  auto counts = torch::zeros({k, c}, torch::kInt64);
  int64_t* out = counts.data_ptr<int64_t>();
  const float* data = x.data_ptr<float>();
  std::mutex merge_lock;
  at::parallel_for(0, n, 32, [&](int64_t r0, int64_t r1) {
    std::vector<int32_t> local(k * c, 0);
    for (int64_t t = 0; t < k; ++t) {
      const float th = static_cast<float>(thresholds[t]);
      int32_t* __restrict__ dst = local.data() + t * c;
      for (int64_t r = r0; r < r1; ++r) {
        const float* __restrict__ row = data + r * c;
        for (int64_t j = 0; j < c; ++j) dst[j] += std::fabs(row[j]) > th;
      }
    }
    std::lock_guard<std::mutex> guard(merge_lock);
    for (int64_t i = 0; i < k * c; ++i) out[i] += local[i];
  });
  return counts;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("site_stats", &site_stats, "fused per-channel moments + zero counts + |x| histogram");
  m.def("count_above", &count_above, "per-channel counts of |x| > threshold");
}
