// The walk of every CPU pass that changes layout between NCHW and channels_last.
//
// A tile is Tile<T>::kPixels pixels x Tile<T>::kChannels channels of one sample. On its way
// between the layouts it passes through a channel-major buffer of at most 16 KiB (L1): the
// pass's arithmetic runs on the buffer's rows, contiguous runs of one channel that vectorise
// like every other pass, and the layout change itself is a block transpose in registers
// (8 x 8 values for 16-bit types, 4 x 4 for 32-bit, SSE2, which every x86-64 CPU has).
// Measured on 67 x 256 x 256 bfloat16, one thread: the transpose took 1.9 ms in 8 x 8
// blocks against 2.9 ms value by value, a plain copy of the same bytes 0.85 ms.
//
// A tile reads or writes 512 bytes of each channel plane: with shorter runs the many
// planes, a power of two apart in memory, thrash the caches (67 x 256 x 256, bfloat16: 64
// pixels x 16 channels took 7.3 ms, 256 x 16 took 2.2 ms; float32: 6.1 against 4.2-4.7 ms
// for 128 x 32).
#pragma once

#include "pixel_blocks.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace pconv {
namespace tiles {

template <typename T>
struct Tile {
  static constexpr int64_t kPixels = 512 / sizeof(T);
  static constexpr int64_t kChannels = sizeof(T) == 2 ? 16 : 32;
};

// How many tasks the walks below run (one per sample and block of Tile<T>::kPixels pixels,
// each through all channels): the index `t` they pass to their row functions is in
// [0, count).
template <typename T>
int64_t count(int64_t batch, int64_t plane) {
  return pixel_block_count(batch, plane, Tile<T>::kPixels);
}

// Asks for the next tile's piece of an NCHW row to come into the caches: `row` is this
// tile's piece, `len` pixels from p0 of a plane of `plane` pixels, and the next piece
// follows it up to the plane's end. The rows callbacks below read NCHW rows this way, a
// short piece of each channel a plane apart, too short for the hardware prefetcher; they
// call this while they use this tile's piece (measured in relayout_kernel, layout.cpp).
template <typename T>
inline void prefetch_next_piece(const T* row, int64_t p0, int64_t len, int64_t plane) {
  const char* bytes = reinterpret_cast<const char*>(row + len);
  const int64_t next = std::min(len, plane - p0 - len) * int64_t(sizeof(T));
  for (int64_t b = 0; b < next; b += 64) __builtin_prefetch(bytes + b);
}

#if defined(__SSE2__)
inline __m128i load(const void* p) {
  return _mm_loadu_si128(static_cast<const __m128i*>(p));
}

inline void store(void* p, __m128i v) { _mm_storeu_si128(static_cast<__m128i*>(p), v); }

// dst[j * ds + i] = src[i * ss + j] for i, j < 8, 16-bit values.
inline void transpose_block(const uint16_t* src, int64_t ss, uint16_t* dst, int64_t ds) {
  const __m128i r0 = load(src), r1 = load(src + ss), r2 = load(src + 2 * ss),
                r3 = load(src + 3 * ss), r4 = load(src + 4 * ss), r5 = load(src + 5 * ss),
                r6 = load(src + 6 * ss), r7 = load(src + 7 * ss);
  // Pairs of rows interleaved, then pairs of pairs, then halves: columns 0-7.
  const __m128i a0 = _mm_unpacklo_epi16(r0, r1), a1 = _mm_unpackhi_epi16(r0, r1);
  const __m128i a2 = _mm_unpacklo_epi16(r2, r3), a3 = _mm_unpackhi_epi16(r2, r3);
  const __m128i a4 = _mm_unpacklo_epi16(r4, r5), a5 = _mm_unpackhi_epi16(r4, r5);
  const __m128i a6 = _mm_unpacklo_epi16(r6, r7), a7 = _mm_unpackhi_epi16(r6, r7);
  const __m128i b0 = _mm_unpacklo_epi32(a0, a2), b1 = _mm_unpackhi_epi32(a0, a2);
  const __m128i b2 = _mm_unpacklo_epi32(a1, a3), b3 = _mm_unpackhi_epi32(a1, a3);
  const __m128i b4 = _mm_unpacklo_epi32(a4, a6), b5 = _mm_unpackhi_epi32(a4, a6);
  const __m128i b6 = _mm_unpacklo_epi32(a5, a7), b7 = _mm_unpackhi_epi32(a5, a7);
  store(dst, _mm_unpacklo_epi64(b0, b4));
  store(dst + ds, _mm_unpackhi_epi64(b0, b4));
  store(dst + 2 * ds, _mm_unpacklo_epi64(b1, b5));
  store(dst + 3 * ds, _mm_unpackhi_epi64(b1, b5));
  store(dst + 4 * ds, _mm_unpacklo_epi64(b2, b6));
  store(dst + 5 * ds, _mm_unpackhi_epi64(b2, b6));
  store(dst + 6 * ds, _mm_unpacklo_epi64(b3, b7));
  store(dst + 7 * ds, _mm_unpackhi_epi64(b3, b7));
}

// dst[j * ds + i] = src[i * ss + j] for i, j < 4, 32-bit values.
inline void transpose_block(const uint32_t* src, int64_t ss, uint32_t* dst, int64_t ds) {
  const __m128i r0 = load(src), r1 = load(src + ss), r2 = load(src + 2 * ss),
                r3 = load(src + 3 * ss);
  const __m128i a0 = _mm_unpacklo_epi32(r0, r1), a1 = _mm_unpackhi_epi32(r0, r1);
  const __m128i a2 = _mm_unpacklo_epi32(r2, r3), a3 = _mm_unpackhi_epi32(r2, r3);
  store(dst, _mm_unpacklo_epi64(a0, a2));
  store(dst + ds, _mm_unpackhi_epi64(a0, a2));
  store(dst + 2 * ds, _mm_unpacklo_epi64(a1, a3));
  store(dst + 3 * ds, _mm_unpackhi_epi64(a1, a3));
}
#endif

// dst[j * kRows + i] = src[i * ss + j] for i < kRows, j < cols: rows of few channels
// into whole pixels (an RGB input into channels_last). A group of a constant size per
// pixel, which GCC vectorises with shuffles; the register blocks need 4 or 8 rows.
// Measured on the pass that forms x * m of 3 x 256 x 256 in channels_last and sums a
// 3-channel mask, one thread: bfloat16 0.14-0.22 ms value by value, 0.10 ms so; float32
// 0.21 against 0.19-0.20 ms.
template <int kRows, typename T>
void interleave_rows(const T* src, int64_t ss, T* dst, int64_t cols) {
  for (int64_t j = 0; j < cols; ++j) {
#pragma GCC unroll 4
    for (int i = 0; i < kRows; ++i) dst[j * kRows + i] = src[i * ss + j];
  }
}

// dst[j * ds + i] = src[i * ss + j] for i < rows, j < cols: a bit-exact copy, whatever
// the values (NaN payloads included), since it moves bits and never converts.
template <typename T>
void transpose(const T* src, int64_t ss, T* dst, int64_t ds, int64_t rows, int64_t cols) {
  using bits_t = std::conditional_t<sizeof(T) == 2, uint16_t,
                                    std::conditional_t<sizeof(T) == 4, uint32_t, T>>;
  if constexpr (sizeof(T) == 2 || sizeof(T) == 4) {
    if (ds == rows && (rows == 2 || rows == 3)) {
      const bits_t* s = reinterpret_cast<const bits_t*>(src);
      bits_t* d = reinterpret_cast<bits_t*>(dst);
      if (rows == 2) {
        interleave_rows<2>(s, ss, d, cols);
      } else {
        interleave_rows<3>(s, ss, d, cols);
      }
      return;
    }
  }
  int64_t i = 0;
#if defined(__SSE2__)
  if constexpr (sizeof(T) == 2 || sizeof(T) == 4) {
    constexpr int64_t kBlock = 16 / sizeof(T);
    const bits_t* s = reinterpret_cast<const bits_t*>(src);
    bits_t* d = reinterpret_cast<bits_t*>(dst);
    for (; i + kBlock <= rows; i += kBlock) {
      int64_t j = 0;
      for (; j + kBlock <= cols; j += kBlock) {
        transpose_block(s + i * ss + j, ss, d + j * ds + i, ds);
      }
      for (; j < cols; ++j) {
        for (int64_t k = 0; k < kBlock; ++k) d[j * ds + i + k] = s[(i + k) * ss + j];
      }
    }
  }
#endif
  for (; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) dst[j * ds + i] = src[i * ss + j];
  }
}

// Writes a channels_last [batch, channels, plane] tensor `dst` a tile at a time:
// rows(t, n, c, p0, len, row) fills row[0, len) with channel c of sample n at pixels
// [p0, p0 + len), and the tile is then transposed into place. Within a task the channels
// come in order 0, 1, ... (sums over them add in the mask pass's order); t is the task's
// index in [0, count<T>). Tasks run in parallel.
template <typename T, typename RowsFn>
void write_channels_last(T* dst, int64_t batch, int64_t channels, int64_t plane,
                         const RowsFn& rows) {
  constexpr int64_t kTileP = Tile<T>::kPixels, kTileC = Tile<T>::kChannels;
  // Below 32K values per task a parallel region costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(kTileP * channels, 1));
  for_each_pixel_block(batch, plane, kTileP, grain, [&](int64_t t, int64_t n, int64_t p0,
                                                        int64_t p1) {
    T buf[kTileC * kTileP];  // buf[c * kTileP + p]
    const int64_t len = p1 - p0;
    T* d = dst + (n * plane + p0) * channels;
    for (int64_t c0 = 0; c0 < channels; c0 += kTileC) {
      const int64_t nc = std::min(channels - c0, kTileC);
      for (int64_t c = 0; c < nc; ++c) rows(t, n, c0 + c, p0, len, buf + c * kTileP);
      transpose(buf, kTileP, d + c0, channels, nc, len);
    }
  });
}

// Reads a channels_last [batch, channels, plane] tensor `src` a tile at a time: each
// tile is transposed into a buffer, and rows(t, n, c, p0, len, row) gets channel c of
// sample n at pixels [p0, p0 + len) in row[0, len), channels in order as above.
template <typename T, typename RowsFn>
void read_channels_last(const T* src, int64_t batch, int64_t channels, int64_t plane,
                        const RowsFn& rows) {
  constexpr int64_t kTileP = Tile<T>::kPixels, kTileC = Tile<T>::kChannels;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(kTileP * channels, 1));
  for_each_pixel_block(batch, plane, kTileP, grain, [&](int64_t t, int64_t n, int64_t p0,
                                                        int64_t p1) {
    T buf[kTileC * kTileP];
    const int64_t len = p1 - p0;
    const T* s = src + (n * plane + p0) * channels;
    for (int64_t c0 = 0; c0 < channels; c0 += kTileC) {
      const int64_t nc = std::min(channels - c0, kTileC);
      transpose(s + c0, channels, buf, kTileP, len, nc);
      for (int64_t c = 0; c < nc; ++c) rows(t, n, c0 + c, p0, len, buf + c * kTileP);
    }
  });
}

}  // namespace tiles
}  // namespace pconv
