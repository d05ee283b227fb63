// The inner loops of the CPU passes: contiguous runs the compiler vectorises.
//
// They are built twice, for AVX2 and for the x86-64 baseline (SSE2), and the loader picks
// the clone the CPU runs (GCC's target_clones, an ifunc): ATen's own kernels dispatch the
// same way, and without it the 16-bit conversions stay scalar. Measured, one thread: the
// bfloat16 epilogue of a 64 x 128 x 128 output takes 0.31 ms with AVX2 against 0.63 ms
// with SSE2. Only these functions get the AVX2 clone, so no code shared with the rest of
// the library is ever compiled for a CPU that may lack it.
//
// Every expression rounds as the op's definition and at::mul do: one product or sum in
// the opmath type, one rounding to scalar_t.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PCONV_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PCONV_CPU_CLONES
#endif

namespace pconv {
namespace loops {

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// out[i] = x[i] * m[i].
template <typename scalar_t>
PCONV_CPU_CLONES void multiply(const scalar_t* x, const scalar_t* m, scalar_t* out,
                               int64_t len) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t i = 0; i < len; ++i) {
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * static_cast<acc_t>(m[i]));
  }
}

// out[k * len + i] = x[k * len + i] * m[i] for k < planes: consecutive planes of one
// sample times its single-channel mask, in one call however small the planes. out may
// alias x.
template <typename scalar_t>
PCONV_CPU_CLONES void multiply_planes(const scalar_t* x, const scalar_t* m, scalar_t* out,
                                      int64_t planes, int64_t len) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t k = 0; k < planes; ++k, x += len, out += len) {
    for (int64_t i = 0; i < len; ++i) {
      out[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * static_cast<acc_t>(m[i]));
    }
  }
}

// sum[i] = x[i] when first, else sum[i] += x[i].
template <typename scalar_t, typename acc_t>
PCONV_CPU_CLONES void accumulate(const scalar_t* x, acc_t* sum, int64_t len, bool first) {
  if (first) {
    for (int64_t i = 0; i < len; ++i) sum[i] = static_cast<acc_t>(x[i]);
  } else {
    for (int64_t i = 0; i < len; ++i) sum[i] += static_cast<acc_t>(x[i]);
  }
}

// out[i] = x[i] * m[i] and sum[i] += m[i] over `channels` runs of len values, `stride`
// apart (the same pixels of consecutive NCHW planes), summed in channel order; with
// `first`, the first run starts the sums (sum[i] = m[i]). x * m and the channel sum of a
// multi-channel mask from one read of it, in one call for all the runs, so planes of a
// few pixels do not pay a call per channel.
template <typename scalar_t, typename acc_t>
PCONV_CPU_CLONES void multiply_accumulate(const scalar_t* x, const scalar_t* m, scalar_t* out,
                                          acc_t* sum, int64_t channels, int64_t stride,
                                          int64_t len, bool first) {
  using op_t = acc_type<scalar_t>;
  for (int64_t c = 0; c < channels; ++c, x += stride, m += stride, out += stride) {
    if (first && c == 0) {
      for (int64_t i = 0; i < len; ++i) {
        const op_t mi = static_cast<op_t>(m[i]);
        out[i] = static_cast<scalar_t>(static_cast<op_t>(x[i]) * mi);
        sum[i] = static_cast<acc_t>(mi);
      }
    } else {
      for (int64_t i = 0; i < len; ++i) {
        const op_t mi = static_cast<op_t>(m[i]);
        out[i] = static_cast<scalar_t>(static_cast<op_t>(x[i]) * mi);
        sum[i] += static_cast<acc_t>(mi);
      }
    }
  }
}

// Epilogue of `planes` consecutive NCHW planes of one sample (they share r and u; plane
// k has bias b[k]): d[p] = (s[p] * r[p] + b) * u[p] with a bias (b not null), s[p] * r[p]
// without. d may alias s. One call covers many planes, so 4x4 layers do not pay a call
// per channel.
template <typename scalar_t>
PCONV_CPU_CLONES void renormalise_planes(const scalar_t* s, const acc_type<scalar_t>* r,
                                         const acc_type<scalar_t>* u,
                                         const acc_type<scalar_t>* b, scalar_t* d,
                                         int64_t planes, int64_t len) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t k = 0; k < planes; ++k, s += len, d += len) {
    if (b != nullptr) {
      const acc_t bk = b[k];
      for (int64_t p = 0; p < len; ++p) {
        d[p] = static_cast<scalar_t>((static_cast<acc_t>(s[p]) * r[p] + bk) * u[p]);
      }
    } else {
      for (int64_t p = 0; p < len; ++p) d[p] = static_cast<scalar_t>(static_cast<acc_t>(s[p]) * r[p]);
    }
  }
}

// Epilogue of `pixels` channels_last pixels of `channels` values each (r and u per pixel,
// b per channel). d may alias s.
template <typename scalar_t>
PCONV_CPU_CLONES void renormalise_pixels(const scalar_t* s, const acc_type<scalar_t>* r,
                                         const acc_type<scalar_t>* u,
                                         const acc_type<scalar_t>* b, bool has_bias,
                                         scalar_t* d, int64_t pixels, int64_t channels) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t p = 0; p < pixels; ++p, s += channels, d += channels) {
    const acc_t rp = r[p], up = u[p];
    if (has_bias) {
      for (int64_t c = 0; c < channels; ++c) {
        d[c] = static_cast<scalar_t>((static_cast<acc_t>(s[c]) * rp + b[c]) * up);
      }
    } else {
      for (int64_t c = 0; c < channels; ++c) d[c] = static_cast<scalar_t>(static_cast<acc_t>(s[c]) * rp);
    }
  }
}

// Gradient prologue of `planes` consecutive NCHW planes of one sample (sharing r and u):
// d[p] = g[p] * r[p] * u[p] with a bias, g[p] * r[p] without (skipped when d is null);
// db[k] += sum over p of g[p] * u[p] for plane k (skipped when db is null).
template <typename scalar_t>
PCONV_CPU_CLONES void grad_planes(const scalar_t* g, const acc_type<scalar_t>* r,
                                  const acc_type<scalar_t>* u, bool has_bias, scalar_t* d,
                                  acc_type<scalar_t>* db, int64_t planes, int64_t len) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t k = 0; k < planes; ++k, g += len) {
    if (d != nullptr) {
      if (has_bias) {
        for (int64_t p = 0; p < len; ++p) {
          d[p] = static_cast<scalar_t>(static_cast<acc_t>(g[p]) * r[p] * u[p]);
        }
      } else {
        for (int64_t p = 0; p < len; ++p) d[p] = static_cast<scalar_t>(static_cast<acc_t>(g[p]) * r[p]);
      }
      d += len;
    }
    if (db != nullptr) {
      acc_t sum = 0;
      // omp simd lets the sum be vectorised (a plain loop must keep its order).
#pragma omp simd reduction(+ : sum)
      for (int64_t p = 0; p < len; ++p) sum += static_cast<acc_t>(g[p]) * u[p];
      db[k] += sum;
    }
  }
}

// Gradient prologue of `pixels` channels_last pixels: d[c] = g[c] * scale with scale =
// r * u (bias) or r (skipped when d is null), and db[c] += g[c] * u (skipped when db is
// null).
template <typename scalar_t>
PCONV_CPU_CLONES void grad_pixels(const scalar_t* g, const acc_type<scalar_t>* r,
                                  const acc_type<scalar_t>* u, bool has_bias, scalar_t* d,
                                  acc_type<scalar_t>* db, int64_t pixels, int64_t channels) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t p = 0; p < pixels; ++p, g += channels) {
    const acc_t up = u[p], scale = has_bias ? r[p] * up : r[p];
    if (d != nullptr) {
      for (int64_t c = 0; c < channels; ++c) d[c] = static_cast<scalar_t>(static_cast<acc_t>(g[c]) * scale);
      d += channels;
    }
    if (db != nullptr) {
      for (int64_t c = 0; c < channels; ++c) db[c] += static_cast<acc_t>(g[c]) * up;
    }
  }
}

}  // namespace loops
}  // namespace pconv
