// CPU kernels of kd::prototype_project and its backward.
//
// Design (B*C feature planes of H*W cells, N boxes):
// * Forward: per plane (parallel over the B*C planes, dynamically scheduled on at::parallel_for's threads), build
//   the plane's integral image in a thread-local double buffer that stays in L2, then each box of that image costs 4
//   lookups. The feature map is read once, whatever the boxes' sizes and overlaps. When the boxes of an image cover
//   fewer cells in total than the plane has, summing their cells directly is cheaper and is used instead.
// * Backward: the gradient of a box mean is grad/area spread uniformly over the box. Per plane, write +-grad/area at
//   the box's four corners of a 2D difference array, then one 2D prefix sum yields the whole gradient plane: O(HW)
//   per plane instead of O(sum of box areas), and every gradient cell is written exactly once (no zero fill).
// * All sums accumulate in double in a fixed order (boxes ascending within an image), so the results are
//   deterministic and independent of the thread count.
// * The cosine part is two or three matrix products (kd::cosine_forward / cosine_backward, BLAS).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../prototype.h"

namespace kd {
namespace {

struct Cells {
  int64_t r0, r1, c0, c1;  // rows [r0, r1), columns [c0, c1)
  int64_t area() const { return (r1 - r0) * (c1 - c0); }
};

// Boxes turned into cell ranges, grouped by image; box indices ascend within each group.
struct BoxTable {
  std::vector<Cells> cells;                     // [N]
  std::vector<std::vector<int64_t>> by_image;   // [B] -> box indices
  std::vector<int64_t> cells_by_image;          // [B] -> total cells covered (with multiplicity)
};

BoxTable make_box_table(const at::Tensor& boxes, double stride, int64_t batch, int64_t height, int64_t width,
                        const char* op) {
  const auto bx = boxes.to(at::kDouble).contiguous();  // float -> double is exact
  const double* p = bx.data_ptr<double>();
  const int64_t n = bx.size(0);
  BoxTable t;
  t.cells.resize(n);
  t.by_image.resize(batch);
  t.cells_by_image.assign(batch, 0);
  for (int64_t i = 0; i < n; ++i) {
    const double* r = p + 5 * i;
    for (int k = 0; k < 5; ++k) {
      TORCH_CHECK_VALUE(std::isfinite(r[k]), op, "boxes[", i, "] = (", r[0], ", ", r[1], ", ", r[2], ", ", r[3],
                        ", ", r[4], ") is not finite");
    }
    TORCH_CHECK_VALUE(r[0] >= 0.0 && r[0] < static_cast<double>(batch) && r[0] == std::floor(r[0]), op, "boxes[", i,
                      "] has batch index ", r[0], "; expected an integer in [0, ", batch, ")");
    Cells& c = t.cells[i];
    cell_range(r[1], r[3], stride, width, &c.c0, &c.c1);
    cell_range(r[2], r[4], stride, height, &c.r0, &c.r1);
    const auto b = static_cast<int64_t>(r[0]);
    t.by_image[b].push_back(i);
    t.cells_by_image[b] += c.area();
  }
  return t;
}

// out[y, x] = sum_{y' <= y, x' <= x} in[y', x'] (row strides given), accumulated in double; `col` is W doubles of
// scratch. Four rows advance together: four independent running sums hide the latency of the floating-point add,
// which a single row-by-row chain would pay on every cell.
template <typename In, typename Out>
void prefix_sum_2d(const In* __restrict__ in, int64_t in_stride, Out* __restrict__ out, int64_t out_stride,
                   int64_t height, int64_t width, double* __restrict__ col) {
  std::fill(col, col + width, 0.0);
  int64_t y = 0;
  for (; y + 4 <= height; y += 4) {
    const In* i0 = in + y * in_stride;
    const In* i1 = i0 + in_stride;
    const In* i2 = i1 + in_stride;
    const In* i3 = i2 + in_stride;
    Out* o0 = out + y * out_stride;
    Out* o1 = o0 + out_stride;
    Out* o2 = o1 + out_stride;
    Out* o3 = o2 + out_stride;
    double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
    for (int64_t x = 0; x < width; ++x) {
      a0 += static_cast<double>(i0[x]);
      a1 += static_cast<double>(i1[x]);
      a2 += static_cast<double>(i2[x]);
      a3 += static_cast<double>(i3[x]);
      double s = col[x] + a0;
      o0[x] = static_cast<Out>(s);
      s += a1;
      o1[x] = static_cast<Out>(s);
      s += a2;
      o2[x] = static_cast<Out>(s);
      s += a3;
      o3[x] = static_cast<Out>(s);
      col[x] = s;
    }
  }
  for (; y < height; ++y) {
    const In* i0 = in + y * in_stride;
    Out* o0 = out + y * out_stride;
    double a0 = 0.0;
    for (int64_t x = 0; x < width; ++x) {
      a0 += static_cast<double>(i0[x]);
      col[x] += a0;
      o0[x] = static_cast<Out>(col[x]);
    }
  }
}

// Sum of plane cells inside `c`, four partial sums per row for the same latency reason as above.
template <typename scalar_t>
double box_sum_direct(const scalar_t* plane, int64_t width, const Cells& c) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  for (int64_t y = c.r0; y < c.r1; ++y) {
    const scalar_t* row = plane + y * width;
    int64_t x = c.c0;
    for (; x + 4 <= c.c1; x += 4) {
      s0 += static_cast<double>(row[x]);
      s1 += static_cast<double>(row[x + 1]);
      s2 += static_cast<double>(row[x + 2]);
      s3 += static_cast<double>(row[x + 3]);
    }
    for (; x < c.c1; ++x) s0 += static_cast<double>(row[x]);
  }
  return (s0 + s1) + (s2 + s3);
}

// Runs body(plane, scratch) for every plane in [0, planes) on the intra-op threads, each thread with its own
// `Scratch` (built by make_scratch()). Planes are claimed in blocks of at least at::internal::GRAIN_SIZE cells from
// a shared counter (dynamic scheduling): a thread slowed down by another process on a shared machine, or a slower
// core, then does less work instead of holding up the others, and small maps run inline without a parallel region.
// Every plane writes its own outputs, so the results do not depend on which thread ran it.
template <typename MakeScratch, typename Body>
void for_each_plane(int64_t planes, int64_t plane_size, const MakeScratch& make_scratch, const Body& body) {
  const int64_t block = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, plane_size));
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (planes + block - 1) / block);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::max<int64_t>(workers, 1), 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t start = next.fetch_add(block); start < planes; start = next.fetch_add(block)) {
      const int64_t end = std::min(planes, start + block);
      for (int64_t plane = start; plane < end; ++plane) body(plane, scratch);
    }
  });
}

struct Buffers {
  std::vector<double> plane;  // forward: (H+1) x (W+1) integral image; backward: H x W difference array
  std::vector<double> col;    // W running column sums
};

template <typename scalar_t>
void pool_forward(const scalar_t* features, int64_t batch, int64_t channels, int64_t height, int64_t width,
                  const BoxTable& t, scalar_t* pooled) {
  const int64_t plane_size = height * width;
  const int64_t w1 = width + 1;
  // The integral image is allocated on first use: row 0 and column 0 are never written and stay zero.
  auto make = [&] { return Buffers{{}, std::vector<double>(width)}; };
  for_each_plane(batch * channels, plane_size, make, [&](int64_t plane, Buffers& buf) {
    const int64_t b = plane / channels;
    const int64_t ch = plane % channels;
    const auto& idx = t.by_image[b];
    if (idx.empty()) return;
    const scalar_t* x = features + plane * plane_size;
    if (t.cells_by_image[b] <= plane_size) {
      for (const int64_t i : idx) {
        const Cells& c = t.cells[i];
        pooled[i * channels + ch] = static_cast<scalar_t>(box_sum_direct(x, width, c) / c.area());
      }
      return;
    }
    if (buf.plane.empty()) buf.plane.assign((height + 1) * w1, 0.0);
    prefix_sum_2d(x, width, buf.plane.data() + w1 + 1, w1, height, width, buf.col.data());
    const double* s = buf.plane.data();
    for (const int64_t i : idx) {
      const Cells& c = t.cells[i];
      const double sum = s[c.r1 * w1 + c.c1] - s[c.r0 * w1 + c.c1] - s[c.r1 * w1 + c.c0] + s[c.r0 * w1 + c.c0];
      pooled[i * channels + ch] = static_cast<scalar_t>(sum / c.area());
    }
  });
}

// grad_features[b, c] = sum over the image's boxes of grad_pooled[i, c] / area_i on the box's cells.
template <typename scalar_t>
void pool_backward(const double* grad, int64_t batch, int64_t channels, int64_t height, int64_t width,
                   const BoxTable& t, scalar_t* grad_features) {
  const int64_t plane_size = height * width;
  // The difference array is all zero between planes: the corners a plane sets are reset after its prefix sum.
  auto make = [&] { return Buffers{std::vector<double>(plane_size, 0.0), std::vector<double>(width)}; };
  for_each_plane(batch * channels, plane_size, make, [&](int64_t plane, Buffers& buf) {
    const int64_t b = plane / channels;
    const int64_t ch = plane % channels;
    const auto& idx = t.by_image[b];
    scalar_t* out = grad_features + plane * plane_size;
    if (idx.empty()) {
      std::fill(out, out + plane_size, scalar_t(0));
      return;
    }
    double* diff = buf.plane.data();
    // Corners on row H or column W only affect cells beyond the map, so they are skipped.
    for (const int64_t i : idx) {
      const Cells& c = t.cells[i];
      const double v = grad[i * channels + ch] / c.area();
      diff[c.r0 * width + c.c0] += v;
      if (c.c1 < width) diff[c.r0 * width + c.c1] -= v;
      if (c.r1 < height) diff[c.r1 * width + c.c0] -= v;
      if (c.r1 < height && c.c1 < width) diff[c.r1 * width + c.c1] += v;
    }
    prefix_sum_2d(diff, width, out, width, height, width, buf.col.data());
    for (const int64_t i : idx) {
      const Cells& c = t.cells[i];
      diff[c.r0 * width + c.c0] = 0.0;
      if (c.c1 < width) diff[c.r0 * width + c.c1] = 0.0;
      if (c.r1 < height) diff[c.r1 * width + c.c0] = 0.0;
      if (c.r1 < height && c.c1 < width) diff[c.r1 * width + c.c1] = 0.0;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> prototype_project_cpu(const at::Tensor& features, const at::Tensor& boxes,
                                                         double stride, const at::Tensor& prototypes) {
  check_forward_inputs(features, boxes, stride, prototypes, /*reduced_float_ok=*/false);
  TORCH_INTERNAL_ASSERT(features.device().is_cpu());
  const auto x = features.contiguous();
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const auto table = make_box_table(boxes, stride, batch, height, width, "kd::prototype_project: ");
  auto pooled = at::empty({boxes.size(0), channels}, x.options());
  if (pooled.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "prototype_project_cpu", [&] {
      pool_forward<scalar_t>(x.const_data_ptr<scalar_t>(), batch, channels, height, width, table,
                             pooled.mutable_data_ptr<scalar_t>());
    });
  }
  auto cos = cosine_forward(pooled, prototypes);
  return {pooled, cos};
}

std::tuple<at::Tensor, at::Tensor> prototype_project_backward_cpu(
    const at::Tensor& grad_pooled, const at::Tensor& grad_cos, const at::Tensor& boxes, double stride,
    const at::Tensor& prototypes, const at::Tensor& pooled, int64_t batch, int64_t height, int64_t width,
    bool features_grad, bool prototypes_grad) {
  check_backward_inputs(grad_pooled, grad_cos, boxes, stride, prototypes, pooled, batch, height, width,
                        /*reduced_float_ok=*/false);
  const int64_t channels = pooled.size(1);
  auto [grad_f, grad_p] = cosine_backward(grad_pooled, grad_cos, pooled, prototypes, prototypes_grad);
  at::Tensor grad_features = at::empty({0}, pooled.options());
  if (features_grad) {
    grad_features = at::empty({batch, channels, height, width}, pooled.options());
    if (boxes.size(0) == 0) {
      grad_features.zero_();
    } else if (grad_features.numel() > 0) {
      const auto table = make_box_table(boxes, stride, batch, height, width, "kd::_prototype_project_backward: ");
      const auto g = grad_f.to(at::kDouble).contiguous();
      AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "prototype_project_backward_cpu", [&] {
        pool_backward<scalar_t>(g.const_data_ptr<double>(), batch, channels, height, width, table,
                                grad_features.mutable_data_ptr<scalar_t>());
      });
    }
  }
  if (!prototypes_grad) grad_p = at::empty({0}, prototypes.options());
  return {grad_features, grad_p};
}

}  // namespace
}  // namespace kd

TORCH_LIBRARY_IMPL(kd, CPU, m) {
  m.impl("prototype_project", &kd::prototype_project_cpu);
  m.impl("_prototype_project_backward", &kd::prototype_project_backward_cpu);
}
