// CUDA kernels of kd::prototype_project and its backward.
//
// Design (B*C planes of H*W cells, N boxes):
// * box_cells_kernel turns boxes into int32 cell ranges with the same double arithmetic as the CPU
//   (kd::cell_range) and flags the first non-finite box / bad batch index. The forward copies the two flags to the
//   host once (one synchronisation per call) to raise a clear error; the backward trusts the forward's check and
//   never synchronises, nor does the forward during CUDA-graph capture (invalid boxes are still clamped to a valid
//   cell, so no access can go out of bounds).
// * Forward: one block per (box, 32 channels); each warp reduces one channel of the box with its 32 lanes walking
//   the box's cells row-major (coalesced along x), then a fixed-order warp shuffle. Deterministic.
// * Backward: a gather, not a scatter. One block owns a 32x8 tile of one image and writes every channel of it
//   exactly once: it first compacts (in box order, with warp ballots) the boxes of that image that touch the tile,
//   then each thread sums grad/area of the boxes containing its cell. No atomics, no zero fill, deterministic.
//   Tiles touched by more than 256 boxes take several rounds (the later rounds add to what the first wrote).
// * Accumulation in float for float16/bfloat16/float32, in double for float64 (at::acc_type).
// * The cosine part uses cuBLAS through ATen (kd::cosine_forward / cosine_backward).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>

#include "../prototype.h"
#include "cuda_helpers.h"

namespace kd {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChannelsPerBlock = 32;  // forward: 8 warps x 4 channels each
constexpr int kTileW = 32;             // backward tile: one warp per row, coalesced stores
constexpr int kTileH = kThreads / kTileW;

// cells [N, 5] int32 = (b, r0, r1, c0, c1); bad [2] = first box index with a non-finite value / a bad batch index
// (INT_MAX when none).
template <typename box_t>
__global__ void box_cells_kernel(const box_t* __restrict__ boxes, int n, double stride, int batch, int height,
                                 int width, int* __restrict__ cells, int* __restrict__ bad) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    double r[5];
    bool finite = true;
#pragma unroll
    for (int k = 0; k < 5; ++k) {
      r[k] = static_cast<double>(boxes[5 * static_cast<int64_t>(i) + k]);
      finite = finite && isfinite(r[k]);
    }
    int* out = cells + 5 * static_cast<int64_t>(i);
    const bool batch_ok = finite && r[0] >= 0.0 && r[0] < static_cast<double>(batch) && r[0] == floor(r[0]);
    if (!finite) atomicMin(&bad[0], i);
    if (finite && !batch_ok) atomicMin(&bad[1], i);
    if (!batch_ok) {  // a valid cell anyway, so that nothing downstream reads out of bounds
      out[0] = 0;
      out[1] = 0;
      out[2] = 1;
      out[3] = 0;
      out[4] = 1;
      continue;
    }
    int64_t r0, r1, c0, c1;
    cell_range(r[1], r[3], stride, width, &c0, &c1);
    cell_range(r[2], r[4], stride, height, &r0, &r1);
    out[0] = static_cast<int>(r[0]);
    out[1] = static_cast<int>(r0);
    out[2] = static_cast<int>(r1);
    out[3] = static_cast<int>(c0);
    out[4] = static_cast<int>(c1);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void pool_forward_kernel(const scalar_t* __restrict__ features, const int* __restrict__ cells,
                                    int64_t channels, int height, int width, scalar_t* __restrict__ pooled) {
  const int64_t i = blockIdx.x;
  const int* cl = cells + 5 * i;
  const int b = cl[0], r0 = cl[1], c0 = cl[3];
  const int box_w = cl[4] - c0;
  const int area = (cl[2] - r0) * box_w;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t block_end = static_cast<int64_t>(blockIdx.y + 1) * kChannelsPerBlock;
  const int64_t ch_end = block_end < channels ? block_end : channels;
  for (int64_t ch = static_cast<int64_t>(blockIdx.y) * kChannelsPerBlock + warp; ch < ch_end; ch += kWarps) {
    const scalar_t* plane = features + (static_cast<int64_t>(b) * channels + ch) * height * width;
    acc_t acc = 0;
    for (int t = lane; t < area; t += 32) {
      const int y = r0 + t / box_w, x = c0 + t % box_w;
      acc += static_cast<acc_t>(plane[static_cast<int64_t>(y) * width + x]);
    }
    acc = cuda::warp_sum(acc);
    if (lane == 0) pooled[i * channels + ch] = static_cast<scalar_t>(acc / static_cast<acc_t>(area));
  }
}

// grad_scaled [N, C] = grad_pooled / area (acc_t). Block (32, 8) over a tile of image blockIdx.z.
template <typename scalar_t, typename acc_t>
__global__ void pool_backward_kernel(const acc_t* __restrict__ grad_scaled, const int* __restrict__ cells, int n,
                                     int64_t channels, int height, int width, scalar_t* __restrict__ grad_features) {
  __shared__ int s_r0[kThreads], s_r1[kThreads], s_c0[kThreads], s_c1[kThreads], s_idx[kThreads];
  __shared__ int s_count[kWarps];
  const int tid = threadIdx.y * kTileW + threadIdx.x;
  const int lane = tid % 32, warp = tid / 32;
  const int x0 = blockIdx.x * kTileW, y0 = blockIdx.y * kTileH;
  const int x = x0 + threadIdx.x, y = y0 + threadIdx.y;
  const int b = blockIdx.z;
  const bool inside = x < width && y < height;
  for (int start = 0; start < n; start += kThreads) {
    // 1. Ordered compaction of this round's boxes that belong to image b and touch the tile.
    const int i = start + tid;
    int r0 = 0, r1 = 0, c0 = 0, c1 = 0;
    bool keep = false;
    if (i < n) {
      const int* cl = cells + 5 * static_cast<int64_t>(i);
      r0 = cl[1];
      r1 = cl[2];
      c0 = cl[3];
      c1 = cl[4];
      keep = cl[0] == b && r0 < y0 + kTileH && r1 > y0 && c0 < x0 + kTileW && c1 > x0;
    }
    const unsigned ballot = __ballot_sync(cuda::kFullMask, keep);
    if (lane == 0) s_count[warp] = __popc(ballot);
    __syncthreads();
    int offset = 0, total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      offset += w < warp ? s_count[w] : 0;
      total += s_count[w];
    }
    if (keep) {
      const int pos = offset + __popc(ballot & ((1u << lane) - 1u));
      s_r0[pos] = r0;
      s_r1[pos] = r1;
      s_c0[pos] = c0;
      s_c1[pos] = c1;
      s_idx[pos] = i;
    }
    __syncthreads();
    // 2. Every channel of this thread's cell: the first round writes (zeros included), later ones add.
    if (inside && (start == 0 || total > 0)) {
      scalar_t* out = grad_features + (static_cast<int64_t>(b) * channels * height + y) * width + x;
      const int64_t plane = static_cast<int64_t>(height) * width;
      for (int64_t ch = 0; ch < channels; ++ch) {
        acc_t acc = 0;
        for (int k = 0; k < total; ++k) {
          if (y >= s_r0[k] && y < s_r1[k] && x >= s_c0[k] && x < s_c1[k]) {
            acc += grad_scaled[static_cast<int64_t>(s_idx[k]) * channels + ch];
          }
        }
        scalar_t* o = out + ch * plane;
        *o = start == 0 ? static_cast<scalar_t>(acc) : static_cast<scalar_t>(static_cast<acc_t>(*o) + acc);
      }
    }
    __syncthreads();  // the shared list is rebuilt in the next round
  }
}

void check_sizes(int64_t n, int64_t batch, int64_t height, int64_t width, const char* op) {
  TORCH_CHECK_VALUE(n < INT_MAX && height * width < INT_MAX && batch <= 65535 &&
                        cuda::ceil_div(height, kTileH) <= 65535,
                    op, "sizes out of the CUDA kernel's range (N=", n, ", B=", batch, ", H=", height, ", W=", width,
                    "): needs N < 2^31, H*W < 2^31, B <= 65535, H <= 524280");
}

// Cell ranges of the boxes ([N, 5] int32 on the device). With `validate`, one device->host copy of two flags
// raises a clear error for non-finite boxes or bad batch indices.
at::Tensor box_cells(const at::Tensor& boxes, double stride, int64_t batch, int64_t height, int64_t width,
                     bool validate, const char* op) {
  const auto bx = boxes.contiguous();
  const int n = static_cast<int>(bx.size(0));
  auto cells = at::empty({n, 5}, bx.options().dtype(at::kInt));
  auto bad = at::full({2}, INT_MAX, bx.options().dtype(at::kInt));
  if (n == 0) return cells;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int blocks = static_cast<int>(std::min<int64_t>(cuda::ceil_div(n, kThreads), 4096));
  AT_DISPATCH_FLOATING_TYPES(bx.scalar_type(), "kd_box_cells", [&] {
    box_cells_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        bx.const_data_ptr<scalar_t>(), n, stride, static_cast<int>(batch), static_cast<int>(height),
        static_cast<int>(width), cells.mutable_data_ptr<int>(), bad.mutable_data_ptr<int>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // A device->host copy is not allowed while a CUDA graph is being captured: skip the check then (invalid boxes
  // are still clamped to a valid cell).
  if (validate && c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    const auto flags = bad.cpu();
    const int bad_finite = flags.const_data_ptr<int>()[0], bad_batch = flags.const_data_ptr<int>()[1];
    if (bad_finite != INT_MAX || bad_batch != INT_MAX) {
      const int i = std::min(bad_finite, bad_batch);
      const auto row = bx[i].to(at::kDouble).cpu();
      const double* r = row.const_data_ptr<double>();
      TORCH_CHECK_VALUE(bad_finite != i, op, "boxes[", i, "] = (", r[0], ", ", r[1], ", ", r[2], ", ", r[3], ", ",
                        r[4], ") is not finite");
      TORCH_CHECK_VALUE(false, op, "boxes[", i, "] has batch index ", r[0], "; expected an integer in [0, ", batch,
                        ")");
    }
  }
  return cells;
}

std::tuple<at::Tensor, at::Tensor> prototype_project_cuda(const at::Tensor& features, const at::Tensor& boxes,
                                                          double stride, const at::Tensor& prototypes) {
  const char* op = "kd::prototype_project: ";
  check_forward_inputs(features, boxes, stride, prototypes, /*reduced_float_ok=*/true);
  TORCH_INTERNAL_ASSERT(features.device().is_cuda());
  const c10::cuda::CUDAGuard guard(features.device());
  const auto x = features.contiguous();
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t n = boxes.size(0);
  check_sizes(n, batch, height, width, op);
  const auto cells = box_cells(boxes, stride, batch, height, width, /*validate=*/true, op);
  auto pooled = at::empty({n, channels}, x.options());
  if (pooled.numel() > 0) {
    const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(cuda::ceil_div(channels, kChannelsPerBlock)));
    TORCH_CHECK_VALUE(grid.y <= 65535, op, "too many channels for the CUDA kernel: ", channels);
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "prototype_project_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
      pool_forward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), cells.const_data_ptr<int>(), channels, static_cast<int>(height),
          static_cast<int>(width), pooled.mutable_data_ptr<scalar_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto cos = cosine_forward(pooled, prototypes);
  return {pooled, cos};
}

std::tuple<at::Tensor, at::Tensor> prototype_project_backward_cuda(
    const at::Tensor& grad_pooled, const at::Tensor& grad_cos, const at::Tensor& boxes, double stride,
    const at::Tensor& prototypes, const at::Tensor& pooled, int64_t batch, int64_t height, int64_t width,
    bool features_grad, bool prototypes_grad) {
  const char* op = "kd::_prototype_project_backward: ";
  check_backward_inputs(grad_pooled, grad_cos, boxes, stride, prototypes, pooled, batch, height, width,
                        /*reduced_float_ok=*/true);
  TORCH_INTERNAL_ASSERT(pooled.device().is_cuda());
  const c10::cuda::CUDAGuard guard(pooled.device());
  const int64_t channels = pooled.size(1), n = pooled.size(0);
  auto [grad_f, grad_p] = cosine_backward(grad_pooled, grad_cos, pooled, prototypes, prototypes_grad);
  at::Tensor grad_features = at::empty({0}, pooled.options());
  if (features_grad) {
    grad_features = at::empty({batch, channels, height, width}, pooled.options());
    if (n == 0) {
      grad_features.zero_();
    } else if (grad_features.numel() > 0) {
      check_sizes(n, batch, height, width, op);
      const auto cells = box_cells(boxes, stride, batch, height, width, /*validate=*/false, op);
      const auto c = cells.to(at::kLong);
      const auto area = (c.select(1, 2) - c.select(1, 1)) * (c.select(1, 4) - c.select(1, 3));  // [N]
      const auto grad_scaled = (grad_f / area.unsqueeze(1).to(grad_f.scalar_type())).contiguous();
      const dim3 grid(static_cast<unsigned>(cuda::ceil_div(width, kTileW)),
                      static_cast<unsigned>(cuda::ceil_div(height, kTileH)), static_cast<unsigned>(batch));
      const dim3 block(kTileW, kTileH);
      const auto stream = at::cuda::getCurrentCUDAStream();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pooled.scalar_type(), "prototype_project_bwd_cuda",
                                      [&] {
        using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
        TORCH_INTERNAL_ASSERT(grad_scaled.scalar_type() == c10::CppTypeToScalarType<acc_t>::value);
        pool_backward_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
            grad_scaled.const_data_ptr<acc_t>(), cells.const_data_ptr<int>(), static_cast<int>(n), channels,
            static_cast<int>(height), static_cast<int>(width), grad_features.mutable_data_ptr<scalar_t>());
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (!prototypes_grad) grad_p = at::empty({0}, prototypes.options());
  return {grad_features, grad_p};
}

}  // namespace
}  // namespace kd

TORCH_LIBRARY_IMPL(kd, CUDA, m) {
  m.impl("prototype_project", &kd::prototype_project_cuda);
  m.impl("_prototype_project_backward", &kd::prototype_project_backward_cuda);
}
