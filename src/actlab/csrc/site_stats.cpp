// One pass over a [tokens, channels] float32 activation, the profiler's hot loop:
//   per channel: sum and sum of squared deviations from the mean (M2), sum of |x| (float64 accumulators),
//                min, max, count of exact zeros;
//   per tensor:  histogram of |x| on 2048 log-spaced bins (float32 exponent + top 3 mantissa bits),
//                added into `hist` in place.
// Moments are exact to float64 rounding even for channels whose mean dwarfs their spread (the attention sink
// carries |x| ~ 2e4 where other tokens have ~1e2): rows are taken in blocks of 32 (still in cache for a second
// look); a block's sum, then its squared deviations from the block's own mean, are taken in float64 (centred,
// so nothing cancels), and blocks are combined by Chan's pairwise update. Tasks own contiguous row ranges; their results
// are combined in row order, so a call's output does not depend on which task finished first. Each task keeps
// 4 interleaved private histograms (consecutive values often hit the same bin, and one histogram would
// serialise on that store-to-load dependency) and merges them once at the end.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <vector>

namespace {

constexpr int kShift = 20;
constexpr int kBins = 2048;
constexpr int kSubHists = 4;
constexpr int64_t kBlockRows = 32;

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

// (count, mean, M2) per channel for a contiguous range of rows.
struct Moments {
  double n = 0.0;
  std::vector<double> mean, m2, abs_sum;
  std::vector<float> lo, hi;
  std::vector<int32_t> zeros;
  std::vector<uint32_t> hist;
  explicit Moments(int64_t c)
      : mean(c, 0.0), m2(c, 0.0), abs_sum(c, 0.0), lo(c, std::numeric_limits<float>::infinity()),
        hi(c, -std::numeric_limits<float>::infinity()), zeros(c, 0), hist(kSubHists * kBins, 0) {}

  // Chan, Golub & LeVeque: fold a part with nb rows, mean mb and m2b into these moments.
  void fold(double nb, const double* mb, const double* m2b, int64_t c) {
    const double total = n + nb, w = nb / total, cross = n * nb / total;
    for (int64_t j = 0; j < c; ++j) {
      const double delta = mb[j] - mean[j];
      mean[j] += delta * w;
      m2[j] += m2b[j] + delta * delta * cross;
    }
    n = total;
  }
};

void accumulate_rows(const float* data, int64_t r0, int64_t r1, int64_t c, Moments& m) {
  std::vector<double> block_sum(c), block_mean(c), block_m2(c);
  std::vector<float> absf(c);
  for (int64_t b = r0; b < r1; b += kBlockRows) {
    const int64_t e = std::min(b + kBlockRows, r1);
    std::fill(block_sum.begin(), block_sum.end(), 0.0);
    std::fill(absf.begin(), absf.end(), 0.0f);
    for (int64_t r = b; r < e; ++r) {
      const float* __restrict__ row = data + r * c;
      for (int64_t j = 0; j < c; ++j) {
        const float f = row[j];
        block_sum[j] += f;
        absf[j] += std::fabs(f);
        m.lo[j] = f < m.lo[j] ? f : m.lo[j];
        m.hi[j] = f > m.hi[j] ? f : m.hi[j];
        m.zeros[j] += f == 0.0f;
      }
      row_histogram(row, m.hist.data(), c);
    }
    const double rows = static_cast<double>(e - b);
    for (int64_t j = 0; j < c; ++j) {
      block_mean[j] = block_sum[j] / rows;
      block_m2[j] = 0.0;
      m.abs_sum[j] += absf[j];
    }
    for (int64_t r = b; r < e; ++r) {  // the block is still in cache: centred squares, no cancellation
      const float* __restrict__ row = data + r * c;
      double* __restrict__ q = block_m2.data();
      const double* __restrict__ mu = block_mean.data();
      for (int64_t j = 0; j < c; ++j) {
        const double d = static_cast<double>(row[j]) - mu[j];
        q[j] += d * d;
      }
    }
    m.fold(rows, block_mean.data(), block_m2.data(), c);
  }
}

std::vector<torch::Tensor> site_stats(const torch::Tensor& x_in, torch::Tensor hist) {
  TORCH_CHECK(x_in.dim() == 2, "site_stats expects [tokens, channels]");
  TORCH_CHECK(hist.dtype() == torch::kInt64 && hist.numel() == kBins && hist.is_contiguous(), "bad histogram");
  TORCH_CHECK(x_in.size(0) < (int64_t(1) << 31), "too many tokens in one call");
  auto x = x_in.to(torch::kFloat32).contiguous();
  const int64_t n = x.size(0), c = x.size(1);
  const float* data = x.data_ptr<float>();
  std::mutex lock;
  std::map<int64_t, Moments> parts;  // keyed by first row: combined in row order below
  const int64_t grain = std::max<int64_t>(1, (n * c < (int64_t(1) << 16)) ? n : kBlockRows);
  at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
    Moments m(c);
    accumulate_rows(data, r0, r1, c, m);
    std::lock_guard<std::mutex> guard(lock);
    parts.emplace(r0, std::move(m));
  });
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  auto sum = torch::zeros({c}, f64), m2 = torch::zeros({c}, f64), abssum = torch::zeros({c}, f64);
  auto mn = torch::full({c}, std::numeric_limits<float>::infinity(), torch::kFloat32);
  auto mx = torch::full({c}, -std::numeric_limits<float>::infinity(), torch::kFloat32);
  auto zeros = torch::zeros({c}, torch::kInt32);
  Moments total(c);
  int64_t* global_hist = hist.data_ptr<int64_t>();
  for (auto& [r0, part] : parts) {
    total.fold(part.n, part.mean.data(), part.m2.data(), c);
    for (int64_t j = 0; j < c; ++j) {
      total.abs_sum[j] += part.abs_sum[j];
      total.lo[j] = std::min(total.lo[j], part.lo[j]);
      total.hi[j] = std::max(total.hi[j], part.hi[j]);
      total.zeros[j] += part.zeros[j];
    }
    for (int k = 0; k < kSubHists; ++k)
      for (int b = 0; b < kBins; ++b) global_hist[b] += part.hist[k * kBins + b];
  }
  double *s = sum.data_ptr<double>(), *q = m2.data_ptr<double>(), *a = abssum.data_ptr<double>();
  for (int64_t j = 0; j < c; ++j) {
    s[j] = total.mean[j] * total.n;
    q[j] = std::max(total.m2[j], 0.0);
    a[j] = total.abs_sum[j];
  }
  std::memcpy(mn.data_ptr<float>(), total.lo.data(), c * sizeof(float));
  std::memcpy(mx.data_ptr<float>(), total.hi.data(), c * sizeof(float));
  std::memcpy(zeros.data_ptr<int32_t>(), total.zeros.data(), c * sizeof(int32_t));
  return {sum, m2, abssum, mn, mx, zeros};
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
  m.def("site_stats", &site_stats, "fused per-channel sum, M2, |x| sum, min, max, zero counts + |x| histogram");
  m.def("count_above", &count_above, "per-channel counts of |x| > threshold");
}
