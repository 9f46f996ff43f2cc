// The schema of the kd operators (declared once, here), the Python module stub, and the device-independent parts
// shared by the CPU and CUDA kernels: input checks and the cosine-similarity forward/backward (matrix products).
//
// Autograd and the fake (meta) kernels are registered from Python (kd/prototype.py), as in pytorch/extension-cpp.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "prototype.h"

// Build facts, exposed as kd._C.compiler / kd._C.torch_version so that kd._ops can refuse an extension built against
// another torch (the C++ ABI of libtorch is not stable across minor versions, and the abi3 tag does not stop pip or an
// in-place build from pairing them) and so that logs name the toolchain when something goes wrong. setup.py defines
// KD_TORCH_MAJOR / KD_TORCH_MINOR.
#define KD_STR_(x) #x
#define KD_STR(x) KD_STR_(x)
#if defined(__clang__)
#define KD_COMPILER "clang " __clang_version__
#elif defined(__GNUC__)
#define KD_COMPILER "GCC " __VERSION__
#else
#define KD_COMPILER "unknown compiler"
#endif

extern "C" {
// `import kd._C` only has to load this shared library so that the static TORCH_LIBRARY registrations run; the
// module itself holds two strings. Built against the limited API (abi3), so no pybind11.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "kd C++/CUDA operators; load it and use torch.ops.kd.*",
      -1,    // size
      nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddStringConstant(module, "compiler", KD_COMPILER) != 0
#if defined(KD_TORCH_MAJOR) && defined(KD_TORCH_MINOR)
      || PyModule_AddStringConstant(module, "torch_version", KD_STR(KD_TORCH_MAJOR) "." KD_STR(KD_TORCH_MINOR)) != 0
#endif
  ) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

namespace kd {

namespace {

const char* kOp = "kd::prototype_project: ";

bool is_reduced_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

void check_dtype(const at::Tensor& t, const char* name, bool reduced_float_ok) {
  const auto st = t.scalar_type();
  const bool ok = st == at::kFloat || st == at::kDouble || (reduced_float_ok && is_reduced_float(st));
  TORCH_CHECK_VALUE(ok, kOp, name, " must be float32 or float64", (reduced_float_ok ? " (or float16/bfloat16)" : ""),
                    " on ", t.device().type(), ", got ", st,
                    (!reduced_float_ok && is_reduced_float(st) ? "; float16/bfloat16 are supported on CUDA only, "
                                                                 "call .float() first"
                                                               : ""));
}

}  // namespace

void check_forward_inputs(const at::Tensor& features, const at::Tensor& boxes, double stride,
                          const at::Tensor& prototypes, bool reduced_float_ok) {
  TORCH_CHECK_VALUE(features.dim() == 4, kOp, "features must be [B, C, H, W], got shape ", features.sizes());
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 5, kOp,
                    "boxes must be [N, 5] = (batch_index, x1, y1, x2, y2), got shape ", boxes.sizes());
  TORCH_CHECK_VALUE(prototypes.dim() == 2 && prototypes.size(1) == features.size(1), kOp,
                    "prototypes must be [M, C] with C = ", features.size(1), " (the features' channels), got shape ",
                    prototypes.sizes());
  TORCH_CHECK_VALUE(features.device() == boxes.device() && features.device() == prototypes.device(), kOp,
                    "features, boxes and prototypes must be on one device, got ", features.device(), ", ",
                    boxes.device(), " and ", prototypes.device());
  check_dtype(features, "features", reduced_float_ok);
  TORCH_CHECK_VALUE(prototypes.scalar_type() == features.scalar_type(), kOp,
                    "prototypes must have the features' dtype ", features.scalar_type(), ", got ",
                    prototypes.scalar_type());
  TORCH_CHECK_VALUE(boxes.scalar_type() == at::kFloat || boxes.scalar_type() == at::kDouble, kOp,
                    "boxes must be float32 or float64, got ", boxes.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(stride) && stride > 0.0, kOp, "stride must be a finite number > 0, got ", stride);
  TORCH_CHECK_VALUE(boxes.size(0) == 0 || (features.size(2) > 0 && features.size(3) > 0), kOp,
                    "features have no cells (shape ", features.sizes(), ") but ", boxes.size(0),
                    " boxes need at least one each");
}

void check_backward_inputs(const at::Tensor& grad_pooled, const at::Tensor& grad_cos, const at::Tensor& boxes,
                           double stride, const at::Tensor& prototypes, const at::Tensor& pooled, int64_t batch_size,
                           int64_t height, int64_t width, bool reduced_float_ok) {
  const char* op = "kd::_prototype_project_backward: ";
  TORCH_CHECK_VALUE(pooled.dim() == 2 && prototypes.dim() == 2 && pooled.size(1) == prototypes.size(1), op,
                    "pooled [N, C] and prototypes [M, C] disagree: ", pooled.sizes(), " vs ", prototypes.sizes());
  TORCH_CHECK_VALUE(grad_pooled.sizes() == pooled.sizes(), op, "grad_pooled must have shape ", pooled.sizes(),
                    ", got ", grad_pooled.sizes());
  TORCH_CHECK_VALUE(grad_cos.dim() == 2 && grad_cos.size(0) == pooled.size(0) &&
                        grad_cos.size(1) == prototypes.size(0),
                    op, "grad_cos must have shape [", pooled.size(0), ", ", prototypes.size(0), "], got ",
                    grad_cos.sizes());
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 5 && boxes.size(0) == pooled.size(0), op,
                    "boxes must be [", pooled.size(0), ", 5], got ", boxes.sizes());
  TORCH_CHECK_VALUE(batch_size >= 0 && height >= 0 && width >= 0, op, "negative feature size (", batch_size, ", ",
                    height, ", ", width, ")");
  const auto dev = pooled.device();
  TORCH_CHECK_VALUE(grad_pooled.device() == dev && grad_cos.device() == dev && boxes.device() == dev &&
                        prototypes.device() == dev,
                    op, "all tensors must be on ", dev);
  check_dtype(pooled, "pooled", reduced_float_ok);
  TORCH_CHECK_VALUE(boxes.scalar_type() == at::kFloat || boxes.scalar_type() == at::kDouble, op,
                    "boxes must be float32 or float64, got ", boxes.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(stride) && stride > 0.0, op, "stride must be a finite number > 0, got ", stride);
}

namespace {

at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// x / max(|x|_row, eps) and the unclamped row norms. x: [R, C] -> ([R, C], [R, 1])
std::tuple<at::Tensor, at::Tensor> normalize_rows(const at::Tensor& x) {
  auto norm = x.norm(2, {1}, /*keepdim=*/true);
  return {x / norm.clamp_min(kCosEps), norm};
}

}  // namespace

at::Tensor cosine_forward(const at::Tensor& pooled, const at::Tensor& prototypes) {
  const auto ct = compute_dtype(pooled.scalar_type());
  auto fh = std::get<0>(normalize_rows(pooled.to(ct)));
  auto ph = std::get<0>(normalize_rows(prototypes.to(ct)));
  // mm_out into a fresh contiguous tensor: the fake kernel promises contiguous strides.
  auto cos = at::empty({pooled.size(0), prototypes.size(0)}, fh.options());
  at::mm_out(cos, fh, ph.t());
  return cos.to(pooled.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> cosine_backward(const at::Tensor& grad_pooled, const at::Tensor& grad_cos,
                                                   const at::Tensor& pooled, const at::Tensor& prototypes,
                                                   bool prototypes_grad) {
  // With f_hat = f / max(|f|, eps): d cos[n, m] / d f_n = (p_hat_m - cos[n, m] * f_hat_n) / |f_n| when |f_n| >= eps,
  // and p_hat_m / eps below eps (the clamp is constant there). Summed over m with weights g[n, m]:
  //   grad_f_n = ((g @ p_hat)_n - <f_hat_n, (g @ p_hat)_n> f_hat_n [|f_n| >= eps]) / max(|f_n|, eps).
  // The prototypes' gradient is the same expression with the roles swapped.
  const auto ct = compute_dtype(pooled.scalar_type());
  auto g = grad_cos.to(ct);
  auto [fh, nf] = normalize_rows(pooled.to(ct));
  auto [ph, np] = normalize_rows(prototypes.to(ct));
  auto a = at::mm(g, ph);                                                      // [N, C]
  auto s = (fh * a).sum(1, /*keepdim=*/true).masked_fill_(nf < kCosEps, 0.0);  // [N, 1]
  auto grad_f = (a - s * fh) / nf.clamp_min(kCosEps) + grad_pooled.to(ct);
  at::Tensor grad_p;
  if (prototypes_grad) {
    auto b = at::mm(g.t(), fh);                                                // [M, C]
    auto t = (ph * b).sum(1, /*keepdim=*/true).masked_fill_(np < kCosEps, 0.0);
    grad_p = ((b - t * ph) / np.clamp_min(kCosEps)).to(prototypes.scalar_type());
  }
  return {grad_f, grad_p};
}

}  // namespace kd

TORCH_LIBRARY(kd, m) {
  m.def(
      "prototype_project(Tensor features, Tensor boxes, float stride, Tensor prototypes) "
      "-> (Tensor pooled, Tensor cos)");
  // grad_features / grad_prototypes are returned as empty [0] tensors when their flag is false.
  m.def(
      "_prototype_project_backward(Tensor grad_pooled, Tensor grad_cos, Tensor boxes, float stride, "
      "Tensor prototypes, Tensor pooled, SymInt batch_size, SymInt height, SymInt width, "
      "bool features_grad, bool prototypes_grad) -> (Tensor grad_features, Tensor grad_prototypes)");
}
