// Implicit-GEMM forward for layers with few input channels (see implicit_gemm.h).
//
// Why: with 3 or 4 input channels the GEMM of a convolution is shallow (K = C_in k^2, 27
// for a 3x3 RGB layer) and wide (C_out = 64), so the output is most of the memory traffic.
// oneDNN plus a separate epilogue writes that output, reads it back and writes it again;
// at 3->64, 3x3, 256 x 256, float32 the epilogue alone cost a quarter of the convolution.
// Here each tile of output rows is computed by one BLAS call into the output itself, and the
// epilogue renormalises the tile while it is still in the core's cache.
#include "implicit_gemm.h"

#include "opmath_bias.h"
#include "vector_loops.h"
#include "workspace.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <limits>
#include <vector>

// The Fortran BLAS of the process: ATen's CPU library exports the one it was built with
// (MKL on x86 wheels). Weak, so a build of torch without it loads and takes oneDNN instead.
#if defined(__GNUC__) && defined(__linux__)
#define PCONV_HAS_WEAK_BLAS 1
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}
#else
#define PCONV_HAS_WEAK_BLAS 0
#endif

namespace pconv {
namespace {

// First layers only (measured at 3 and 4 channels). With more input channels the
// epilogue is a small share of the layer: the UNets' middle layers run at 1.02-1.12x the
// oneDNN convolution with the separate passes.
constexpr int64_t kMaxImplicitGemmChannels = 4;

// Bytes of the window columns plus the output tile, which should stay in one core's L2
// (2 MiB on the Xeon measured; 256 KiB to 2 MiB gave the same times within 10%).
constexpr int64_t kTileBytes = 512 << 10;

// Above this a single output row's columns would not fit the caches anyway.
constexpr int64_t kMaxRowBytes = 16 << 20;

bool has_blas(at::ScalarType type) {
#if PCONV_HAS_WEAK_BLAS
  return type == at::kFloat ? sgemm_ != nullptr : dgemm_ != nullptr;
#else
  (void)type;
  return false;
#endif
}

// C[T x C_out] (column-major, leading dimension ldc) = cols[T x K] * W^T, with cols
// column-major (ld T) and W row-major [C_out, K]: in row-major terms out[c, p] =
// sum_k W[c, k] cols[k, p], one output channel every ldc values.
template <typename scalar_t>
void gemm(int t, int c_out, int k, const scalar_t* cols, const scalar_t* w, scalar_t* c, int ldc) {
#if PCONV_HAS_WEAK_BLAS
  const char no = 'N';
  const scalar_t one = 1, zero = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    sgemm_(&no, &no, &t, &c_out, &k, &one, cols, &t, w, &k, &zero, c, &ldc);
  } else {
    dgemm_(&no, &no, &t, &c_out, &k, &one, cols, &t, w, &k, &zero, c, &ldc);
  }
#else
  TORCH_INTERNAL_ASSERT(false, "implicit GEMM without a BLAS");
#endif
}

template <typename scalar_t>
void implicit_gemm(const at::Tensor& input, const at::Tensor& mask, const MaskRatio& mr,
                   const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out,
                   const ConvGeometry& g) {
  const int64_t depth = g.in_channels * g.kernel_h * g.kernel_w;  // K of the GEMM
  const int64_t plane = g.out_h * g.out_w, in_plane = g.in_h * g.in_w;
  const int64_t tile_rows = std::clamp<int64_t>(
      kTileBytes / (static_cast<int64_t>(sizeof(scalar_t)) * (depth + g.out_channels) * g.out_w),
      1, g.out_h);
  const int64_t tiles_per_plane = (g.out_h + tile_rows - 1) / tile_rows;

  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const scalar_t* m = mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr;
  const int64_t mask_sample = g.mask_batch == 1 ? 0 : g.mask_channels * in_plane;
  const int64_t mask_channel = g.mask_channels == 1 ? 0 : in_plane;
  const at::Tensor w_c = weight.contiguous();
  const scalar_t* w = w_c.const_data_ptr<scalar_t>();
  const scalar_t* ratio = mr.ratio.const_data_ptr<scalar_t>();
  const scalar_t* update = mr.update.const_data_ptr<scalar_t>();
  const int64_t ratio_sample = mr.batch == 1 ? 0 : plane;
  const std::vector<scalar_t> b = opmath_bias<scalar_t>(bias);  // float or double: its own type
  scalar_t* y = out.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, g.batch * tiles_per_plane, 1, [&](int64_t begin, int64_t end) {
    scalar_t* cols =
        cpu_thread_buffer<scalar_t>(ThreadBuffer::kBand, depth * tile_rows * g.out_w);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n = tile / tiles_per_plane;
      const int64_t oy0 = (tile % tiles_per_plane) * tile_rows;
      const int64_t rows = std::min(tile_rows, g.out_h - oy0);
      const int64_t len = rows * g.out_w, p0 = oy0 * g.out_w;
      // Window columns in the weight's order: k = (c * kh + ky) * kw + kx.
      for (int64_t c = 0; c < g.in_channels; ++c) {
        const scalar_t* xc = x + (n * g.in_channels + c) * in_plane;
        const scalar_t* mc = m != nullptr ? m + n * mask_sample + c * mask_channel : nullptr;
        for (int64_t ky = 0; ky < g.kernel_h; ++ky) {
          for (int64_t kx = 0; kx < g.kernel_w; ++kx) {
            scalar_t* dst = cols + ((c * g.kernel_h + ky) * g.kernel_w + kx) * len;
            // Stride 1: column ox of this tap reads input column ox - (pad_w - kx d_w).
            const int64_t shift = g.pad_w - kx * g.dil_w;
            for (int64_t r = 0; r < rows; ++r, dst += g.out_w) {
              const int64_t iy = oy0 + r - g.pad_h + ky * g.dil_h;
              if (iy < 0 || iy >= g.in_h) {
                std::fill(dst, dst + g.out_w, scalar_t(0));
                continue;
              }
              loops::padded_masked_row<scalar_t, scalar_t>(
                  xc + iy * g.in_w, mc != nullptr ? mc + iy * g.in_w : nullptr, dst, g.in_w,
                  shift, g.out_w);
            }
          }
        }
      }
      scalar_t* y_tile = y + n * g.out_channels * plane + p0;
      gemm<scalar_t>(static_cast<int>(len), static_cast<int>(g.out_channels),
                     static_cast<int>(depth), cols, w, y_tile, static_cast<int>(plane));
      const scalar_t* r_tile = ratio + n * ratio_sample + p0;
      const scalar_t* u_tile = update + n * ratio_sample + p0;
      for (int64_t c = 0; c < g.out_channels; ++c) {
        loops::renormalise_planes<scalar_t>(y_tile + c * plane, r_tile, u_tile,
                                            b.empty() ? nullptr : b.data() + c,
                                            y_tile + c * plane, 1, len);
      }
    }
  });
}

}  // namespace

bool implicit_gemm_applies(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                           const ConvGeometry& g) {
  const at::ScalarType type = input.scalar_type();
  if ((type != at::kFloat && type != at::kDouble) || !has_blas(type)) return false;
  if (g.groups != 1 || g.in_channels > kMaxImplicitGemmChannels || g.batch == 0) return false;
  // Strided layers stay with oneDNN: its direct convolution ran as fast as the GEMM alone
  // (3->64, 7x7, stride 2), and gathering every other pixel made this path 1.75x the conv.
  if (g.stride_h != 1 || g.stride_w != 1) return false;
  if (g.out_h * g.out_w == 0 || !input.is_contiguous()) return false;
  if (mask.has_value() && mask->defined() && !mask->is_contiguous()) return false;
  // Very wide windows or rows would make one row of columns a buffer each thread keeps.
  const int64_t row_bytes = g.in_channels * g.kernel_h * g.kernel_w * g.out_w *
                            static_cast<int64_t>(input.element_size());
  if (row_bytes > kMaxRowBytes) return false;
  // BLAS takes int dimensions; the leading dimension of the output is its plane.
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  return g.out_h * g.out_w <= kIntMax && g.out_channels <= kIntMax;
}

at::Tensor implicit_gemm_forward(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                                 const MaskRatio& mr, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, const ConvGeometry& g) {
  RECORD_FUNCTION("pconv::implicit_gemm", c10::ArrayRef<c10::IValue>{});
  TORCH_INTERNAL_ASSERT(implicit_gemm_applies(input, mask, g));
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options());
  const at::Tensor m = mask.has_value() && mask->defined() ? *mask : at::Tensor();
  const at::Tensor b = bias.has_value() && bias->defined() ? *bias : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "partial_conv2d_implicit_gemm", [&] {
    implicit_gemm<scalar_t>(input, m, mr, weight, b, out, g);
  });
  return out;
}

}  // namespace pconv
