// Shared declarations of the prototype-projection operator (kd::prototype_project).
//
// The operator pools every instance's box region from one feature level and takes the cosine similarity of the
// pooled vector to every prototype:
//   features   [B, C, H, W]   one FPN level
//   boxes      [N, 5]         (batch_index, x1, y1, x2, y2) in image pixels
//   stride     float          image pixels per feature cell
//   prototypes [M, C]
//   -> pooled [N, C] (mean over the box's cells), cos [N, M]
//
// The cell rule (method.md 2.3, with out-of-map boxes clipped instead of mirrored by |y|) is `cell_range` below;
// the Python reference in kd/prototype.py implements exactly the same arithmetic.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#ifdef __CUDACC__
#define KD_HOST_DEVICE __host__ __device__
#else
#define KD_HOST_DEVICE
#endif

namespace kd {

// Norms below this are clamped in the cosine (as torch.nn.functional.cosine_similarity does), so an all-zero
// pooled feature or prototype gives cos = 0 instead of NaN.
constexpr double kCosEps = 1e-8;

// Cell range [lo, hi) covered by the box side [v1, v2] (pixels) on an axis of `size` >= 1 cells.
//
// lo = clamp(floor(v1 / stride), 0, size - 1) and hi = clamp(floor(v2 / stride) + 1, lo + 1, size): the method's
// inclusive crop int(v1/s) .. int(v2/s), clipped to the map and never empty. A box partly outside the map keeps its
// inside part; a box wholly outside (or inverted) collapses to the nearest edge cell. The quotient is clamped to
// [-1, size] before floor() so that huge coordinates cannot overflow the integer conversion; this changes no
// result. Division is an exact IEEE double division on every backend (CPU, CUDA, the Python versions).
KD_HOST_DEVICE inline void cell_range(double v1, double v2, double stride, int64_t size, int64_t* lo, int64_t* hi) {
  const double top = static_cast<double>(size);
  double q1 = v1 / stride;
  double q2 = v2 / stride;
  q1 = q1 < -1.0 ? -1.0 : (q1 > top ? top : q1);
  q2 = q2 < -1.0 ? -1.0 : (q2 > top ? top : q2);
  double a = floor(q1);
  double b = floor(q2) + 1.0;
  a = a < 0.0 ? 0.0 : (a > top - 1.0 ? top - 1.0 : a);
  b = b < a + 1.0 ? a + 1.0 : (b > top ? top : b);
  *lo = static_cast<int64_t>(a);
  *hi = static_cast<int64_t>(b);
}

// Checks that need no tensor data (ranks, sizes, dtypes, devices, stride). Throws c10::ValueError.
// `reduced_float_ok`: whether float16/bfloat16 features are accepted (CUDA only).
void check_forward_inputs(const at::Tensor& features, const at::Tensor& boxes, double stride,
                          const at::Tensor& prototypes, bool reduced_float_ok);
void check_backward_inputs(const at::Tensor& grad_pooled, const at::Tensor& grad_cos, const at::Tensor& boxes,
                           double stride, const at::Tensor& prototypes, const at::Tensor& pooled, int64_t batch_size,
                           int64_t height, int64_t width, bool reduced_float_ok);

// cos[n, m] = <pooled_n, proto_m> / (max(|pooled_n|, eps) * max(|proto_m|, eps)), computed in float32 for
// float16/bfloat16 inputs (float64 stays float64) with one matrix product; returned in pooled's dtype. [N, M]
at::Tensor cosine_forward(const at::Tensor& pooled, const at::Tensor& prototypes);

// Gradient of (pooled, cos) w.r.t. the pooled features [N, C] (in the compute dtype: float32 or float64; includes
// grad_pooled) and, when `prototypes_grad`, w.r.t. the prototypes [M, C] (prototypes' dtype; else undefined).
// The cosine itself is not needed: sum_m g[n,m] cos[n,m] = <f_hat_n, (g @ p_hat)_n>.
std::tuple<at::Tensor, at::Tensor> cosine_backward(const at::Tensor& grad_pooled, const at::Tensor& grad_cos,
                                                   const at::Tensor& pooled, const at::Tensor& prototypes,
                                                   bool prototypes_grad);

}  // namespace kd
