// poet-mlx: its own kernels for MLX's CPU backend (Linux), as MLX primitives, built by
// poet_mlx/backends/native.py on first use. Each computes what an MLX-op version in poet_mlx computes, with
// the blocks of scores kept in the core's cache from their GEMM to their exps to the next GEMM, where MLX's
// CPU kernels make one pass through memory per elementwise op.
//
// Causal attention; the contract (shapes, layouts, what the backward recomputes) is
// `fast_layers.attend_forward` / `attend_backward`'s:
// forward(q, k, v, block) -> [out, lse]
//   q (B, KV, g, T, D) float32, pre-scaled; k, v (B, KV, T, D) float32.
//   out (B, T, KV, g, D) (token-major: the layout o_proj reads), lse (B, KV, g, T).
// backward(q, k, v, d_out, out, lse, block) -> [dq, dk, dv], shaped as q, k, v.
//
// Per (batch row, key/value head) and block of `block` query positions, the g query heads of the group
// are stacked into M = g * block rows (one GEMM shares the keys), and:
//   forward:  S = Qs K^T (M x e, e = the block's end: keys after it are never computed), the causal mask,
//             P = softmax(S) row by row, Os = P V, lse = max + log(sum);
//   backward: P = exp(Qs K^T - lse) recomputed (FlashAttention), dP = dOs V^T, dS = P (dP - rowsum(dO O)),
//             dQs = dS K, dK += dS^T Qs, dV += P^T dOs (accumulated in place: beta = 1, no zero pass).
//
// The output head's log-probs; the contract is `blocked_head.head_stats`' (a float32 head without bias):
// head(hidden, weight, targets, grad, rows, words) -> [logps] or [logps, grad]
//   hidden (M, D), weight (V, D) float32, targets (M,) int32 in [0, V).
//   logps (M,) = log softmax(hidden weight^T)[target]; grad (M, D) = its gradient w.r.t. hidden,
//   weight[target] - sum_v p_v weight[v].
// Per chunk of `rows` rows and block of `words` vocabulary rows: S = H W_blk^T (rows x words, in cache); each
// row's running maximum m, normalizer z and, with grad, G = sum_v exp(l_v - m) W_v are updated online (the
// FlashAttention rescale by exp(m_old - m_new), applied to a row only when its maximum rises), G += P W_blk.
//
// GEMMs go to `cblas_sgemm`: the process's global symbol, i.e. OpenBLAS once `poet_mlx.backends.blas`
// routed MLX's matmuls there.

#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
namespace mx = mlx::core;

extern "C" void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr int kLanes = 16;  // partial maxima/sums: plain loops over them vectorize without -ffast-math

// exp(x) for x <= 0 (a score minus its row's maximum, or its logsumexp): Cephes' expf polynomial with
// 2^n put into the exponent bits; branch-free so the loops calling it vectorize. Below -87 it returns
// exp(-87) ~ 1.6e-38 instead of underflowing: nothing a float32 softmax can tell from 0. Above 0 (a
// recomputed score a rounding above its logsumexp) it returns 1: the exponent trick would overflow at ~88.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : (x > 0.0f ? 0.0f : x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

float row_max(const float* x, int n) {
  float lanes[kLanes];
  for (int l = 0; l < kLanes; l++) lanes[l] = -INFINITY;
  int j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; l++) lanes[l] = lanes[l] > x[j + l] ? lanes[l] : x[j + l];
  float m = -INFINITY;
  for (int l = 0; l < kLanes; l++) m = m > lanes[l] ? m : lanes[l];
  for (; j < n; j++) m = m > x[j] ? m : x[j];
  return m;
}

// x[j] = exp(x[j] - shift) for j < n; returns their sum.
float exp_shifted(float* x, int n, float shift) {
  float lanes[kLanes] = {};
  int j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; l++) {
      x[j + l] = exp_nonpositive(x[j + l] - shift);
      lanes[l] += x[j + l];
    }
  float sum = 0.0f;
  for (int l = 0; l < kLanes; l++) sum += lanes[l];
  for (; j < n; j++) {
    x[j] = exp_nonpositive(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

float dot(const float* a, const float* b, int n) {
  float lanes[kLanes] = {};
  int j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; l++) lanes[l] += a[j + l] * b[j + l];
  float sum = 0.0f;
  for (int l = 0; l < kLanes; l++) sum += lanes[l];
  for (; j < n; j++) sum += a[j] * b[j];
  return sum;
}

struct Dims {
  int64_t batch, kv, g, t, d, block;
};


// Row r of the stacked block (head r / n, position t0 + r % n) is row (head, t0 + r % n) of a (g, T, D)
// array starting at `base`; `stack` copies those rows into dst (M x D), `unstack` back.
void stack(float* dst, const float* base, const Dims& s, int64_t t0, int64_t n) {
  for (int64_t h = 0; h < s.g; h++)
    std::memcpy(dst + h * n * s.d, base + (h * s.t + t0) * s.d, n * s.d * sizeof(float));
}

void unstack(float* base, const float* src, const Dims& s, int64_t t0, int64_t n) {
  for (int64_t h = 0; h < s.g; h++)
    std::memcpy(base + (h * s.t + t0) * s.d, src + h * n * s.d, n * s.d * sizeof(float));
}

// Where row (b, t, kv, h) of a token-major (B, T, KV, g, D) array (out, d_out) starts.
int64_t at_token(const Dims& s, int64_t b, int64_t t, int64_t kv, int64_t h) {
  return (((b * s.t + t) * s.kv + kv) * s.g + h) * s.d;
}

// Where (batch row, key/value head) number `head` = b * KV + kv starts in a (B, KV, g, T, D) array (q, dq), a
// (B, KV, T, D) one (k, v, dk, dv) and the (B, KV, g, T) lse.
int64_t at_queries(const Dims& s, int64_t head) { return head * s.g * s.t * s.d; }
int64_t at_keys(const Dims& s, int64_t head) { return head * s.t * s.d; }
int64_t at_lse(const Dims& s, int64_t head) { return head * s.g * s.t; }

void forward_kernel(const float* q, const float* k, const float* v, float* out, float* lse, Dims s) {
  const int64_t rows = s.g * s.block;
  std::vector<float> qs(rows * s.d), os(rows * s.d), scores(rows * s.t);
  for (int64_t head = 0; head < s.batch * s.kv; head++) {
    const int64_t b = head / s.kv, kv = head % s.kv;
    const float *qh = q + at_queries(s, head), *kh = k + at_keys(s, head), *vh = v + at_keys(s, head);
    float* lh = lse + at_lse(s, head);
    for (int64_t t0 = 0; t0 < s.t; t0 += s.block) {
      const int64_t n = std::min(s.block, s.t - t0), e = t0 + n, m = s.g * n;
      stack(qs.data(), qh, s, t0, n);
      cblas_sgemm(kRowMajor, kNoTrans, kTrans, m, e, s.d, 1.0f, qs.data(), s.d, kh, s.d, 0.0f,
                  scores.data(), e);
      for (int64_t r = 0; r < m; r++) {
        const int64_t h = r / n, t = t0 + r % n, visible = t + 1;
        float* row = scores.data() + r * e;
        const float top = row_max(row, visible);
        const float sum = exp_shifted(row, visible, top);
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < visible; j++) row[j] *= inv;
        std::fill(row + visible, row + e, 0.0f);
        lh[h * s.t + t] = top + std::log(sum);
      }
      cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, m, s.d, e, 1.0f, scores.data(), e, vh, s.d, 0.0f,
                  os.data(), s.d);
      for (int64_t r = 0; r < m; r++)
        std::memcpy(out + at_token(s, b, t0 + r % n, kv, r / n), os.data() + r * s.d, s.d * sizeof(float));
    }
  }
}

void backward_kernel(const float* q, const float* k, const float* v, const float* d_out, const float* out,
                     const float* lse, float* dq, float* dk, float* dv, Dims s) {
  const int64_t rows = s.g * s.block;
  std::vector<float> qs(rows * s.d), dos(rows * s.d), dqs(rows * s.d), delta(rows);
  std::vector<float> p(rows * s.t), ds(rows * s.t);
  std::fill(dk, dk + s.batch * s.kv * s.t * s.d, 0.0f);
  std::fill(dv, dv + s.batch * s.kv * s.t * s.d, 0.0f);
  for (int64_t head = 0; head < s.batch * s.kv; head++) {
    const int64_t b = head / s.kv, kv = head % s.kv;
    const float *qh = q + at_queries(s, head), *kh = k + at_keys(s, head), *vh = v + at_keys(s, head);
    const float* lh = lse + at_lse(s, head);
    float *dqh = dq + at_queries(s, head), *dkh = dk + at_keys(s, head), *dvh = dv + at_keys(s, head);
    for (int64_t t0 = 0; t0 < s.t; t0 += s.block) {
      const int64_t n = std::min(s.block, s.t - t0), e = t0 + n, m = s.g * n;
      stack(qs.data(), qh, s, t0, n);
      for (int64_t r = 0; r < m; r++) {
        const int64_t h = r / n, t = t0 + r % n;
        const int64_t at = at_token(s, b, t, kv, h);
        std::memcpy(dos.data() + r * s.d, d_out + at, s.d * sizeof(float));
        delta[r] = dot(d_out + at, out + at, s.d);
      }
      cblas_sgemm(kRowMajor, kNoTrans, kTrans, m, e, s.d, 1.0f, qs.data(), s.d, kh, s.d, 0.0f, p.data(), e);
      cblas_sgemm(kRowMajor, kNoTrans, kTrans, m, e, s.d, 1.0f, dos.data(), s.d, vh, s.d, 0.0f, ds.data(), e);
      for (int64_t r = 0; r < m; r++) {
        const int64_t h = r / n, t = t0 + r % n, visible = t + 1;
        float* pr = p.data() + r * e;
        float* dr = ds.data() + r * e;
        exp_shifted(pr, visible, lh[h * s.t + t]);
        const float dl = delta[r];
        for (int64_t j = 0; j < visible; j++) dr[j] = pr[j] * (dr[j] - dl);
        std::fill(pr + visible, pr + e, 0.0f);
        std::fill(dr + visible, dr + e, 0.0f);
      }
      cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, m, s.d, e, 1.0f, ds.data(), e, kh, s.d, 0.0f, dqs.data(), s.d);
      unstack(dqh, dqs.data(), s, t0, n);
      cblas_sgemm(kRowMajor, kTrans, kNoTrans, e, s.d, m, 1.0f, ds.data(), e, qs.data(), s.d, 1.0f, dkh, s.d);
      cblas_sgemm(kRowMajor, kTrans, kNoTrans, e, s.d, m, 1.0f, p.data(), e, dos.data(), s.d, 1.0f, dvh, s.d);
    }
  }
}

struct HeadDims {
  int64_t rows_total, d, vocab, rows, words;
  bool grad;
};

// Row r of y (rows x d) times factor[r], where that is not 1.
void scale_rows(float* y, int64_t d, const std::vector<float>& factor) {
  for (size_t r = 0; r < factor.size(); r++)
    if (factor[r] != 1.0f)
      for (int64_t j = 0; j < d; j++) y[r * d + j] *= factor[r];
}

void head_kernel(const float* h, const float* w, const int32_t* y, float* logps, float* grad, HeadDims s) {
  std::vector<float> scores(s.rows * s.words), top(s.rows), z(s.rows), picked(s.rows), factor(s.rows);
  for (int64_t r0 = 0; r0 < s.rows_total; r0 += s.rows) {
    const int64_t n = std::min(s.rows, s.rows_total - r0);
    factor.resize(n);
    std::fill(picked.begin(), picked.end(), NAN);  // stays NaN for a target outside [0, V)
    std::fill(top.begin(), top.end(), -INFINITY);
    std::fill(z.begin(), z.end(), 0.0f);
    float* g = s.grad ? grad + r0 * s.d : nullptr;  // (n, d): G accumulates in the output
    if (g) std::fill(g, g + n * s.d, 0.0f);
    for (int64_t v0 = 0; v0 < s.vocab; v0 += s.words) {
      const int64_t b = std::min(s.words, s.vocab - v0);
      cblas_sgemm(kRowMajor, kNoTrans, kTrans, n, b, s.d, 1.0f, h + r0 * s.d, s.d, w + v0 * s.d, s.d, 0.0f,
                  scores.data(), b);
      for (int64_t r = 0; r < n; r++) {
        float* row = scores.data() + r * b;
        const int64_t target = y[r0 + r];
        if (target >= v0 && target < v0 + b) picked[r] = row[target - v0];
        const float m = std::max(top[r], row_max(row, b));
        factor[r] = m > top[r] ? exp_nonpositive(top[r] - m) : 1.0f;  // exp(-inf) -> ~0, times z = 0
        z[r] = z[r] * factor[r] + exp_shifted(row, b, m);
        top[r] = m;
      }
      if (g) {
        scale_rows(g, s.d, factor);
        cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, n, s.d, b, 1.0f, scores.data(), b, w + v0 * s.d, s.d, 1.0f,
                    g, s.d);
      }
    }
    for (int64_t r = 0; r < n; r++) {
      logps[r0 + r] = picked[r] - (top[r] + std::log(z[r]));
      if (!g) continue;
      const int64_t target = y[r0 + r];
      if (target < 0 || target >= s.vocab) {  // no such word: a NaN gradient, as its log-prob, never a stray read
        std::fill(g + r * s.d, g + (r + 1) * s.d, NAN);
        continue;
      }
      const float* wy = w + target * s.d;
      const float inv = 1.0f / z[r];
      for (int64_t j = 0; j < s.d; j++) g[r * s.d + j] = wy[j] - g[r * s.d + j] * inv;
    }
  }
}

// A kernel's arrays (its inputs' data, then its outputs', in order) and its integer parameters.
using Pointers = std::vector<void*>;
using Params = std::vector<int64_t>;
using Kernel = void (*)(const Pointers&, const Params&);

// A kernel run on the CPU stream's thread over freshly allocated outputs; its parameters (the shapes and block
// sizes) are fixed when the op is built. No GPU version.
class CpuKernel : public mx::Primitive {
 public:
  CpuKernel(mx::Stream stream, Kernel kernel, Params params, const char* name)
      : mx::Primitive(stream), kernel_(kernel), params_(std::move(params)), name_(name) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    Pointers data;
    for (const auto& a : inputs) data.push_back(const_cast<void*>(static_cast<const void*>(a.data<char>())));
    for (auto& o : outputs) {
      o.set_data(mx::allocator::malloc(o.nbytes()));
      data.push_back(o.data<char>());
    }
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    for (auto& o : outputs) encoder.set_output_array(o);
    encoder.dispatch([data = std::move(data), params = params_, kernel = kernel_]() { kernel(data, params); });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("poet-mlx's kernels run on the CPU only");
  }
  const char* name() const override { return name_; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto* same = dynamic_cast<const CpuKernel*>(&other);
    return same != nullptr && same->kernel_ == kernel_ && same->params_ == params_;
  }

 private:
  Kernel kernel_;
  Params params_;
  const char* name_;
};

const float* input(const Pointers& p, int i) { return static_cast<const float*>(p[i]); }
float* output(const Pointers& p, int i) { return static_cast<float*>(p[i]); }

Dims dims_of(const Params& p) { return {p[0], p[1], p[2], p[3], p[4], p[5]}; }

void run_forward(const Pointers& p, const Params& params) {
  forward_kernel(input(p, 0), input(p, 1), input(p, 2), output(p, 3), output(p, 4), dims_of(params));
}

void run_backward(const Pointers& p, const Params& params) {
  backward_kernel(input(p, 0), input(p, 1), input(p, 2), input(p, 3), input(p, 4), input(p, 5), output(p, 6),
                  output(p, 7), output(p, 8), dims_of(params));
}

HeadDims head_dims_of(const Params& p) { return {p[0], p[1], p[2], p[3], p[4], p[5] != 0}; }

void run_head(const Pointers& p, const Params& params) {
  const HeadDims s = head_dims_of(params);
  const auto* targets = static_cast<const int32_t*>(p[2]);
  head_kernel(input(p, 0), input(p, 1), targets, output(p, 3), s.grad ? output(p, 4) : nullptr, s);
}

// Row-contiguous float32 copies where needed (a no-op for arrays already so).
std::vector<mx::array> prepared(const std::vector<mx::array>& arrays, const mx::Stream& stream) {
  std::vector<mx::array> out;
  for (const auto& a : arrays) {
    if (a.dtype() != mx::float32) throw std::invalid_argument("poet-mlx kernels: float32 only");
    out.push_back(mx::contiguous(a, false, stream));
  }
  return out;
}

Params params_of(const mx::array& q, int block) {
  return {q.shape(0), q.shape(1), q.shape(2), q.shape(3), q.shape(4), block};
}

void check(const mx::array& q, const mx::array& k, const mx::array& v, int block) {
  if (q.ndim() != 5 || k.ndim() != 4 || v.shape() != k.shape() || q.shape(0) != k.shape(0) ||
      q.shape(1) != k.shape(1) || q.shape(3) != k.shape(2) || q.shape(4) != k.shape(3) || block < 1)
    throw std::invalid_argument("poet-mlx attention kernel: want q (B, KV, g, T, D), k and v (B, KV, T, D)");
}

std::vector<mx::array> forward(const mx::array& q, const mx::array& k, const mx::array& v, int block) {
  check(q, k, v, block);
  auto stream = mx::to_stream({});
  auto in = prepared({q, k, v}, stream);
  const auto& qs = q.shape();
  auto primitive = std::make_shared<CpuKernel>(stream, run_forward, params_of(q, block), "PoetAttentionForward");
  return mx::array::make_arrays({{qs[0], qs[3], qs[1], qs[2], qs[4]}, {qs[0], qs[1], qs[2], qs[3]}},
                                {mx::float32, mx::float32}, primitive, in);
}

std::vector<mx::array> backward(const mx::array& q, const mx::array& k, const mx::array& v,
                                const mx::array& d_out, const mx::array& out, const mx::array& lse, int block) {
  check(q, k, v, block);
  const auto& qs = q.shape();
  if (out.shape() != mx::Shape{qs[0], qs[3], qs[1], qs[2], qs[4]} || d_out.shape() != out.shape() ||
      lse.shape() != mx::Shape{qs[0], qs[1], qs[2], qs[3]})
    throw std::invalid_argument("poet-mlx attention kernel: d_out, out (B, T, KV, g, D), lse (B, KV, g, T)");
  auto stream = mx::to_stream({});
  auto in = prepared({q, k, v, d_out, out, lse}, stream);
  auto primitive = std::make_shared<CpuKernel>(stream, run_backward, params_of(q, block), "PoetAttentionBackward");
  return mx::array::make_arrays({q.shape(), k.shape(), v.shape()}, {mx::float32, mx::float32, mx::float32},
                                primitive, in);
}

std::vector<mx::array> head(const mx::array& hidden, const mx::array& weight, const mx::array& targets, bool grad,
                            int rows, int words) {
  if (hidden.ndim() != 2 || weight.ndim() != 2 || hidden.shape(1) != weight.shape(1) || targets.ndim() != 1 ||
      targets.shape(0) != hidden.shape(0) || rows < 1 || words < 1)
    throw std::invalid_argument("poet-mlx head kernel: want hidden (M, D), weight (V, D), targets (M,)");
  auto stream = mx::to_stream({});
  auto in = prepared({hidden, weight}, stream);
  in.push_back(mx::contiguous(mx::astype(targets, mx::int32, stream), false, stream));
  const int m = hidden.shape(0), d = hidden.shape(1);  // MLX's shapes are int
  Params params{m, d, weight.shape(0), rows, words, grad ? 1 : 0};
  auto primitive = std::make_shared<CpuKernel>(stream, run_head, params, "PoetHeadLogps");
  if (!grad) return mx::array::make_arrays({{m}}, {mx::float32}, primitive, in);
  return mx::array::make_arrays({{m}, {m, d}}, {mx::float32, mx::float32}, primitive, in);
}

}  // namespace

NB_MODULE(_poet_kernels, m) {
  m.def("head", &head, nb::arg("hidden"), nb::arg("weight"), nb::arg("targets"), nb::arg("grad"), nb::arg("rows"),
        nb::arg("words"));
  m.def("forward", &forward, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("block"));
  m.def("backward", &backward, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("d_out"), nb::arg("out"),
        nb::arg("lse"), nb::arg("block"));
}
