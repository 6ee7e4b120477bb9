// Batch-1 GEMV kernels for the decode engine (float32 weights and accumulation, OpenMP via ATen).
//
// At batch 1 a linear layer is bound by reading its weights. An input-sparse GEMV saves that traffic only
// if it never touches the weight columns of dropped inputs, in place: the weights are stored transposed
// (Wt = W^T, [in, out] row-major) so that the row of each kept input channel is contiguous, and the kernel
// accumulates  y = sum_{i kept} x_i * Wt[i, :]  over the kept rows only. Threads own disjoint blocks of
// kept rows, so each streams whole rows, and their partial outputs are summed at the end.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

namespace {

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
  const int64_t threads = std::min<int64_t>(std::max(1, at::get_num_threads()), std::max<int64_t>(1, n / 16));
  if (threads == 1) {
    accumulate_rows(w, out, rows.data(), vals.data(), n, py, 0, out);
    return y;
  }
  // Threads split the kept rows (each streams whole rows, nearly sequential addresses) into private
  // accumulators, summed at the end: out floats per thread, trivial next to the rows read. Splitting the
  // outputs instead cuts every row into short strided pieces (k/v rows are only 192 floats).
  static thread_local std::vector<float> buffer;
  buffer.resize((threads - 1) * out);
  float* partial = buffer.data();  // a plain pointer: inside the lambda, worker threads would see their own buffer
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k0 = n * t / threads, k1 = n * (t + 1) / threads;
      float* dst = t == 0 ? py : partial + (t - 1) * out;
      accumulate_rows(w, out, rows.data() + k0, vals.data() + k0, k1 - k0, dst, 0, out);
    }
  });
  for (int64_t t = 1; t < threads; ++t) {
    const float* src = partial + (t - 1) * out;
    for (int64_t j = 0; j < out; ++j) py[j] += src[j];
  }
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
  // Branch-free compaction of the kept channels (a data-dependent branch mispredicts on about half of
  // them), into buffers reused across calls (this runs ~200 times per decoded token).
  static thread_local std::vector<int32_t> rows;
  static thread_local std::vector<float> vals;
  rows.resize(in);
  vals.resize(in);
  int64_t n = 0;
  for (int64_t i = 0; i < in; ++i) {
    const float score = ps ? std::fabs(px[i]) * ps[i] : std::fabs(px[i]);
    rows[n] = static_cast<int32_t>(i);
    vals[n] = px[i];
    n += score > t;
  }
  rows.resize(n);
  vals.resize(n);
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
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  // four independent vector accumulators (without -ffast-math the compiler would keep a plain sum scalar, which
  // streams at a fraction of the memory bandwidth)
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (; i + 64 <= n; i += 64) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
    s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
  }
  s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
  }
  __m256 t = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  s = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
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

// int8 GEMV with group scales and a rigorous bound on its error against the float32 product W x.
// x is quantized per group to int16 (step sx_g = max|x_g| / 32767) so that every group's dot product is an
// exact integer sum (int8 x int16 -> int32: the widening multiply-add CPUs do 32 lanes at a time), then
//   y_j = sum_g s[j, g] * sx_g * sum_{i in g} q[j, i] xq_i.
// Error: w_i x_i - s q_i sx xq_i = (w_i - s q_i) x_i + s q_i (x_i - sx xq_i), so with |w - s q| <= s/2 and
// |x - sx xq| <= sx/2,   |(W x)_j - y_j| <= e_j = sum_g s[j, g] (||x_g||_1 / 2 + 127 * g * sx_g / 2).
std::tuple<torch::Tensor, torch::Tensor> int8_gemv(const torch::Tensor& q, const torch::Tensor& s,
                                                   const torch::Tensor& x) {
  TORCH_CHECK(q.dtype() == torch::kInt8 && q.is_contiguous() && q.dim() == 2, "q must be [rows, in] int8");
  TORCH_CHECK(s.dtype() == torch::kFloat32 && s.is_contiguous() && s.size(0) == q.size(0), "scales [rows, groups]");
  const int64_t rows = q.size(0), in = q.size(1), groups = s.size(1), g = in / groups;
  TORCH_CHECK(g * groups == in && x.numel() == in, "in must be a multiple of the group count and match x");
  TORCH_CHECK(g <= 512, "groups of at most 512 weights (the int32 group sums must not overflow)");
  const float* px = x.data_ptr<float>();
  std::vector<int16_t> xq(in);
  std::vector<float> step(groups), slack(groups);
  for (int64_t k = 0; k < groups; ++k) {
    float mx = 0.f, l1 = 0.f;
    for (int64_t i = k * g; i < (k + 1) * g; ++i) {
      mx = std::max(mx, std::fabs(px[i]));
      l1 += std::fabs(px[i]);
    }
    const float sx = mx > 0.f ? mx / 32767.f : 1.f;
    for (int64_t i = k * g; i < (k + 1) * g; ++i)
      xq[i] = static_cast<int16_t>(std::max(-32767.f, std::min(32767.f, std::nearbyint(px[i] / sx))));
    step[k] = sx;
    // float32 sums carry a relative error ~g * 2^-24; the 1.001 and 1.01 factors cover it with room to spare
    slack[k] = 0.5f * l1 * 1.001f + 0.5f * 127.f * static_cast<float>(g) * sx * 1.01f;
  }
  auto y = torch::empty({rows}, torch::kFloat32);
  auto e = torch::empty({rows}, torch::kFloat32);
  const int8_t* pq = q.data_ptr<int8_t>();
  const float* ps = s.data_ptr<float>();
  const int16_t* pxq = xq.data();
  float *py = y.data_ptr<float>(), *pe = e.data_ptr<float>();
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int8_t* __restrict__ row = pq + r * in;
      const float* __restrict__ sr = ps + r * groups;
      float acc = 0.f, err = 0.f;
      for (int64_t k = 0; k < groups; ++k) {
        int32_t dot_q = 0;
        for (int64_t i = k * g; i < (k + 1) * g; ++i) dot_q += static_cast<int32_t>(row[i]) * pxq[i];
        acc += sr[k] * (step[k] * static_cast<float>(dot_q));
        err += sr[k] * slack[k];
      }
      py[r] = acc;
      pe[r] = err;
    }
  });
  return {y, e};
}

// One decode step of attention for one layer, fused: rotary embedding of q and k (rotate-half convention;
// cos/sin may be empty), k and v written into the layer's cache at `pos`, then for every query head the
// softmax(q.K^T * scaling [soft-capped]) . V over cache positions [start, pos]. Replaces ~15 small torch ops
// per layer, whose dispatch cost rivals the weight reads of a 135M-parameter model.
// q [H, D], k/v [KV, D], kc/vc [KV, T, D] contiguous; returns [H * D].
// Rotary embedding of n rows of D channels in place (HF's rotate_half convention).
void rotate_rows(float* x, int64_t n, int64_t D, const float* c, const float* s) {
  std::vector<float> tmp(D);
  const int64_t half = D / 2;
  for (int64_t r = 0; r < n; ++r) {
    float* row = x + r * D;
    for (int64_t i = 0; i < half; ++i) tmp[i] = row[i] * c[i] - row[i + half] * s[i];
    for (int64_t i = half; i < D; ++i) tmp[i] = row[i] * c[i] + row[i - half] * s[i];
    std::copy(tmp.begin(), tmp.end(), row);
  }
}

// Copies of q [H, D] and k [KV, D] (float32) turned by the rotary embedding (cos / sin empty: none).
std::pair<torch::Tensor, torch::Tensor> rotated(const torch::Tensor& q, const torch::Tensor& k,
                                                const torch::Tensor& cos, const torch::Tensor& sin) {
  auto rq = q.contiguous().clone(), rk = k.contiguous().clone();
  TORCH_CHECK(rq.dtype() == torch::kFloat32 && rk.dtype() == torch::kFloat32, "float32 queries and keys");
  if (cos.defined() && cos.numel()) {
    rotate_rows(rq.data_ptr<float>(), rq.size(0), rq.size(1), cos.data_ptr<float>(), sin.data_ptr<float>());
    rotate_rows(rk.data_ptr<float>(), rk.size(0), rk.size(1), cos.data_ptr<float>(), sin.data_ptr<float>());
  }
  return {rq, rk};
}

// One query head's softmax attention over n cached rows of keys / values; rows whose `skip` is set (a sliding
// window no longer sees them) are left out.
void attend_head(const float* qh, const float* keys, const float* vals, int64_t n, int64_t D, float sc, float cap,
                 const uint8_t* skip, float* oh) {
  std::vector<float> p(n);
  float mx = -INFINITY;
  for (int64_t t = 0; t < n; ++t) {
    if (skip && skip[t]) {
      p[t] = -INFINITY;
      continue;
    }
    float sdot = dot(qh, keys + t * D, D) * sc;
    if (cap > 0.f) sdot = cap * std::tanh(sdot / cap);
    p[t] = sdot;
    mx = std::max(mx, sdot);
  }
  float sum = 0.f;
  for (int64_t t = 0; t < n; ++t) sum += (p[t] = (skip && skip[t]) ? 0.f : std::exp(p[t] - mx));
  for (int64_t i = 0; i < D; ++i) oh[i] = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    if (p[t] == 0.f) continue;
    const float w = p[t] / sum;
    const float* vt = vals + t * D;
    for (int64_t i = 0; i < D; ++i) oh[i] += w * vt[i];
  }
}

// Heads in parallel once the cache is long; short contexts run on the calling thread.
template <typename F>
void for_heads(int64_t H, int64_t work, F&& head) {
  if (work < (1 << 16)) {
    for (int64_t h = 0; h < H; ++h) head(h);
  } else {
    at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) { for (int64_t h = h0; h < h1; ++h) head(h); });
  }
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, const torch::Tensor& v, torch::Tensor kc,
                               torch::Tensor vc, int64_t pos, int64_t start, const torch::Tensor& cos,
                               const torch::Tensor& sin, double scaling, double softcap) {
  std::tie(q, k) = rotated(q, k, cos, sin);
  auto vv = v.contiguous();
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous(), "contiguous caches");
  const int64_t H = q.size(0), D = q.size(1), KV = k.size(0), T = kc.size(1);
  TORCH_CHECK(kc.size(0) == KV && kc.size(2) == D && pos < T && start <= pos && H % KV == 0, "shapes");
  float *pq = q.data_ptr<float>(), *pk = k.data_ptr<float>();
  float *pkc = kc.data_ptr<float>(), *pvc = vc.data_ptr<float>();
  const float* pv = vv.data_ptr<float>();
  for (int64_t h = 0; h < KV; ++h) {
    std::copy(pk + h * D, pk + (h + 1) * D, pkc + (h * T + pos) * D);
    std::copy(pv + h * D, pv + (h + 1) * D, pvc + (h * T + pos) * D);
  }
  const int64_t n = pos + 1 - start, group = H / KV;
  auto out = torch::empty({H * D}, torch::kFloat32);
  float* po = out.data_ptr<float>();
  const float sc = static_cast<float>(scaling), cap = static_cast<float>(softcap);
  for_heads(H, n * H * D, [&](int64_t h) {
    const int64_t base = ((h / group) * T + start) * D;
    attend_head(pq + h * D, pkc + base, pvc + base, n, D, sc, cap, nullptr, po + h * D);
  });
  return out;
}

// One decode step on a ragged cache: KV head h holds lens[h] tokens in rows [offsets[h], offsets[h] + lens[h]) of
// kc / vc [slots, D] (at most caps[h]), their positions in slot_pos. The new token's key and value go into a row
// whose token a sliding window (window > 0) no longer sees, else after the head's last; then each query head
// attends over its KV head's rows that the window still sees. Heads keep different counts: the cache holds what
// a compressed cache keeps, nothing more.
torch::Tensor ragged_attention(torch::Tensor q, torch::Tensor k, const torch::Tensor& v, torch::Tensor kc,
                               torch::Tensor vc, torch::Tensor slot_pos, const torch::Tensor& offsets,
                               torch::Tensor lens, const torch::Tensor& caps, int64_t pos, int64_t window,
                               const torch::Tensor& cos, const torch::Tensor& sin, double scaling, double softcap) {
  std::tie(q, k) = rotated(q, k, cos, sin);
  auto vv = v.contiguous();
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous(), "contiguous caches");
  TORCH_CHECK(slot_pos.dtype() == torch::kInt64 && lens.dtype() == torch::kInt64 && offsets.dtype() == torch::kInt64 &&
              caps.dtype() == torch::kInt64, "int64 slot positions, offsets, lengths and capacities");
  const int64_t H = q.size(0), D = q.size(1), KV = k.size(0);
  TORCH_CHECK(kc.size(1) == D && H % KV == 0 && lens.numel() == KV && offsets.numel() == KV, "shapes");
  float *pq = q.data_ptr<float>(), *pk = k.data_ptr<float>();
  float *pkc = kc.data_ptr<float>(), *pvc = vc.data_ptr<float>();
  const float* pv = vv.data_ptr<float>();
  int64_t* sp = slot_pos.data_ptr<int64_t>();
  int64_t* len = lens.data_ptr<int64_t>();
  const int64_t *off = offsets.data_ptr<int64_t>(), *cap_of = caps.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t h = 0; h < KV; ++h) {
    int64_t slot = -1;
    if (window > 0) {
      for (int64_t t = 0; t < len[h]; ++t) {
        if (pos - sp[off[h] + t] >= window) {
          slot = off[h] + t;
          break;
        }
      }
    }
    if (slot < 0) {
      TORCH_CHECK(len[h] < cap_of[h], "the ragged KV cache of a head is full");
      slot = off[h] + len[h]++;
    }
    std::copy(pk + h * D, pk + (h + 1) * D, pkc + slot * D);
    std::copy(pv + h * D, pv + (h + 1) * D, pvc + slot * D);
    sp[slot] = pos;
    longest = std::max(longest, len[h]);
  }
  std::vector<uint8_t> skip;
  if (window > 0) {
    skip.resize(kc.size(0));
    for (int64_t h = 0; h < KV; ++h)
      for (int64_t t = 0; t < len[h]; ++t) skip[off[h] + t] = pos - sp[off[h] + t] >= window;
  }
  const int64_t group = H / KV;
  auto out = torch::empty({H * D}, torch::kFloat32);
  float* po = out.data_ptr<float>();
  const float sc = static_cast<float>(scaling), cap = static_cast<float>(softcap);
  for_heads(H, longest * H * D, [&](int64_t h) {
    const int64_t kv = h / group, base = off[kv];
    attend_head(pq + h * D, pkc + base * D, pvc + base * D, len[kv], D, sc, cap,
                window > 0 ? skip.data() + base : nullptr, po + h * D);
  });
  return out;
}

// RMSNorm of each row of x [..., D]: (x * rsqrt(mean(x^2) + eps)) * w, in one call instead of ~6 torch ops.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  auto xc = x.contiguous();
  TORCH_CHECK(xc.dtype() == torch::kFloat32 && w.is_contiguous() && w.dtype() == torch::kFloat32, "float32");
  const int64_t D = w.numel(), rows = xc.numel() / D;
  TORCH_CHECK(rows * D == xc.numel(), "x's last dimension must match w");
  auto y = torch::empty_like(xc);
  const float *px = xc.data_ptr<float>(), *pw = w.data_ptr<float>();
  float* py = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = px + r * D;
    const float ss = dot(xr, xr, D);
    const float scale = 1.0f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
    for (int64_t i = 0; i < D; ++i) py[r * D + i] = (xr[i] * scale) * pw[i];
  }
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_gemv", &sparse_gemv, "input-sparse GEMV on Wt [in, out]: keep |x_i|*scale_i > threshold");
  m.def("indexed_gemv", &indexed_gemv, "input-sparse GEMV on given channels");
  m.def("dense_gemv", &dense_gemv, "dense GEMV on W [out, in]");
  m.def("row_gemv", &row_gemv, "output-sparse GEMV on selected rows of W [out, in]");
  m.def("decode_attention", &decode_attention, "fused rotary + cache write + attention for one decode step");
  m.def("ragged_attention", &ragged_attention, "one decode step on a cache whose heads hold different tokens");
  m.def("rms_norm", &rms_norm, "row-wise RMSNorm with a weight vector");
  m.def("int8_gemv", &int8_gemv, "int8 GEMV with group scales and a per-row error bound");
}
