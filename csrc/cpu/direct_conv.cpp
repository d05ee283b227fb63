// Direct convolution for layers with few output channels, and strided ones with few input
// channels (see direct_conv.h).
//
// Why: with C_out = 3 a convolution is a GEMM three rows wide, which neither oneDNN nor a
// BLAS runs well (64->3, 3x3, 256 x 256, float32, two threads of an Intel Xeon: 10 ms in
// oneDNN for 0.23 GFLOP, on cores where an MKL sgemm reaches 109 GFLOP/s each), and the
// op's own passes came on top: x * m written in full, and an epilogue. Here a run of
// pixels accumulates all of its output channels in vector registers: each load of the
// masked input feeds C_out fused multiply-adds. With C_in = 3 and stride 2 (the PConv
// UNet's 7x7 first layer) oneDNN's convolution is fast, but the epilogue over its
// 64-channel output made the fused layer 1.2x the conv; there the same registers hold 4
// output channels at a time, the band's stride phases make each tap's pixels consecutive,
// and each output row is renormalised while it is in L1.
#include "direct_conv.h"

#include "cpu_features.h"
#include "mask_ratio.h"
#include "opmath_bias.h"
#include "vector_loops.h"
#include "workspace.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <atomic>
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

// Few outputs: the last layers (C_out = 3). Few inputs: the first layers (C_in = 3 or 4),
// whose output channels are taken kBlock at a time.
constexpr int64_t kMaxDirectOutputs = 4;
constexpr int64_t kMaxDirectInputs = 4;
constexpr int64_t kBlock = 4;

// Bytes of the masked input band a task keeps in one core's L2 (2 MiB on the Xeon
// measured).
constexpr int64_t kBandBytes = 1 << 20;
constexpr int64_t kMaxBandBytes = 16 << 20;

// Tasks per thread the bands aim for, so that a first layer's few wide rows still spread
// over the threads.
constexpr int64_t kTasksPerThread = 8;

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
constexpr int64_t vectors_per_run(int64_t outputs) { return outputs <= 2 ? 6 : 4; }

template <int kOut>
constexpr int64_t kVecs = vectors_per_run(kOut);

template <typename acc_t, int kOut>
constexpr int64_t kRun = kLanes<acc_t> * kVecs<kOut>;

// kRun for kOut = outputs and an opmath type of acc_size bytes.
int64_t run_pixels(int64_t outputs, int64_t acc_size) {
  return 64 / acc_size * vectors_per_run(outputs);
}

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// Where the masked input lives while a task convolves it. The band holds rows of x * m
// (zero outside the input) for `rows` output rows; a row is split into stride_w phases,
// phase p holding the columns q = j stride_w + p at j, so that a tap's pixels of a run are
// consecutive at every stride. Band column q is input column q - pad_w.
struct BandLayout {
  int64_t cols;     // output columns computed per row: a multiple of every run used
  int64_t phase_w;  // values per phase of a band row
  int64_t row_len;  // values per band row: stride_w phases
  int64_t rows;     // output rows per band
  int64_t in_rows;  // band rows of a full band
};

int64_t band_input_rows(const ConvGeometry& g, int64_t rows) {
  return (rows - 1) * g.stride_h + (g.kernel_h - 1) * g.dil_h + 1;
}

BandLayout band_layout(const ConvGeometry& g, int64_t acc_size, int64_t max_rows) {
  BandLayout b;
  b.cols = 0;
  if (g.out_channels >= kBlock) b.cols = round_up(g.out_w, run_pixels(kBlock, acc_size));
  if (g.out_channels % kBlock != 0) {
    b.cols = std::max(b.cols, round_up(g.out_w, run_pixels(g.out_channels % kBlock, acc_size)));
  }
  b.phase_w = b.cols + (g.kernel_w - 1) * g.dil_w / g.stride_w;
  b.row_len = g.stride_w * b.phase_w;
  const int64_t row_bytes = g.in_channels * b.row_len * acc_size;
  const int64_t by_bytes =
      (kBandBytes / row_bytes - band_input_rows(g, 1)) / g.stride_h + 1;
  b.rows = std::clamp<int64_t>(std::min(by_bytes, max_rows), 1, g.out_h);
  b.in_rows = band_input_rows(g, b.rows);
  return b;
}

// raw[co * raw_w + ox] for ox < cols (a multiple of the run) and co < kOut: one output row
// of kOut channels, from the band rows it reads. Tap t (in the weight's order, c, ky, kx)
// reads run pixels from band + offsets[t]; w is [taps][kOut].
template <typename acc_t, int kOut>
PCONV_CPU_CLONES void convolve_row(const acc_t* band, const int64_t* offsets, int64_t taps,
                                   const acc_t* w, int64_t cols, int64_t raw_w, acc_t* raw) {
  using vec = vec_t<acc_t>;
  constexpr int64_t lanes = kLanes<acc_t>, vecs = kVecs<kOut>;
  for (int64_t ox0 = 0; ox0 < cols; ox0 += kRun<acc_t, kOut>) {
    vec acc[kOut][vecs];
#pragma GCC unroll 8
    for (int co = 0; co < kOut; ++co) {
#pragma GCC unroll 8
      for (int64_t v = 0; v < vecs; ++v) acc[co][v] = vec{} + acc_t(0);
    }
    const acc_t* wp = w;
    for (int64_t t = 0; t < taps; ++t, wp += kOut) {
      const acc_t* p = band + offsets[t] + ox0;
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
#pragma GCC unroll 8
    for (int co = 0; co < kOut; ++co) {
#pragma GCC unroll 8
      for (int64_t v = 0; v < vecs; ++v) {
        std::memcpy(raw + co * raw_w + ox0 + v * lanes, &acc[co][v], sizeof(vec));
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
__attribute__((target("avx512f"))) void convolve_row_avx512(const float* band,
                                                            const int64_t* offsets,
                                                            int64_t taps, const float* w,
                                                            int64_t cols, int64_t raw_w,
                                                            float* raw) {
  constexpr int64_t vecs = kVecs<kOut>;
  for (int64_t ox0 = 0; ox0 < cols; ox0 += 16 * vecs) {
    __m512 acc[kOut][vecs];
    for (int co = 0; co < kOut; ++co) {
      for (int64_t v = 0; v < vecs; ++v) acc[co][v] = _mm512_setzero_ps();
    }
    const float* wp = w;
    for (int64_t t = 0; t < taps; ++t, wp += kOut) {
      const float* p = band + offsets[t] + ox0;
      __m512 xv[vecs];
      for (int64_t v = 0; v < vecs; ++v) {
        xv[v] = _mm512_loadu_ps(p + 16 * v);
        // Keeps the vector in a register: GCC otherwise folds the load into each of the
        // kOut FMAs that use it.
        asm("" : "+v"(xv[v]));
      }
      for (int co = 0; co < kOut; ++co) {
        const __m512 wv = _mm512_set1_ps(wp[co]);
        for (int64_t v = 0; v < vecs; ++v) acc[co][v] = _mm512_fmadd_ps(xv[v], wv, acc[co][v]);
      }
    }
    for (int co = 0; co < kOut; ++co) {
      for (int64_t v = 0; v < vecs; ++v) _mm512_storeu_ps(raw + co * raw_w + ox0 + 16 * v, acc[co][v]);
    }
  }
}

#endif

// convolve_row, in its AVX-512 body where there is one.
template <typename acc_t, int kOut>
void convolve(const acc_t* band, const int64_t* offsets, int64_t taps, const acc_t* w,
              int64_t cols, int64_t raw_w, acc_t* raw) {
#if PCONV_DIRECT_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx512_enabled()) {
      convolve_row_avx512<kOut>(band, offsets, taps, w, cols, raw_w, raw);
      return;
    }
  }
#endif
  convolve_row<acc_t, kOut>(band, offsets, taps, w, cols, raw_w, raw);
}

// One output row of a block of k <= kBlock channels.
template <typename acc_t>
void convolve_block(int64_t k, const acc_t* band, const int64_t* offsets, int64_t taps,
                    const acc_t* w, int64_t out_w, int64_t raw_w, acc_t* raw) {
  const int64_t acc_size = sizeof(acc_t);
  const int64_t cols = round_up(out_w, run_pixels(k, acc_size));
  switch (k) {
    case 1: convolve<acc_t, 1>(band, offsets, taps, w, cols, raw_w, raw); break;
    case 2: convolve<acc_t, 2>(band, offsets, taps, w, cols, raw_w, raw); break;
    case 3: convolve<acc_t, 3>(band, offsets, taps, w, cols, raw_w, raw); break;
    default: convolve<acc_t, 4>(band, offsets, taps, w, cols, raw_w, raw); break;
  }
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

// band[t * row_len + ...]: the phases of `rows` band rows of channel plane x (mask plane m
// or none) from input row iy0 on; `staging` holds one unsplit row when stride_w > 1. With
// msum, the mask rows inside the input are also added to msum[t * in_w + ...] (set, for
// the first channel), in channel order as the mask pass sums them.
template <typename scalar_t, typename acc_t>
void fill_band(const scalar_t* x, const scalar_t* m, int64_t iy0, int64_t rows,
               const ConvGeometry& g, const BandLayout& b, acc_t* staging, acc_t* band,
               acc_t* msum, bool first_channel) {
  for (int64_t t = 0; t < rows; ++t) {
    acc_t* dst = band + t * b.row_len;
    const int64_t iy = iy0 + t;
    if (iy < 0 || iy >= g.in_h) {
      std::fill(dst, dst + b.row_len, acc_t(0));
      continue;
    }
    if (msum != nullptr) {
      loops::accumulate(m + iy * g.in_w, msum + t * g.in_w, g.in_w, first_channel);
    }
    acc_t* row = g.stride_w == 1 ? dst : staging;
    loops::padded_masked_row<scalar_t, acc_t>(x + iy * g.in_w,
                                              m != nullptr ? m + iy * g.in_w : nullptr, row,
                                              g.in_w, g.pad_w, b.row_len);
    if (g.stride_w == 1) continue;
    for (int64_t p = 0; p < g.stride_w; ++p) {
      acc_t* phase = dst + p * b.phase_w;
      for (int64_t j = 0; j < b.phase_w; ++j) phase[j] = row[j * g.stride_w + p];
    }
  }
}

// The whole convolution; with mr null, the plain convolution (no epilogue, no bias). With
// make_ratio, each task also forms r and u of its rows in mr (allocated, [N, 1, H', W'])
// from the channel sums of its band of a multi-channel mask.
template <typename scalar_t>
void direct_conv(const at::Tensor& input, const at::Tensor& mask, const MaskRatio* mr,
                 bool make_ratio, const at::Tensor& weight, const at::Tensor& bias,
                 at::Tensor& out, const ConvGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t acc_size = sizeof(acc_t);
  const int64_t max_rows = (g.batch * g.out_h + kTasksPerThread * at::get_num_threads() - 1) /
                           (kTasksPerThread * at::get_num_threads());
  const BandLayout bl = band_layout(g, acc_size, max_rows);
  const int64_t bands = (g.out_h + bl.rows - 1) / bl.rows;
  const int64_t in_plane = g.in_h * g.in_w, plane = g.out_h * g.out_w;

  // The weight as [block][C_in][kh][kw][k] in the opmath type, k = kBlock but in the last
  // block: a tap's k values together.
  const int64_t taps = g.in_channels * g.kernel_h * g.kernel_w;
  std::vector<acc_t> w(taps * g.out_channels);
  {
    const at::Tensor w_c = weight.contiguous();
    const scalar_t* src = w_c.const_data_ptr<scalar_t>();
    for (int64_t co = 0; co < g.out_channels; ++co) {
      const int64_t block = co / kBlock, k = std::min(kBlock, g.out_channels - block * kBlock);
      acc_t* dst = w.data() + block * kBlock * taps + co % kBlock;
      for (int64_t t = 0; t < taps; ++t) dst[t * k] = static_cast<acc_t>(src[co * taps + t]);
    }
  }
  // Where each tap's pixels start, from the band row of the output row's first tap.
  std::vector<int64_t> offsets(taps);
  for (int64_t c = 0, t = 0; c < g.in_channels; ++c) {
    for (int64_t ky = 0; ky < g.kernel_h; ++ky) {
      for (int64_t kx = 0; kx < g.kernel_w; ++kx, ++t) {
        const int64_t q = kx * g.dil_w;
        offsets[t] = (c * bl.in_rows + ky * g.dil_h) * bl.row_len +
                     (q % g.stride_w) * bl.phase_w + q / g.stride_w;
      }
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

  // Each thread takes the next task when it is done with one: a core slowed by another
  // process then takes fewer, where a fixed split would keep the whole op waiting on it.
  const int64_t tasks = g.batch * bands;
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    // The band, then one unsplit row for strided layers.
    acc_t* band_buf = cpu_thread_buffer<acc_t>(ThreadBuffer::kBand,
                                               (g.in_channels * bl.in_rows + 1) * bl.row_len);
    acc_t* staging = band_buf + g.in_channels * bl.in_rows * bl.row_len;
    acc_t* raw = cpu_thread_buffer<acc_t>(ThreadBuffer::kAccumulators, kBlock * bl.cols);
    // The band's mask channel sums, then the mask pass's row scratch.
    acc_t* msum = make_ratio ? cpu_thread_buffer<acc_t>(ThreadBuffer::kMaskSum,
                                                        (bl.in_rows + 1) * g.in_w + g.out_w)
                             : nullptr;
    acc_t* msum_scratch = make_ratio ? msum + bl.in_rows * g.in_w : nullptr;
    for (int64_t task = next_task++; task < tasks; task = next_task++) {
      const int64_t n = task / bands, oy0 = (task % bands) * bl.rows;
      const int64_t rows = std::min(bl.rows, g.out_h - oy0);
      const int64_t iy0 = oy0 * g.stride_h - g.pad_h;
      for (int64_t c = 0; c < g.in_channels; ++c) {
        fill_band<scalar_t, acc_t>(x + (n * g.in_channels + c) * in_plane,
                                   m != nullptr ? m + n * mask_sample + c * mask_channel : nullptr,
                                   iy0, band_input_rows(g, rows), g, bl, staging,
                                   band_buf + c * bl.in_rows * bl.row_len, msum, c == 0);
      }
      if (make_ratio) {
        acc_t* r_rows = mr->ratio.mutable_data_ptr<acc_t>() + n * plane + oy0 * g.out_w;
        acc_t* u_rows = mr->update.mutable_data_ptr<acc_t>() + n * plane + oy0 * g.out_w;
        mask_ratio_rows<acc_t>(msum, iy0, oy0, oy0 + rows, g, msum_scratch, r_rows, u_rows);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t* band_row = band_buf + r * g.stride_h * bl.row_len;
        const int64_t p = (oy0 + r) * g.out_w;
        for (int64_t co0 = 0; co0 < g.out_channels; co0 += kBlock) {
          const int64_t k = std::min(kBlock, g.out_channels - co0);
          convolve_block<acc_t>(k, band_row, offsets.data(), taps, w.data() + co0 * taps,
                                g.out_w, bl.cols, raw);
          for (int64_t co = 0; co < k; ++co) {
            const acc_t* r_row = ratio != nullptr ? ratio + n * ratio_sample + p : nullptr;
            const acc_t* u_row = update != nullptr ? update + n * ratio_sample + p : nullptr;
            const acc_t* b_co = b.empty() ? nullptr : b.data() + co0 + co;
            scalar_t* y_row = y + (n * g.out_channels + co0 + co) * plane + p;
            renormalise_row<scalar_t, acc_t>(raw + co * bl.cols, r_row, u_row, b_co, y_row,
                                             g.out_w);
          }
        }
      }
    }
  });
}

}  // namespace

// The smallest band (one output row) must fit kMaxBandBytes: above it would not fit the
// caches anyway, and each thread keeps its band buffer.
bool band_fits(const ConvGeometry& g, int64_t element_size) {
  const int64_t acc_size = element_size == 8 ? 8 : 4;
  const BandLayout b = band_layout(g, acc_size, 1);
  return (g.in_channels * b.in_rows + 1) * b.row_len * acc_size <= kMaxBandBytes;
}

bool direct_conv_takes_layer(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                             const at::Tensor& weight, const ConvGeometry& g) {
  if (g.groups != 1 || g.batch == 0 || g.out_h * g.out_w == 0) return false;
  const at::ScalarType type = input.scalar_type();
  // Strided first layers: oneDNN ran 3->64, 7x7, stride 2 (256 x 256, float32) as fast as
  // a GEMM, but its separate passes made the fused forward 1.2x the conv; this kernel is
  // about even with the conv (one thread: 0.96-1.00x). At stride 1 the implicit GEMM runs
  // as fast. The blocks of 4 outputs need AVX-512's 32 registers (16 accumulators of 64
  // bytes); bfloat16 and float16 run their first layers channels_last, faster still.
  const bool strided = g.stride_h > 1 || g.stride_w > 1;
  const bool few_inputs = g.in_channels <= kMaxDirectInputs && strided &&
                          (type == at::kFloat || type == at::kDouble) && avx512_enabled() &&
                          conv_output_format(input, weight) == at::MemoryFormat::Contiguous;
  if (g.out_channels > kMaxDirectOutputs && !few_inputs) return false;
  if (!input.is_contiguous()) return false;
  return !(mask.has_value() && mask->defined() && !mask->is_contiguous());
}

bool direct_conv_applies(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                         const at::Tensor& weight, const ConvGeometry& g) {
  return direct_conv_takes_layer(input, mask, weight, g) && band_fits(g, input.element_size());
}

namespace {

at::Tensor run_direct_conv(const at::Tensor& input, const at::Tensor& mask, const MaskRatio* mr,
                           bool make_ratio, const at::Tensor& weight, const at::Tensor& bias,
                           const ConvGeometry& g) {
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(),
                                  "partial_conv2d_direct", [&] {
    direct_conv<scalar_t>(input, mask, mr, make_ratio, weight, bias, out, g);
  });
  return out;
}

}  // namespace

at::Tensor direct_conv_forward(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                               const MaskRatio& mr, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const ConvGeometry& g) {
  RECORD_FUNCTION("pconv::direct_conv", c10::ArrayRef<c10::IValue>{});
  TORCH_INTERNAL_ASSERT(direct_conv_applies(input, mask, weight, g));
  const at::Tensor m = mask.has_value() && mask->defined() ? *mask : at::Tensor();
  const at::Tensor b = bias.has_value() && bias->defined() ? *bias : at::Tensor();
  return run_direct_conv(input, m, &mr, false, weight, b, g);
}

bool direct_conv_makes_mask_ratio(const c10::optional<at::Tensor>& mask, const ConvGeometry& g) {
  // One sample's r and u per task: a mask shared by the batch has one plane of them.
  return g.has_mask && g.mask_channels > 1 && (g.mask_batch == g.batch || g.batch == 1);
}

std::tuple<at::Tensor, MaskRatio> direct_conv_forward_with_mask_ratio(
    const at::Tensor& input, const at::Tensor& mask, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const ConvGeometry& g) {
  RECORD_FUNCTION("pconv::direct_conv", c10::ArrayRef<c10::IValue>{});
  TORCH_INTERNAL_ASSERT(direct_conv_applies(input, mask, weight, g) &&
                        direct_conv_makes_mask_ratio(mask, g));
  MaskRatio mr = empty_mask_ratio(g.batch, mask_ratio_dtype(input.scalar_type()), g);
  const at::Tensor b = bias.has_value() && bias->defined() ? *bias : at::Tensor();
  at::Tensor out = run_direct_conv(input, mask, &mr, true, weight, b, g);
  return {out, mr};
}

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
  return run_direct_conv(grad_raw, at::Tensor(), nullptr, false, w_t, at::Tensor(),
                         input_grad_geometry(g));
}

}  // namespace pconv
