// qwen3's GEMV for x86 CPUs: y (M, N) = (x (M, K) . q (N, K)^T) * s (N), for int8 weights q with one scale s per
// row (int8 weight-only), and the same without scales for float32 weights w (the fp32 model's projections).
//
// The weights are row-major (one row per output feature); x has a few rows (decode: 1). x, s and y are float32 or
// bfloat16; everything is computed in float32 (int8 -> float32 is exact).
// At batch 1 the kernel only has to stream q from memory: each thread takes a contiguous range of rows,
// works on NB rows at a time (x is reused from L1 across them) and prefetches the rows AHEAD rows on,
// every cache line of those rows, into L2, so that enough memory requests are in flight (PyTorch's int8pack kernel
// reads ~10 GB/s of a ~25 GB/s machine without prefetching, and its float32 GEMV ~15 GB/s; benchmarks/NOTES.md).
//
// Compiled once per instruction set, with -DQWEN3_AVX512 (-mavx512f -mavx512bw -mavx512vl -mfma) or
// -DQWEN3_AVX2 (-mavx2 -mfma), as a plain shared library called through ctypes (no Python or torch
// headers, so it builds in a few seconds). Threads come from OpenMP; the process's libgomp is torch's.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

namespace {

constexpr int NB = 4;  // weight rows per tile
// Prefetch distance, in rows, into L2 (T1): measured on a 2-core Sapphire Rapids VM, one thread, 1024 x 3072
// from DRAM: no prefetch 6.9 GB/s, into L1 (T0) 7.6, into L2 (T1) 14.8 (4 to 32 rows ahead all alike).
constexpr int64_t AHEAD = 8;

#if defined(QWEN3_AVX512)
constexpr int MB_MAX = 4;  // x rows per pass: MB x NB accumulators + NB weight vectors in 32 zmm registers
#elif defined(QWEN3_AVX2)
constexpr int MB_MAX = 2;  // ... in 16 ymm registers
#else
#error "compile with -DQWEN3_AVX512 or -DQWEN3_AVX2"
#endif

inline float bf16_to_float(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does; NaN stays NaN
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// always_inline: as an out-of-line function GCC (12, -O2) judges it free of side effects and drops the calls.
// The cache line holding element k of each of nb rows, when k starts a line: every 64 elements of int8 rows, every
// 16 of float32 ones, so the weights are fetched one line per row at a time, ahead of their use.
template <typename W>
__attribute__((always_inline)) inline void prefetch_rows(const W* pf, int64_t K, int nb, int64_t k) {
  if (pf == nullptr || (k * static_cast<int64_t>(sizeof(W))) % 64 != 0) return;
  for (int r = 0; r < nb; ++r) _mm_prefetch(reinterpret_cast<const char*>(pf + r * K + k), _MM_HINT_T1);
}

#if defined(QWEN3_AVX512)
// 16 weights as float32 (masked: the first `mask` lanes, the rest 0)
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const int8_t* p, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}
inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
#else
// 8 weights as float32
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
#endif

// out[m][r] = sum_k x[m][k] * w[r][k] for MB rows of x and NB rows of w (x is float32, ldx = K; W int8 or float).
template <int MB, int R, typename W>
void tile(const float* x, const W* w, int64_t K, const W* pf, float out[MB_MAX][NB]) {
#if defined(QWEN3_AVX512)
  __m512 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    for (int64_t kk = k; kk < k + 64; kk += 16) {
      prefetch_rows(pf, K, R, kk);
      __m512 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = load16(w + r * K + kk);
      for (int m = 0; m < MB; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * K + kk);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
      }
    }
  }
  for (; k < K; k += 16) {  // remainder: masked loads (K need not be a multiple of 16)
    prefetch_rows(pf, K, R, k);
    const int64_t left = K - k;
    const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load16(w + r * K + k, mask);
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) out[m][r] = _mm512_reduce_add_ps(acc[m][r]);
#else  // AVX2
  __m256 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    for (int64_t kk = k; kk < k + 64; kk += 8) {
      prefetch_rows(pf, K, R, kk);
      __m256 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = load8(w + r * K + kk);
      for (int m = 0; m < MB; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * K + kk);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
      }
    }
  }
  for (; k + 8 <= K; k += 8) {
    prefetch_rows(pf, K, R, k);
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load8(w + r * K + k);
    for (int m = 0; m < MB; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[m][r]), _mm256_extractf128_ps(acc[m][r], 1));
      const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
      float sum = _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
      for (int64_t kt = k; kt < K; ++kt) sum += x[m * K + kt] * static_cast<float>(w[r * K + kt]);  // K % 8
      out[m][r] = sum;
    }
#endif
}

template <int R, typename W>
void tile_rows(int mb, const float* x, const W* w, int64_t K, const W* pf, float out[MB_MAX][NB]) {
  switch (mb) {
    case 1: tile<1, R, W>(x, w, K, pf, out); break;
    case 2: tile<2, R, W>(x, w, K, pf, out); break;
#if defined(QWEN3_AVX512)
    case 3: tile<3, R, W>(x, w, K, pf, out); break;
    case 4: tile<4, R, W>(x, w, K, pf, out); break;
#endif
    default: break;
  }
}

// y = (x q^T) * s; s_in == nullptr: no scales. Returns 0 on success, 1 if a scratch buffer could not be allocated.
template <typename W>
int gemv(const void* x_in, int x_dtype, int64_t M, int64_t K, const W* q, const void* s_in, int s_dtype, int64_t N,
         void* y_out, int num_threads) {
  const float* x = static_cast<const float*>(x_in);
  float* xbuf = nullptr;
  if (x_dtype == 1) {  // bf16 x: widen once (M x K floats, a few KB)
    const size_t bytes = ((static_cast<size_t>(M * K) * sizeof(float) + 63) / 64) * 64;
    xbuf = static_cast<float*>(aligned_alloc(64, bytes));
    if (xbuf == nullptr) return 1;
    const uint16_t* xb = static_cast<const uint16_t*>(x_in);
    for (int64_t i = 0; i < M * K; ++i) xbuf[i] = bf16_to_float(xb[i]);
    x = xbuf;
  }
  const int64_t tiles = (N + NB - 1) / NB;
#pragma omp parallel num_threads(num_threads)
  {
    // each thread streams one contiguous range of rows (static partition in whole tiles)
    const int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t begin = tiles * t / T * NB;
    const int64_t end = tiles * (t + 1) / T * NB < N ? tiles * (t + 1) / T * NB : N;
    float out[MB_MAX][NB];
    for (int64_t n0 = begin; n0 < end; n0 += NB) {
      const int nb = end - n0 < NB ? static_cast<int>(end - n0) : NB;
      const W* pf = n0 + AHEAD + nb <= N ? q + (n0 + AHEAD) * K : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += MB_MAX) {
        const int mb = M - m0 < MB_MAX ? static_cast<int>(M - m0) : MB_MAX;
        const float* xm = x + m0 * K;
        const W* pfm = m0 == 0 ? pf : nullptr;  // later passes find the rows in L1
        if (nb == NB) {
          tile_rows<NB>(mb, xm, q + n0 * K, K, pfm, out);
        } else {
          for (int r = 0; r < nb; ++r) {  // the last rows, one at a time
            float one[MB_MAX][NB] = {};
            tile_rows<1>(mb, xm, q + (n0 + r) * K, K, pfm, one);
            for (int m = 0; m < mb; ++m) out[m][r] = one[m][0];
          }
        }
        for (int r = 0; r < nb; ++r) {
          const int64_t n = n0 + r;
          const float scale = s_in == nullptr ? 1.0f
                              : s_dtype == 1 ? bf16_to_float(static_cast<const uint16_t*>(s_in)[n])
                                             : static_cast<const float*>(s_in)[n];
          for (int m = 0; m < mb; ++m) {
            const float v = out[m][r] * scale;
            if (x_dtype == 1)
              static_cast<uint16_t*>(y_out)[(m0 + m) * N + n] = float_to_bf16(v);
            else
              static_cast<float*>(y_out)[(m0 + m) * N + n] = v;
          }
        }
      }
    }
  }
  free(xbuf);
  return 0;
}

}  // namespace

extern "C" {

// dtype codes: 0 float32, 1 bfloat16. y has x's dtype. All arrays are contiguous; the caller
// (qwen3/kernels/cpu_gemv.py) checks the shapes. Returns 0, or 1 if a scratch buffer could not be allocated.
int qwen3_int8_gemv(const void* x_in, int x_dtype, int64_t M, int64_t K, const int8_t* q, const void* s_in,
                    int s_dtype, int64_t N, void* y_out, int num_threads) {
  return gemv<int8_t>(x_in, x_dtype, M, K, q, s_in, s_dtype, N, y_out, num_threads);
}

// y = x w^T for float32 weights w (N, K).
int qwen3_float_gemv(const void* x_in, int x_dtype, int64_t M, int64_t K, const float* w, int64_t N, void* y_out,
                     int num_threads) {
  return gemv<float>(x_in, x_dtype, M, K, w, nullptr, 0, N, y_out, num_threads);
}

}  // extern "C"
