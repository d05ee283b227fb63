// Kernel templates of the passes around the convolution: the forward epilogue and the
// backward prologue (with the first stage of the bias-gradient reduction), plus the
// bias-gradient finalize kernel.
//
// Tensors are NCHW-contiguous or channels_last-contiguous; kChannelsLast picks the index
// math. VEC values are moved per 16-byte access where the innermost dimension (H' * W'
// for NCHW, C for channels_last) is a multiple of VEC and the pointers are aligned (the
// launcher checks); VEC = 1 otherwise. All arithmetic is in acc_t (float, double for
// double).
#pragma once

#include "device_utils.cuh"
#include "params.cuh"

namespace pconv {
namespace cuda {

// y = (raw * r + b) * u (bias) or raw * r (no bias), in place. Grid-stride over groups of
// VEC consecutive values, which share one (n, c) for NCHW or one pixel for channels_last.
template <typename scalar_t, typename acc_t, int VEC, bool kChannelsLast>
__global__ void epilogue_kernel(const EpilogueParams<scalar_t, acc_t> p) {
  using V = Vec<scalar_t, VEC>;
  const int64_t groups = p.numel / VEC;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += step) {
    const int64_t i0 = g * VEC;
    V v = *reinterpret_cast<const V*>(p.out + i0);
    if (kChannelsLast) {
      const int64_t pixel = i0 / p.channels;
      const int64_t c0 = i0 - pixel * p.channels;
      const int64_t n = pixel / p.plane;
      const int64_t m = n * p.mask_plane_stride + (pixel - n * p.plane);
      const acc_t r = p.ratio[m];
      if (p.bias != nullptr) {
        const acc_t u = p.update[m];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const acc_t b = static_cast<acc_t>(p.bias[c0 + k]);
          v.val[k] = static_cast<scalar_t>((static_cast<acc_t>(v.val[k]) * r + b) * u);
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          v.val[k] = static_cast<scalar_t>(static_cast<acc_t>(v.val[k]) * r);
        }
      }
    } else {
      const int64_t row = i0 / p.plane;  // n * C + c
      const int64_t p0 = i0 - row * p.plane;
      const int64_t n = row / p.channels;
      const int64_t c = row - n * p.channels;
      const int64_t m = n * p.mask_plane_stride + p0;
      if (p.bias != nullptr) {
        const acc_t b = static_cast<acc_t>(p.bias[c]);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          v.val[k] = static_cast<scalar_t>(
              (static_cast<acc_t>(v.val[k]) * p.ratio[m + k] + b) * p.update[m + k]);
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          v.val[k] = static_cast<scalar_t>(static_cast<acc_t>(v.val[k]) * p.ratio[m + k]);
        }
      }
    }
    *reinterpret_cast<V*>(p.out + i0) = v;
  }
}

// Backward prologue, NCHW. One block handles one (row = n * C + c, chunk) item at a time:
// each thread moves kUnroll groups of VEC values (g_raw), the block reduces its share of
// sum(g_y * u) and writes it to partials[c * K + n * chunks_per_row + chunk]. Block size:
// a multiple of 32; chunk_elems = blockDim.x * VEC * kUnroll.
template <typename scalar_t, typename acc_t, int VEC, int kUnroll>
__global__ void grad_prologue_nchw_kernel(const GradPrologueParams<scalar_t, acc_t> p) {
  using V = Vec<scalar_t, VEC>;
  __shared__ acc_t warp_sums[32];
  const int64_t items = p.batch * p.channels * p.chunks_per_row;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t row = item / p.chunks_per_row;
    const int64_t chunk = item - row * p.chunks_per_row;
    const int64_t n = row / p.channels;
    const int64_t c = row - n * p.channels;
    const int64_t begin = chunk * p.chunk_elems;
    const int64_t end = begin + p.chunk_elems < p.plane ? begin + p.chunk_elems : p.plane;
    const acc_t* ratio = p.ratio + n * p.mask_plane_stride;
    const acc_t* update = p.update + n * p.mask_plane_stride;
    const int64_t base = row * p.plane;
    acc_t sum = 0;
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      // plane % VEC == 0 and chunk_elems % VEC == 0: a group is all in or all out.
      const int64_t q0 = begin + (static_cast<int64_t>(k) * blockDim.x + threadIdx.x) * VEC;
      if (q0 < end) {
        const V gy = *reinterpret_cast<const V*>(p.grad_out + base + q0);
        V gr;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t g = static_cast<acc_t>(gy.val[j]);
          const acc_t u = update[q0 + j];
          const acc_t scale = p.has_bias ? ratio[q0 + j] * u : ratio[q0 + j];
          gr.val[j] = static_cast<scalar_t>(g * scale);
          sum += g * u;
        }
        if (p.grad_raw != nullptr) *reinterpret_cast<V*>(p.grad_raw + base + q0) = gr;
      }
    }
    if (p.partials != nullptr) {  // uniform over the block
      sum = block_reduce_sum(sum, warp_sums);
      if (threadIdx.x == 0) {
        p.partials[c * p.num_partials + n * p.chunks_per_row + chunk] = sum;
      }
    }
  }
}

// Backward prologue, channels_last: the [N * H' * W', C] matrix. threadIdx.x walks groups
// of VEC channels (blockIdx.y picks which blockDim.x groups), threadIdx.y and blockIdx.x
// walk pixels. Each thread keeps VEC running sums of g_y * u; the block reduces them over
// threadIdx.y in shared memory (blockDim.y a power of two) and writes
// partials[c * K + blockIdx.x], K = gridDim.x. Dynamic shared memory:
// blockDim.x * blockDim.y * VEC values of acc_t.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void grad_prologue_cl_kernel(const GradPrologueParams<scalar_t, acc_t> p) {
  using V = Vec<scalar_t, VEC>;
  acc_t* sums = dynamic_shared_memory<acc_t>();

  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  const bool active = c0 < p.channels;  // channels % VEC == 0: all VEC in or all out
  const int64_t pixels = p.batch * p.plane;
  acc_t part[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) part[j] = 0;

  if (active) {
    const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
    for (int64_t pix = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; pix < pixels;
         pix += step) {
      const int64_t n = pix / p.plane;
      const int64_t m = n * p.mask_plane_stride + (pix - n * p.plane);
      const acc_t u = p.update[m];
      const acc_t scale = p.has_bias ? p.ratio[m] * u : p.ratio[m];
      const int64_t offset = pix * p.channels + c0;
      const V gy = *reinterpret_cast<const V*>(p.grad_out + offset);
      V gr;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t g = static_cast<acc_t>(gy.val[j]);
        gr.val[j] = static_cast<scalar_t>(g * scale);
        part[j] += g * u;
      }
      if (p.grad_raw != nullptr) *reinterpret_cast<V*>(p.grad_raw + offset) = gr;
    }
  }

  if (p.partials == nullptr) return;  // uniform over the grid: no barrier is skipped unevenly
  const int slot = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int j = 0; j < VEC; ++j) sums[slot * VEC + j] = part[j];
  __syncthreads();
  for (int half = blockDim.y / 2; half > 0; half >>= 1) {
    if (threadIdx.y < half) {
      const int other = (threadIdx.y + half) * blockDim.x + threadIdx.x;
#pragma unroll
      for (int j = 0; j < VEC; ++j) sums[slot * VEC + j] += sums[other * VEC + j];
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      p.partials[(c0 + j) * p.num_partials + blockIdx.x] = sums[threadIdx.x * VEC + j];
    }
  }
}

// db[c] = sum over k of partials[c * K + k], one block per channel (grid-stride), in a fixed
// order; written in the input dtype. Block size: a multiple of 32.
template <typename scalar_t, typename acc_t>
__global__ void bias_grad_finalize_kernel(const BiasGradParams<scalar_t, acc_t> p) {
  __shared__ acc_t warp_sums[32];
  for (int64_t c = blockIdx.x; c < p.channels; c += gridDim.x) {
    const acc_t* row = p.partials + c * p.num_partials;
    acc_t sum = 0;
    for (int64_t k = threadIdx.x; k < p.num_partials; k += blockDim.x) sum += row[k];
    sum = block_reduce_sum(sum, warp_sums);
    if (threadIdx.x == 0) p.grad_bias[c] = static_cast<scalar_t>(sum);
  }
}

}  // namespace cuda
}  // namespace pconv
