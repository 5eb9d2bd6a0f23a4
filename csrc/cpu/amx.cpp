// AMX tiles: run-time detection and the recurrent panel product (amx.h).
#include "amx.h"

#include <c10/util/Exception.h>


// Per-function target attributes: GCC 11 and clang 12 know the AMX intrinsics.
#if defined(__x86_64__) && defined(__linux__) && (defined(__clang__) || __GNUC__ >= 11)
#define SEQFUSE_HAVE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace seqfuse {

#if defined(SEQFUSE_HAVE_AMX)
namespace {

bool detect_amx() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = d & (1u << 24), bf16 = d & (1u << 22);
  if (!(tile && bf16)) return false;
  // Linux keeps the 8 KiB of tile state off until a process asks for it.
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// Tile registers: 0..3 the gates' sums, 4 and 5 a 32-wide k chunk of a and of the panel,
// 6 and 7 the last, narrower chunk when K2 is not a multiple of 16.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

template <int NG>
__attribute__((target("amx-tile,amx-bf16"))) void panel_product(
    const c10::BFloat16* a, int64_t lda, const c10::BFloat16* panel, int64_t K, float* c,
    bool accumulate, int rows) {
  const int64_t K2 = (K + 1) / 2, full = K2 / 16, tail = K2 % 16;  // pairs of k
  TileConfig cfg;
  const uint8_t m = static_cast<uint8_t>(rows);
  for (int t = 0; t < NG; ++t) cfg.rows[t] = m, cfg.colsb[t] = 64;
  cfg.rows[4] = m, cfg.colsb[4] = 64;  // a: rows x 32 k
  cfg.rows[5] = 16, cfg.colsb[5] = 64;  // panel: 16 pairs of k x 16 units x 2
  if (tail) {
    cfg.rows[6] = m, cfg.colsb[6] = static_cast<uint16_t>(tail * 4);
    cfg.rows[7] = static_cast<uint8_t>(tail), cfg.colsb[7] = 64;
  }
  _tile_loadconfig(&cfg);
  const int64_t a_stride = lda * 2, p_row = NG * 32;  // bytes; panel elements per k pair
  const int64_t p_stride = p_row * 2;
  if (accumulate) {
    _tile_loadd(0, c, 64);
    if constexpr (NG > 1) _tile_loadd(1, c + 256, 64);
    if constexpr (NG > 2) _tile_loadd(2, c + 512, 64);
    if constexpr (NG > 3) _tile_loadd(3, c + 768, 64);
  } else {
    _tile_zero(0);
    if constexpr (NG > 1) _tile_zero(1);
    if constexpr (NG > 2) _tile_zero(2);
    if constexpr (NG > 3) _tile_zero(3);
  }
  for (int64_t j = 0; j < full; ++j) {
    const c10::BFloat16* p = panel + j * 16 * p_row;
    _tile_loadd(4, a + j * 32, a_stride);
    _tile_loadd(5, p, p_stride);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (NG > 1) { _tile_loadd(5, p + 32, p_stride); _tile_dpbf16ps(1, 4, 5); }
    if constexpr (NG > 2) { _tile_loadd(5, p + 64, p_stride); _tile_dpbf16ps(2, 4, 5); }
    if constexpr (NG > 3) { _tile_loadd(5, p + 96, p_stride); _tile_dpbf16ps(3, 4, 5); }
  }
  if (tail) {
    const c10::BFloat16* p = panel + full * 16 * p_row;
    _tile_loadd(6, a + full * 32, a_stride);
    _tile_loadd(7, p, p_stride);
    _tile_dpbf16ps(0, 6, 7);
    if constexpr (NG > 1) { _tile_loadd(7, p + 32, p_stride); _tile_dpbf16ps(1, 6, 7); }
    if constexpr (NG > 2) { _tile_loadd(7, p + 64, p_stride); _tile_dpbf16ps(2, 6, 7); }
    if constexpr (NG > 3) { _tile_loadd(7, p + 96, p_stride); _tile_dpbf16ps(3, 6, 7); }
  }
  _tile_stored(0, c, 64);
  if constexpr (NG > 1) _tile_stored(1, c + 256, 64);
  if constexpr (NG > 2) _tile_stored(2, c + 512, 64);
  if constexpr (NG > 3) _tile_stored(3, c + 768, 64);
  _tile_release();
}

}  // namespace

bool amx_bf16_available() {
  static const bool available = detect_amx();  // asked once per process
  return available;
}

void amx_panel_product(const c10::BFloat16* a, int64_t lda, const c10::BFloat16* panel,
                       int64_t K, int NG, float* c, bool accumulate, int64_t rows) {
  TORCH_CHECK(rows >= 1 && rows <= kAmxRows, "seqfuse: amx_panel_product takes 1 to 16 rows, got ", rows);
  const int m = static_cast<int>(rows);
  switch (NG) {
    case 1: panel_product<1>(a, lda, panel, K, c, accumulate, m); break;
    case 3: panel_product<3>(a, lda, panel, K, c, accumulate, m); break;
    case 4: panel_product<4>(a, lda, panel, K, c, accumulate, m); break;
    default: TORCH_CHECK(false, "seqfuse: amx_panel_product takes 1, 3 or 4 gate blocks, got ", NG);
  }
}

#else

bool amx_bf16_available() { return false; }

void amx_panel_product(const c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t, int, float*,
                       bool, int64_t) {
  TORCH_CHECK(false, "seqfuse: this build has no AMX kernels");
}

#endif

}  // namespace seqfuse
