// Direct convolution for layers with few output channels (see direct_conv.h).
//
// Why: with C_out = 3 a convolution is a GEMM three rows wide, which neither oneDNN nor a
// BLAS runs well (64->3, 3x3, 256 x 256, float32, two threads of an Intel Xeon: 10 ms in
// oneDNN for 0.23 GFLOP, on cores where an MKL sgemm reaches 109 GFLOP/s each), and the
// op's own passes came on top: x * m written in full, and an epilogue. Here a run of
// pixels accumulates all of its output channels in vector registers: each load of the
// masked input feeds C_out fused multiply-adds.
#include "direct_conv.h"

#include "cpu_features.h"
#include "opmath_bias.h"
#include "vector_loops.h"
#include "workspace.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PCONV_DIRECT_X86 1
#else
#define PCONV_DIRECT_X86 0
#endif

namespace pconv {
namespace {

constexpr int64_t kMaxDirectOutputs = 4;

// Bytes of the masked input band a task keeps in one core's L2 (2 MiB on the Xeon
// measured).
constexpr int64_t kBandBytes = 1 << 20;
constexpr int64_t kMaxBandBytes = 16 << 20;

// 64-byte vectors of the opmath type (GCC lowers them to what each clone's ISA has), with
// the element's alignment so that they load from any pixel.
typedef float vec_f __attribute__((vector_size(64), aligned(4)));
typedef double vec_d __attribute__((vector_size(64), aligned(8)));
template <typename acc_t>
using vec_t = std::conditional_t<std::is_same_v<acc_t, double>, vec_d, vec_f>;

template <typename acc_t>
constexpr int64_t kLanes = 64 / sizeof(acc_t);

// Vectors of pixels per run: the kOut * kVecs accumulators (at most 16) and the loads must
// fit AVX-512's 32 registers.
template <int kOut>
constexpr int64_t kVecs = kOut <= 2 ? 6 : 4;

template <typename acc_t, int kOut>
constexpr int64_t kRun = kLanes<acc_t> * kVecs<kOut>;

// The widest run: rows are padded to a multiple of it.
constexpr int64_t kRunPixelsMax = kRun<float, 1>;

// raw[(co * raw_rows + r) * raw_w + ox] for r < rows and ox < raw_w (a multiple of the
// run), from a band of masked input rows: band[(c * band_rows + t) * band_w + q] holds
// x * m at input row oy0 - pad_h + t and column q - pad_w (zero outside the input).
// w is [C_in][kh][kw][kOut].
template <typename acc_t, int kOut>
PCONV_CPU_CLONES void convolve_band(const acc_t* band, int64_t band_w, int64_t band_rows,
                                    int64_t channels, int64_t kh, int64_t kw, int64_t dh,
                                    int64_t dw, const acc_t* w, int64_t rows, int64_t raw_w,
                                    int64_t raw_rows, acc_t* raw) {
  using vec = vec_t<acc_t>;
  constexpr int64_t lanes = kLanes<acc_t>, vecs = kVecs<kOut>;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t ox0 = 0; ox0 < raw_w; ox0 += kRun<acc_t, kOut>) {
      vec acc[kOut][vecs];
#pragma GCC unroll 8
      for (int co = 0; co < kOut; ++co) {
#pragma GCC unroll 8
        for (int64_t v = 0; v < vecs; ++v) acc[co][v] = vec{} + acc_t(0);
      }
      const acc_t* wp = w;
      for (int64_t c = 0; c < channels; ++c) {
        const acc_t* base = band + (c * band_rows + r) * band_w + ox0;
        for (int64_t ky = 0; ky < kh; ++ky) {
          const acc_t* row = base + ky * dh * band_w;
          for (int64_t kx = 0; kx < kw; ++kx, wp += kOut) {
            const acc_t* p = row + kx * dw;
            vec xv[vecs];
#pragma GCC unroll 8
            for (int64_t v = 0; v < vecs; ++v) std::memcpy(&xv[v], p + v * lanes, sizeof(vec));
#pragma GCC unroll 8
            for (int co = 0; co < kOut; ++co) {
              const acc_t wv = wp[co];
#pragma GCC unroll 8
              for (int64_t v = 0; v < vecs; ++v) acc[co][v] += xv[v] * wv;
            }
          }
        }
      }
#pragma GCC unroll 8
      for (int co = 0; co < kOut; ++co) {
        acc_t* out = raw + (co * raw_rows + r) * raw_w + ox0;
#pragma GCC unroll 8
        for (int64_t v = 0; v < vecs; ++v) std::memcpy(out + v * lanes, &acc[co][v], sizeof(vec));
      }
    }
  }
}

#if PCONV_DIRECT_X86
// The float32 body with AVX-512 intrinsics: each pixel vector is loaded once and feeds
// kOut FMAs from registers. From the generic vectors (and from intrinsics alone) GCC
// emitted one load per FMA, the same unaligned vector loaded kOut times, half of those
// loads split across cache lines; they bounded the loop. 64->3 at 256 x 256, float32: the
// direct convolution took 4.0 ms with the generic body, 2.9 ms with this one.
template <int kOut>
__attribute__((target("avx512f"))) void convolve_band_avx512(
    const float* band, int64_t band_w, int64_t band_rows, int64_t channels, int64_t kh,
    int64_t kw, int64_t dh, int64_t dw, const float* w, int64_t rows, int64_t raw_w,
    int64_t raw_rows, float* raw) {
  constexpr int64_t vecs = kVecs<kOut>;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t ox0 = 0; ox0 < raw_w; ox0 += 16 * vecs) {
      __m512 acc[kOut][vecs];
      for (int co = 0; co < kOut; ++co) {
        for (int64_t v = 0; v < vecs; ++v) acc[co][v] = _mm512_setzero_ps();
      }
      const float* wp = w;
      for (int64_t c = 0; c < channels; ++c) {
        const float* base = band + (c * band_rows + r) * band_w + ox0;
        for (int64_t ky = 0; ky < kh; ++ky) {
          const float* row = base + ky * dh * band_w;
          for (int64_t kx = 0; kx < kw; ++kx, wp += kOut) {
            const float* p = row + kx * dw;
            __m512 xv[vecs];
            for (int64_t v = 0; v < vecs; ++v) {
              xv[v] = _mm512_loadu_ps(p + 16 * v);
              // Keeps the vector in a register: GCC otherwise folds the load into each of
              // the kOut FMAs that use it.
              asm("" : "+v"(xv[v]));
            }
            for (int co = 0; co < kOut; ++co) {
              const __m512 wv = _mm512_set1_ps(wp[co]);
              for (int64_t v = 0; v < vecs; ++v) {
                acc[co][v] = _mm512_fmadd_ps(xv[v], wv, acc[co][v]);
              }
            }
          }
        }
      }
      for (int co = 0; co < kOut; ++co) {
        float* out = raw + (co * raw_rows + r) * raw_w + ox0;
        for (int64_t v = 0; v < vecs; ++v) _mm512_storeu_ps(out + 16 * v, acc[co][v]);
      }
    }
  }
}

#endif

// convolve_band, in its AVX-512 body where there is one.
template <typename acc_t, int kOut>
void convolve(const acc_t* band, int64_t band_w, int64_t band_rows, int64_t channels,
              int64_t kh, int64_t kw, int64_t dh, int64_t dw, const acc_t* w, int64_t rows,
              int64_t raw_w, int64_t raw_rows, acc_t* raw) {
#if PCONV_DIRECT_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx512_enabled()) {
      convolve_band_avx512<kOut>(band, band_w, band_rows, channels, kh, kw, dh, dw, w, rows,
                                 raw_w, raw_rows, raw);
      return;
    }
  }
#endif
  convolve_band<acc_t, kOut>(band, band_w, band_rows, channels, kh, kw, dh, dw, w, rows, raw_w,
                             raw_rows, raw);
}

// y = (raw * r + b) * u with a bias, raw * r without, raw without r; rounded once to
// scalar_t.
template <typename scalar_t, typename acc_t>
PCONV_CPU_CLONES void renormalise_row(const acc_t* raw, const acc_t* r, const acc_t* u,
                                      const acc_t* b, scalar_t* y, int64_t len) {
  if (r == nullptr) {
    for (int64_t i = 0; i < len; ++i) y[i] = static_cast<scalar_t>(raw[i]);
  } else if (b != nullptr) {
    const acc_t bias = *b;
    for (int64_t i = 0; i < len; ++i) y[i] = static_cast<scalar_t>((raw[i] * r[i] + bias) * u[i]);
  } else {
    for (int64_t i = 0; i < len; ++i) y[i] = static_cast<scalar_t>(raw[i] * r[i]);
  }
}

// The whole convolution; with mr null, the plain convolution (no epilogue, no bias).
template <typename scalar_t, int kOut>
void direct_conv(const at::Tensor& input, const at::Tensor& mask, const MaskRatio* mr,
                 const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out,
                 const ConvGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t run = kRun<acc_t, kOut>;
  const int64_t raw_w = (g.out_w + run - 1) / run * run;
  const int64_t band_w = raw_w + (g.kernel_w - 1) * g.dil_w;
  const int64_t halo = (g.kernel_h - 1) * g.dil_h;
  const int64_t row_bytes = g.in_channels * band_w * static_cast<int64_t>(sizeof(acc_t));
  const int64_t band = std::clamp<int64_t>(kBandBytes / row_bytes - halo, 1, g.out_h);
  const int64_t band_rows = band + halo;
  const int64_t bands = (g.out_h + band - 1) / band;
  const int64_t in_plane = g.in_h * g.in_w, plane = g.out_h * g.out_w;

  // The weight as [C_in][kh][kw][kOut] in the opmath type: a tap's C_out values together.
  const int64_t taps = g.in_channels * g.kernel_h * g.kernel_w;
  std::vector<acc_t> w(taps * kOut);
  {
    const at::Tensor w_c = weight.contiguous();
    const scalar_t* src = w_c.const_data_ptr<scalar_t>();
    for (int64_t co = 0; co < kOut; ++co) {
      for (int64_t t = 0; t < taps; ++t) w[t * kOut + co] = static_cast<acc_t>(src[co * taps + t]);
    }
  }
  const std::vector<acc_t> b = opmath_bias<scalar_t>(bias);

  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const scalar_t* m = mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr;
  const int64_t mask_sample = g.mask_batch == 1 ? 0 : g.mask_channels * in_plane;
  const int64_t mask_channel = g.mask_channels == 1 ? 0 : in_plane;
  const acc_t* ratio = mr != nullptr ? mr->ratio.const_data_ptr<acc_t>() : nullptr;
  const acc_t* update = mr != nullptr ? mr->update.const_data_ptr<acc_t>() : nullptr;
  const int64_t ratio_sample = mr != nullptr && mr->batch != 1 ? plane : 0;
  scalar_t* y = out.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, g.batch * bands, 1, [&](int64_t begin, int64_t end) {
    acc_t* band_buf =
        cpu_thread_buffer<acc_t>(ThreadBuffer::kBand, g.in_channels * band_rows * band_w);
    acc_t* raw = cpu_thread_buffer<acc_t>(ThreadBuffer::kAccumulators, kOut * band * raw_w);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / bands, oy0 = (task % bands) * band;
      const int64_t rows = std::min(band, g.out_h - oy0);
      for (int64_t c = 0; c < g.in_channels; ++c) {
        const scalar_t* xc = x + (n * g.in_channels + c) * in_plane;
        const scalar_t* mc = m != nullptr ? m + n * mask_sample + c * mask_channel : nullptr;
        for (int64_t t = 0; t < rows + halo; ++t) {
          acc_t* dst = band_buf + (c * band_rows + t) * band_w;
          const int64_t iy = oy0 - g.pad_h + t;
          if (iy < 0 || iy >= g.in_h) {
            std::fill(dst, dst + band_w, acc_t(0));
          } else {
            loops::padded_masked_row<scalar_t, acc_t>(
                xc + iy * g.in_w, mc != nullptr ? mc + iy * g.in_w : nullptr, dst, g.in_w,
                g.pad_w, band_w);
          }
        }
      }
      convolve<acc_t, kOut>(band_buf, band_w, band_rows, g.in_channels, g.kernel_h, g.kernel_w,
                            g.dil_h, g.dil_w, w.data(), rows, raw_w, band, raw);
      for (int64_t co = 0; co < kOut; ++co) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t p = (oy0 + r) * g.out_w;
          renormalise_row<scalar_t, acc_t>(raw + (co * band + r) * raw_w,
                                           ratio != nullptr ? ratio + n * ratio_sample + p
                                                            : nullptr,
                                           update != nullptr ? update + n * ratio_sample + p
                                                             : nullptr,
                                           b.empty() ? nullptr : b.data() + co,
                                           y + (n * g.out_channels + co) * plane + p, g.out_w);
        }
      }
    }
  });
}

}  // namespace

// Bytes of the smallest band (one output row and its halo): above kMaxBandBytes it would
// not fit the caches anyway, and each thread keeps its band buffer.
bool band_fits(const ConvGeometry& g, int64_t element_size) {
  const int64_t acc_size = element_size == 8 ? 8 : 4;
  const int64_t band_w = g.out_w + kRunPixelsMax + (g.kernel_w - 1) * g.dil_w;
  const int64_t rows = 1 + (g.kernel_h - 1) * g.dil_h;
  return g.in_channels * band_w * rows * acc_size <= kMaxBandBytes;
}

bool direct_conv_applies(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                         const ConvGeometry& g) {
  if (g.groups != 1 || g.out_channels > kMaxDirectOutputs || g.batch == 0) return false;
  if (g.stride_h != 1 || g.stride_w != 1 || !band_fits(g, input.element_size())) return false;
  if (g.out_h * g.out_w == 0 || !input.is_contiguous()) return false;
  return !(mask.has_value() && mask->defined() && !mask->is_contiguous());
}

namespace {

at::Tensor run_direct_conv(const at::Tensor& input, const at::Tensor& mask, const MaskRatio* mr,
                           const at::Tensor& weight, const at::Tensor& bias,
                           const ConvGeometry& g) {
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(),
                                  "partial_conv2d_direct", [&] {
    switch (g.out_channels) {
      case 1: direct_conv<scalar_t, 1>(input, mask, mr, weight, bias, out, g); break;
      case 2: direct_conv<scalar_t, 2>(input, mask, mr, weight, bias, out, g); break;
      case 3: direct_conv<scalar_t, 3>(input, mask, mr, weight, bias, out, g); break;
      default: direct_conv<scalar_t, 4>(input, mask, mr, weight, bias, out, g); break;
    }
  });
  return out;
}

}  // namespace

at::Tensor direct_conv_forward(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                               const MaskRatio& mr, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const ConvGeometry& g) {
  RECORD_FUNCTION("pconv::direct_conv", c10::ArrayRef<c10::IValue>{});
  TORCH_INTERNAL_ASSERT(direct_conv_applies(input, mask, g));
  const at::Tensor m = mask.has_value() && mask->defined() ? *mask : at::Tensor();
  const at::Tensor b = bias.has_value() && bias->defined() ? *bias : at::Tensor();
  return run_direct_conv(input, m, &mr, weight, b, g);
}

namespace {

// dx[c] = sum over o, ky, kx of W[o, c, ky, kx] g[o, y + p - d ky, x + p - d kx]: the
// stride-1 convolution of g with the weight's channels swapped and taps reversed, under
// padding d (k - 1) - p; its output is the input's plane. Its geometry:
ConvGeometry input_grad_geometry(const ConvGeometry& g) {
  ConvGeometry t = g;
  t.in_channels = g.out_channels;
  t.out_channels = g.in_channels;
  t.in_h = g.out_h;
  t.in_w = g.out_w;
  t.out_h = g.in_h;
  t.out_w = g.in_w;
  t.pad_h = g.dil_h * (g.kernel_h - 1) - g.pad_h;
  t.pad_w = g.dil_w * (g.kernel_w - 1) - g.pad_w;
  t.has_mask = false;
  t.mask_batch = 1;
  t.mask_channels = 1;
  return t;
}

}  // namespace

bool direct_input_grad_applies(const at::Tensor& grad_raw, const ConvGeometry& g) {
  if (g.groups != 1 || g.in_channels > kMaxDirectOutputs || g.batch == 0) return false;
  if (g.stride_h != 1 || g.stride_w != 1 || g.in_h * g.in_w == 0) return false;
  // The transposed convolution's padding, d (k - 1) - p, must not be negative.
  if (g.pad_h > g.dil_h * (g.kernel_h - 1) || g.pad_w > g.dil_w * (g.kernel_w - 1)) return false;
  return grad_raw.is_contiguous() && band_fits(input_grad_geometry(g), grad_raw.element_size());
}

at::Tensor direct_input_grad(const at::Tensor& grad_raw, const at::Tensor& weight,
                             const ConvGeometry& g) {
  RECORD_FUNCTION("pconv::direct_input_grad", c10::ArrayRef<c10::IValue>{});
  TORCH_INTERNAL_ASSERT(direct_input_grad_applies(grad_raw, g));
  const at::Tensor w_t = weight.transpose(0, 1).flip({2, 3}).contiguous();
  return run_direct_conv(grad_raw, at::Tensor(), nullptr, w_t, at::Tensor(),
                         input_grad_geometry(g));
}

}  // namespace pconv
