// The inner loops of the CPU passes: contiguous runs the compiler vectorises.
//
// They are built three times, for AVX-512 (x86-64-v4), for AVX2 and for the x86-64
// baseline (SSE2), and the loader picks the clone the CPU runs (GCC's target_clones, an
// ifunc): ATen's own kernels dispatch the same way, and without it the 16-bit conversions
// stay scalar. Measured, one thread: the bfloat16 epilogue of a 64 x 128 x 128 output took
// 0.31 ms with AVX2 against 0.63 ms with SSE2; on an AMD EPYC with AVX-512, 0.135 ms with
// the x86-64-v4 clone against 0.209 ms with AVX2. Only these functions get the wider
// clones, so no code shared with the rest of the library is ever compiled for a CPU that
// may lack them.
//
// Every expression rounds as the op's definition and at::mul do: one product or sum in
// the opmath type, one rounding to scalar_t.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PCONV_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define PCONV_CPU_CLONES
#endif

namespace pconv {
namespace loops {

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

#if defined(__GNUC__)
#define PCONV_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PCONV_ALWAYS_INLINE inline
#endif

// ---- x * m for a 0/1 mask in 16-bit types, by bit operations.
//
// Inpainting masks are 0 and 1, and then x * m needs no arithmetic: x * 1 is x and x * 0
// is a zero with x's sign (NaN where x is Inf or NaN). In bfloat16 and float16 this matters:
// without native 16-bit arithmetic every product is two widenings, a float multiply and a
// rounding back, while the bit form works on 16 lanes of an AVX2 register at once.
// Measured on 192 x 128 x 128 bfloat16, one thread: a single-channel mask over all planes
// took 0.23 ms against 0.65 ms. With a multi-channel mask the pass is bound by memory
// (three streams), and the gain is smaller: 0.80 against 0.88 ms for the one-read pass,
// two threads. A run takes the bit form only when every mask value in it is exactly +0
// or 1, checked in the same pass where out does not alias x; other runs multiply as
// before. Finite results equal at::mul's bit for bit (denormals are not flushed); a NaN
// result is a quiet NaN wherever at::mul's is a NaN.

template <typename scalar_t>
struct Bits16;  // bit patterns of 1, +Inf and a quiet NaN

template <>
struct Bits16<c10::BFloat16> {
  static constexpr uint16_t kOne = 0x3F80, kInf = 0x7F80, kNaN = 0x7FC0;
};

template <>
struct Bits16<c10::Half> {
  static constexpr uint16_t kOne = 0x3C00, kInf = 0x7C00, kNaN = 0x7E00;
};

template <typename scalar_t>
constexpr bool kHasBitMask =
    std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;

// The raw bits of 16-bit values (BFloat16 and Half hold a single uint16_t).
template <typename scalar_t>
PCONV_ALWAYS_INLINE const uint16_t* bits_of(const scalar_t* p) {
  return reinterpret_cast<const uint16_t*>(p);
}

template <typename scalar_t>
PCONV_ALWAYS_INLINE uint16_t* bits_of(scalar_t* p) {
  return reinterpret_cast<uint16_t*>(p);
}

// True when every m[i] is exactly +0 or 1.
template <typename scalar_t>
PCONV_ALWAYS_INLINE bool is_zero_one(const scalar_t* m, int64_t len) {
  const uint16_t* mb = bits_of(m);
  uint16_t other = 0;
  for (int64_t i = 0; i < len; ++i) {
    other |= static_cast<uint16_t>(mb[i] != Bits16<scalar_t>::kOne) &
             static_cast<uint16_t>(mb[i] != 0);
  }
  return other == 0;
}

// The bit form of x * m for one value whose mask bits are +0 or 1.
template <typename scalar_t>
PCONV_ALWAYS_INLINE uint16_t select_bits(uint16_t x, uint16_t m) {
  using B = Bits16<scalar_t>;
  const uint16_t keep = m == B::kOne ? 0xFFFF : 0;
  // Magnitudes fit in int16, where AVX2 compares 16 lanes at once.
  const uint16_t non_finite =
      static_cast<int16_t>(x & 0x7FFF) >= static_cast<int16_t>(B::kInf) ? 0xFFFF : 0;
  const uint16_t zero = static_cast<uint16_t>((x & 0x8000 & ~non_finite) | (B::kNaN & non_finite));
  return static_cast<uint16_t>((x & keep) | (zero & ~keep));
}

// out[i] = x[i] * m[i] for m[i] in {+0, 1}. out may alias x.
template <typename scalar_t>
PCONV_ALWAYS_INLINE void select_by_mask(const scalar_t* x, const scalar_t* m, scalar_t* out,
                                        int64_t len) {
  const uint16_t* xb = bits_of(x);
  const uint16_t* mb = bits_of(m);
  uint16_t* ob = bits_of(out);
  for (int64_t i = 0; i < len; ++i) ob[i] = select_bits<scalar_t>(xb[i], mb[i]);
}

enum class SumMode { kNone, kStart, kAdd };

// The bit form of out[i] = x[i] * m[i] over a run, checking the mask in the same pass (one
// read of it); with kStart / kAdd it also sets / adds m[i] to sum[i] in the opmath type,
// exactly as the arithmetic loops do, whatever the mask values. Returns false when some
// m[i] is neither +0 nor 1: out then holds garbage and the caller multiplies instead (the
// sums stay right). out must not alias x or m.
template <typename scalar_t, SumMode kSum, typename acc_t = acc_type<scalar_t>>
PCONV_ALWAYS_INLINE bool select_if_zero_one(const scalar_t* x, const scalar_t* m,
                                            scalar_t* out, acc_t* sum, int64_t len) {
  const uint16_t* xb = bits_of(x);
  const uint16_t* mb = bits_of(m);
  uint16_t* ob = bits_of(out);
  uint16_t other = 0;
  for (int64_t i = 0; i < len; ++i) {
    const uint16_t mi = mb[i];
    other |= static_cast<uint16_t>(mi != Bits16<scalar_t>::kOne) & static_cast<uint16_t>(mi != 0);
    ob[i] = select_bits<scalar_t>(xb[i], mi);
    if constexpr (kSum == SumMode::kStart) sum[i] = static_cast<acc_t>(m[i]);
    if constexpr (kSum == SumMode::kAdd) sum[i] += static_cast<acc_t>(m[i]);
  }
  return other == 0;
}

// out[i] = x[i] * m[i] in arithmetic.
template <typename scalar_t>
PCONV_ALWAYS_INLINE void multiply_run(const scalar_t* x, const scalar_t* m, scalar_t* out,
                                      int64_t len) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t i = 0; i < len; ++i) {
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * static_cast<acc_t>(m[i]));
  }
}

// out[i] = x[i] * m[i]. out may be x (in place), but not overlap x or m otherwise.
template <typename scalar_t>
PCONV_CPU_CLONES void multiply(const scalar_t* x, const scalar_t* m, scalar_t* out,
                               int64_t len) {
  if constexpr (kHasBitMask<scalar_t>) {
    if (out == x) {  // the check must come first: a failed bit pass would have lost x
      if (is_zero_one(m, len)) {
        select_by_mask(x, m, out, len);
        return;
      }
    } else if (select_if_zero_one<scalar_t, SumMode::kNone>(
                   x, m, out, static_cast<acc_type<scalar_t>*>(nullptr), len)) {
      return;
    }
  }
  multiply_run(x, m, out, len);
}

// out[k * len + i] = x[k * len + i] * m[i] for k < planes: consecutive planes of one
// sample times its single-channel mask, in one call however small the planes. out may
// alias x.
template <typename scalar_t>
PCONV_CPU_CLONES void multiply_planes(const scalar_t* x, const scalar_t* m, scalar_t* out,
                                      int64_t planes, int64_t len) {
  if constexpr (kHasBitMask<scalar_t>) {
    if (is_zero_one(m, len)) {  // one check for all the planes
      for (int64_t k = 0; k < planes; ++k, x += len, out += len) select_by_mask(x, m, out, len);
      return;
    }
  }
  for (int64_t k = 0; k < planes; ++k, x += len, out += len) multiply_run(x, m, out, len);
}

// One zero-padded row of x * m: dst[q] = x[q - shift] * m[q - shift] for
// 0 <= q - shift < in_w and 0 for the other q < len (shift may be negative). The product
// rounds to scalar_t as at::mul rounds it, then widens to dst_t; m null copies x.
template <typename scalar_t, typename dst_t>
PCONV_CPU_CLONES void padded_masked_row(const scalar_t* x, const scalar_t* m, dst_t* dst,
                                        int64_t in_w, int64_t shift, int64_t len) {
  using acc_t = acc_type<scalar_t>;
  const int64_t lo = std::min(len, std::max<int64_t>(shift, 0));
  const int64_t hi = std::max(lo, std::min(len, in_w + shift));
  for (int64_t q = 0; q < lo; ++q) dst[q] = dst_t(0);
  const scalar_t* xs = x + (lo - shift);
  dst_t* d = dst + lo;
  const int64_t n = hi - lo;
  if (m != nullptr) {
    const scalar_t* ms = m + (lo - shift);
    for (int64_t i = 0; i < n; ++i) {
      d[i] = static_cast<dst_t>(
          static_cast<scalar_t>(static_cast<acc_t>(xs[i]) * static_cast<acc_t>(ms[i])));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<dst_t>(xs[i]);
  }
  for (int64_t q = hi; q < len; ++q) dst[q] = dst_t(0);
}

// d[i] = s[i] rounded to scalar_t.
template <typename scalar_t>
PCONV_CPU_CLONES void narrow(const acc_type<scalar_t>* s, scalar_t* d, int64_t len) {
  for (int64_t i = 0; i < len; ++i) d[i] = static_cast<scalar_t>(s[i]);
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
// few pixels do not pay a call per channel. out must not alias x or m.
template <typename scalar_t, typename acc_t>
PCONV_CPU_CLONES void multiply_accumulate(const scalar_t* x, const scalar_t* m, scalar_t* out,
                                          acc_t* sum, int64_t channels, int64_t stride,
                                          int64_t len, bool first) {
  using op_t = acc_type<scalar_t>;
  for (int64_t c = 0; c < channels; ++c, x += stride, m += stride, out += stride) {
    if constexpr (kHasBitMask<scalar_t>) {
      const bool bits = first && c == 0
                            ? select_if_zero_one<scalar_t, SumMode::kStart>(x, m, out, sum, len)
                            : select_if_zero_one<scalar_t, SumMode::kAdd>(x, m, out, sum, len);
      if (!bits) multiply_run(x, m, out, len);
    } else if (first && c == 0) {
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
