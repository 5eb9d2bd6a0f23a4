// AMX bfloat16 tiles (Intel Sapphire Rapids and later) for the recurrent step products:
// for blocks of up to 16 rows, one tile instruction multiplies a 16 x 32 block of bfloat16 h by a
// 32 x 16 block of weights into 16 x 16 float32 sums, 16x the work of one AVX512-BF16
// vdpbf16ps. Compiled with per-function target attributes, so the library builds and runs
// on any x86-64 CPU; amx_bf16_available() says whether the CPU has the tiles and the OS
// lets this process use them (Linux: arch_prctl(ARCH_REQ_XCOMP_PERM), asked once; a
// refusal falls back to the AVX512-BF16 tiles), and amx_bf16_usable() whether they are in
// use: the capability "amx" is active (kernels.h; SEQFUSE_CPU_CAPABILITY=avx512_bf16 turns
// them off).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace seqfuse {

// Rows of one AMX tile: a step's active rows go in blocks of 16 (the last one shorter).
constexpr int64_t kAmxRows = 16;

// Batches from this size run on AMX tiles: every size measured, batch 1 included, was
// faster on them than on the AVX512-BF16 register tiles (docs/RESULTS.md, "AMX").
constexpr int64_t kAmxMinRows = 1;

bool amx_bf16_available();
bool amx_bf16_usable();  // dispatch.cpp

// c[q][16][16] (float32, rows of 16; the first `rows` <= 16 of them) = (or += with
// accumulate) a (`rows` rows of K bfloat16,
// row stride lda elements) times gate block q < NG of a weight panel (pack_panel's
// bfloat16 layout [K2][NG * 16 units][2], K2 = ceil(K / 2): 16 units and pairs of k), for
// every q. a's columns past K up to 2 * K2 must be zero. Needs amx_bf16_usable().
void amx_panel_product(const c10::BFloat16* a, int64_t lda, const c10::BFloat16* panel,
                       int64_t K, int NG, float* c, bool accumulate, int64_t rows = kAmxRows);

}  // namespace seqfuse
