// Block packing: copies a list of equally sized blocks from anywhere in device memory into
// one contiguous buffer (the gather strategy's one message per peer). Pure data movement:
// each CTA copies one tile of one block with independent 16-byte loads in flight per thread.
// Its inverse for small appends: pieces of one (mapped host) buffer scattered to their places.
#include <cstdint>
#include <string>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/kernels.h"

namespace reattn::cuda {
namespace {

constexpr int kPackThreads = 256;
constexpr int kPackVectorsPerThread = 4;  // 16-byte loads in flight per thread
constexpr size_t kPackTileBytes = size_t{kPackThreads} * kPackVectorsPerThread * 16;  // 16 KiB
constexpr unsigned kMaxGridY = 65535;

// grid (tiles per block, min(count, kMaxGridY)), block kPackThreads. Blocks b = blockIdx.y,
// blockIdx.y + gridDim.y, ...; tile blockIdx.x of each covers bytes [x * tile, (x + 1) * tile).
__global__ void __launch_bounds__(kPackThreads) pack_blocks_kernel(const PackParams p) {
  const size_t tile_begin = static_cast<size_t>(blockIdx.x) * kPackTileBytes;
  if (tile_begin >= p.block_bytes) return;
  const size_t tile_end = tile_begin + kPackTileBytes < p.block_bytes ? tile_begin + kPackTileBytes : p.block_bytes;
  for (int64_t b = blockIdx.y; b < p.count; b += gridDim.y) {
    const char* src = static_cast<const char*>(p.src[b]);
    char* dst = static_cast<char*>(p.dst) + static_cast<size_t>(b) * p.block_bytes;
    const bool aligned = ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) & 15) == 0;
    size_t done = tile_begin;
    if (aligned) {
      // Whole 16-byte vectors of the tile; loads first, then stores, so that they overlap.
      const size_t vectors = (tile_end - tile_begin) / 16;
      const auto* s = reinterpret_cast<const uint4*>(src + tile_begin);
      auto* d = reinterpret_cast<uint4*>(dst + tile_begin);
      uint4 v[kPackVectorsPerThread];
#pragma unroll
      for (int i = 0; i < kPackVectorsPerThread; ++i) {
        const size_t idx = static_cast<size_t>(i) * kPackThreads + threadIdx.x;
        if (idx < vectors) v[i] = s[idx];
      }
#pragma unroll
      for (int i = 0; i < kPackVectorsPerThread; ++i) {
        const size_t idx = static_cast<size_t>(i) * kPackThreads + threadIdx.x;
        if (idx < vectors) d[idx] = v[i];
      }
      done = tile_begin + vectors * 16;
    }
    // The rest byte by byte: an unaligned block, or a block size that is no multiple of 16.
    for (size_t i = done + threadIdx.x; i < tile_end; i += kPackThreads) dst[i] = src[i];
  }
}

// grid (tiles of the largest piece, min(count, kMaxGridY)), block kPackThreads. Piece i =
// blockIdx.y, blockIdx.y + gridDim.y, ...; tile blockIdx.x of each covers bytes
// [x * tile, (x + 1) * tile). The sources may be mapped host memory: every byte is read once.
__global__ void __launch_bounds__(kPackThreads)
    scatter_pieces_kernel(const UploadPiece* pieces, int64_t count, const char* src) {
  const size_t tile_begin = static_cast<size_t>(blockIdx.x) * kPackTileBytes;
  for (int64_t i = blockIdx.y; i < count; i += gridDim.y) {
    const UploadPiece piece = pieces[i];
    const size_t bytes = static_cast<size_t>(piece.bytes);
    if (tile_begin >= bytes) continue;
    const size_t tile_end = tile_begin + kPackTileBytes < bytes ? tile_begin + kPackTileBytes : bytes;
    const char* from = src + piece.src_offset;
    char* to = static_cast<char*>(piece.dst);
    size_t done = tile_begin;
    if (((reinterpret_cast<uintptr_t>(from) | reinterpret_cast<uintptr_t>(to)) & 15) == 0) {
      const size_t vectors = (tile_end - tile_begin) / 16;
      const auto* s = reinterpret_cast<const uint4*>(from + tile_begin);
      auto* d = reinterpret_cast<uint4*>(to + tile_begin);
      for (size_t v = threadIdx.x; v < vectors; v += kPackThreads) d[v] = s[v];
      done = tile_begin + vectors * 16;
    }
    for (size_t b = done + threadIdx.x; b < tile_end; b += kPackThreads) to[b] = from[b];
  }
}

}  // namespace

Status run_scatter_pieces(const UploadPiece* pieces, int64_t count, const char* src, int64_t max_piece_bytes,
                          cudaStream_t stream) {
  if (count < 0) return invalid_argument("scatter_pieces: count " + std::to_string(count) + " is negative");
  if (count == 0 || max_piece_bytes <= 0) return Status::ok();
  if (!pieces || !src) return invalid_argument("scatter_pieces: null piece list or source");
  const size_t tiles = (static_cast<size_t>(max_piece_bytes) + kPackTileBytes - 1) / kPackTileBytes;
  if (tiles > 0x7fffffffu) {
    return invalid_argument("scatter_pieces: piece of " + std::to_string(max_piece_bytes) + " bytes is too large");
  }
  const dim3 grid(static_cast<unsigned>(tiles),
                  static_cast<unsigned>(count < kMaxGridY ? count : static_cast<int64_t>(kMaxGridY)));
  scatter_pieces_kernel<<<grid, kPackThreads, 0, stream>>>(pieces, count, src);
  REATTN_CUDA_CHECK_LAUNCH("scatter_pieces_kernel");
  return Status::ok();
}

Status run_pack_blocks(const PackParams& p, cudaStream_t stream) {
  if (p.count < 0) return invalid_argument("pack_blocks: count " + std::to_string(p.count) + " is negative");
  if (p.count == 0 || p.block_bytes == 0) return Status::ok();
  if (!p.src || !p.dst) return invalid_argument("pack_blocks: null source list or destination");
  const size_t tiles = (p.block_bytes + kPackTileBytes - 1) / kPackTileBytes;
  if (tiles > 0x7fffffffu) {
    return invalid_argument("pack_blocks: block of " + std::to_string(p.block_bytes) + " bytes is too large");
  }
  const dim3 grid(static_cast<unsigned>(tiles),
                  static_cast<unsigned>(p.count < kMaxGridY ? p.count : static_cast<int64_t>(kMaxGridY)));
  pack_blocks_kernel<<<grid, kPackThreads, 0, stream>>>(p);
  REATTN_CUDA_CHECK_LAUNCH("pack_blocks_kernel");
  return Status::ok();
}

}  // namespace reattn::cuda
