#include "kernels/cpu/cpu_backend.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

namespace reattn {
namespace {

// A fixed summation order (8 interleaved partial sums) so every rank and thread count gives
// bit-identical scores, while the compiler can still vectorise.
inline float dot(const float* a, const float* b, int n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int d = 0;
  for (; d + 8 <= n; d += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += a[d + l] * b[d + l];
  }
  for (; d < n; ++d) acc[d & 7] += a[d] * b[d];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// x rotated by RoPE (rotate_half) at one position, given cos/sin of that position [D/2].
inline void rotate(const float* x, const float* cs, const float* sn, int dim, float* out) {
  const int half = dim / 2;
  for (int d = 0; d < half; ++d) {
    out[d] = x[d] * cs[d] - x[d + half] * sn[d];
    out[d + half] = x[d + half] * cs[d] + x[d] * sn[d];
  }
}

// Folds per-thread top-k lists partial [threads][rows][k] into out [rows][k]. The order is
// total, so the result is the same for any split of the work.
void fold_thread_lists(const std::vector<Candidate>& partial, int threads, int64_t rows, int k, Candidate* out) {
  for (int tid = 0; tid < threads; ++tid) {
    const Candidate* top = partial.data() + static_cast<size_t>(tid) * rows * k;
    for (int64_t row = 0; row < rows; ++row) {
      for (int s = 0; s < k && top[row * k + s].chunk >= 0; ++s) topk_insert(out + row * k, k, top[row * k + s]);
    }
  }
}

}  // namespace

CpuBackend::CpuBackend(int threads) : threads_(threads > 0 ? threads : omp_get_num_procs()) {}

Expected<Buffer> CpuBackend::allocate(size_t bytes) {
  void* data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (!data) {
    return Status(ErrorCode::kCapacity, "host allocation of " + std::to_string(bytes) + " bytes failed");
  }
  return Buffer(this, data, bytes);
}

void CpuBackend::release(void* data) { std::free(data); }

Status CpuBackend::upload(void* dst, const void* host_src, size_t bytes) {
  std::memcpy(dst, host_src, bytes);
  return Status::ok();
}

Status CpuBackend::download(void* host_dst, const void* src, size_t bytes) {
  std::memcpy(host_dst, src, bytes);
  return Status::ok();
}

Status CpuBackend::copy(void* dst, const void* src, size_t bytes) {
  std::memmove(dst, src, bytes);
  return Status::ok();
}

Status CpuBackend::upload_pieces(const void* host_src, size_t bytes, const UploadPiece* pieces, int64_t count) {
  REATTN_RETURN_IF_ERROR(check_upload_pieces(bytes, pieces, count));
  for (int64_t i = 0; i < count; ++i) {
    std::memcpy(pieces[i].dst, static_cast<const char*>(host_src) + pieces[i].src_offset, pieces[i].bytes);
  }
  return Status::ok();
}

namespace {

// The scan shared by chunk and token scoring: per-thread top-k lists over a static split of
// the block slots, folded into p.out. score_head(slot, g, keys [C, D], top [rows][k], scratch)
// scores one KV head of one block.
template <typename ScoreHead>
void scan_blocks(const ScoreParams& p, int max_threads, ScoreHead score_head) {
  const int64_t rows = p.qlen * p.q_heads;
  const int k = p.top_k;
  for (int64_t i = 0; i < rows * k; ++i) p.out[i] = Candidate{0.0f, -1};
  if (p.block_count == 0) return;
  const int threads = static_cast<int>(std::min<int64_t>(max_threads, p.block_count));
  std::vector<Candidate> partial(static_cast<size_t>(threads) * rows * k, Candidate{0.0f, -1});
#pragma omp parallel num_threads(threads)
  {
    Candidate* top = partial.data() + static_cast<size_t>(omp_get_thread_num()) * rows * k;
    std::vector<float> scratch(static_cast<size_t>(p.qlen) * (p.q_heads / p.kv_heads));
#pragma omp for schedule(static)
    for (int64_t slot = 0; slot < p.block_count; ++slot) {
      const auto* block = static_cast<const float*>(p.k_pages[slot / p.blocks_per_page]) +
                          (slot % p.blocks_per_page) * p.kv_heads * p.chunk_tokens * p.head_dim;
      for (int g = 0; g < p.kv_heads; ++g) {
        score_head(slot, g, block + static_cast<int64_t>(g) * p.chunk_tokens * p.head_dim, top, scratch);
      }
    }
  }
  fold_thread_lists(partial, threads, rows, k, p.out);
}

}  // namespace

Status CpuBackend::score_chunks(const ScoreParams& p) {
  const int k = p.top_k;
  const int group = p.q_heads / p.kv_heads;
  const int dim = p.head_dim;
  scan_blocks(p, threads_, [&](int64_t slot, int g, const float* keys, Candidate* top, std::vector<float>& chunk_max) {
    const auto chunk = static_cast<int32_t>(slot * p.chunk_id_stride + p.chunk_id_offset);
    std::fill(chunk_max.begin(), chunk_max.end(), -INFINITY);
    for (int64_t t = 0; t < p.chunk_tokens; ++t) {
      for (int64_t i = 0; i < p.qlen; ++i) {
        for (int r = 0; r < group; ++r) {
          const float* q = p.q + (i * p.q_heads + g * group + r) * dim;
          float& best = chunk_max[i * group + r];
          best = std::max(best, dot(q, keys + t * dim, dim));
        }
      }
    }
    for (int64_t i = 0; i < p.qlen; ++i) {
      for (int r = 0; r < group; ++r) {
        const int64_t row = i * p.q_heads + g * group + r;
        topk_insert(top + row * k, k, Candidate{chunk_max[i * group + r], chunk});
      }
    }
  });
  return Status::ok();
}

Status CpuBackend::score_tokens(const ScoreParams& p) {
  const int k = p.top_k;
  const int group = p.q_heads / p.kv_heads;
  const int dim = p.head_dim;
  scan_blocks(p, threads_, [&](int64_t slot, int g, const float* keys, Candidate* top, std::vector<float>&) {
    const int64_t first = p.first_token + (slot * p.chunk_id_stride + p.chunk_id_offset) * p.chunk_tokens;
    for (int64_t t = 0; t < p.chunk_tokens; ++t) {
      const auto token = static_cast<int32_t>(first + t);
      for (int64_t i = 0; i < p.qlen; ++i) {
        for (int r = 0; r < group; ++r) {
          const int64_t row = i * p.q_heads + g * group + r;
          topk_insert(top + row * k, k, Candidate{dot(p.q + row * dim, keys + t * dim, dim), token});
        }
      }
    }
  });
  return Status::ok();
}

Status CpuBackend::attend(const AttendParams& p) {
  const int dim = p.head_dim;
  const int half = dim / 2;
  const int group = p.q_heads / p.kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));

  // cos/sin of every position that occurs, computed in double.
  std::vector<float> cos_table(static_cast<size_t>(p.max_position + 1) * half);
  std::vector<float> sin_table(cos_table.size());
  const std::vector<double> inv_freq = rope_inv_freq(dim, p.rope_theta, p.rope_scaling);
  for (int64_t pos = 0; pos <= p.max_position; ++pos) {
    for (int d = 0; d < half; ++d) {
      const double angle = static_cast<double>(pos) * inv_freq[d];
      cos_table[pos * half + d] = static_cast<float>(std::cos(angle));
      sin_table[pos * half + d] = static_cast<float>(std::sin(angle));
    }
  }
  int64_t total_keys = 0;
  for (int64_t s = 0; s < p.segment_count; ++s) total_keys += p.segments[s].tokens;

#pragma omp parallel for num_threads(std::min(threads_, p.kv_heads)) schedule(static)
  for (int g = 0; g < p.kv_heads; ++g) {
    // Rotate this KV head's keys once, shared by its query heads and rows.
    std::vector<float> keys(static_cast<size_t>(total_keys) * dim);
    std::vector<const float*> values(total_keys);
    std::vector<int64_t> positions(total_keys);
    int64_t u = 0;
    for (int64_t s = 0; s < p.segment_count; ++s) {
      const KeySegment& seg = p.segments[s];
      const auto* k = static_cast<const float*>(seg.k) + g * seg.head_stride;
      const auto* v = static_cast<const float*>(seg.v) + g * seg.head_stride;
      for (int64_t t = 0; t < seg.tokens; ++t, ++u) {
        const int64_t pos = seg.position + t;
        positions[u] = pos;
        rotate(k + t * dim, &cos_table[pos * half], &sin_table[pos * half], dim, &keys[u * dim]);
        values[u] = v + t * dim;
      }
    }
    std::vector<float> q_rot(dim);
    std::vector<float> logits(total_keys);
    for (int64_t i = 0; i < p.qlen; ++i) {
      const int64_t qpos = p.row_position[i];
      for (int r = 0; r < group; ++r) {
        const int64_t row = i * p.q_heads + g * group + r;
        rotate(p.q + row * dim, &cos_table[qpos * half], &sin_table[qpos * half], dim, q_rot.data());
        float mx = -INFINITY;
        for (int64_t t = 0; t < total_keys; ++t) {
          if (positions[t] >= p.row_visible_end[i]) {
            logits[t] = -INFINITY;
            continue;
          }
          logits[t] = dot(q_rot.data(), &keys[t * dim], dim) * scale;
          mx = std::max(mx, logits[t]);
        }
        float* out = p.out + row * dim;
        std::fill(out, out + dim, 0.0f);
        float sum = 0.0f;
        if (mx != -INFINITY) {
          for (int64_t t = 0; t < total_keys; ++t) {
            if (logits[t] == -INFINITY) continue;
            const float w = std::exp(logits[t] - mx);
            sum += w;
            for (int d = 0; d < dim; ++d) out[d] += w * values[t][d];
          }
          for (int d = 0; d < dim; ++d) out[d] /= sum;
        }
        p.row_max[row] = mx;
        p.row_sum[row] = sum;
      }
    }
  }
  return Status::ok();
}

Status CpuBackend::merge_states(const MergeParams& p) {
  for (int64_t c = 0; c < p.count; ++c) {
    for (int64_t row = 0; row < p.rows; ++row) {
      const int64_t src = c * p.rows + row;
      merge_state(p.row_max[row], p.row_sum[row], p.out + row * p.head_dim, p.partial_max[src],
                  p.partial_sum[src], p.partial_out + src * p.head_dim, p.head_dim);
    }
  }
  return Status::ok();
}

Status CpuBackend::pack_blocks(const PackParams& p) {
  if (p.count < 0) return invalid_argument("pack_blocks: count " + std::to_string(p.count) + " is negative");
  if (p.count == 0 || p.block_bytes == 0) return Status::ok();
  if (!p.src || !p.dst) return invalid_argument("pack_blocks: null source list or destination");
  const int threads = static_cast<int>(std::min<int64_t>(threads_, p.count));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < p.count; ++b) {
    std::memcpy(static_cast<char*>(p.dst) + b * p.block_bytes, p.src[b], p.block_bytes);
  }
  return Status::ok();
}

Status CpuBackend::copy_ranges(const CopyRangesParams& p) {
  if (p.count < 0) return invalid_argument("copy_ranges: count " + std::to_string(p.count) + " is negative");
  if (p.count == 0) return Status::ok();
  if (!p.ranges || !p.dst) return invalid_argument("copy_ranges: null range list or destination");
  for (int64_t i = 0; i < p.count; ++i) {
    std::memcpy(static_cast<char*>(p.dst) + p.ranges[i].dst_offset, p.ranges[i].src, p.ranges[i].bytes);
  }
  return Status::ok();
}

// The reference functions themselves: merge_candidates, then select_recall.
Status CpuBackend::merge_select(const MergeSelectParams& p) {
  if (p.top_k < 1 || p.world < 1 || p.rows < 0 || p.max_recall < 0 || !p.recall || !p.recall_count) {
    return invalid_argument("merge_select: top_k, world, rows, max_recall or an output out of range");
  }
  const int64_t list = p.rows * p.top_k;
  const int64_t stride = p.rank_stride > 0 ? p.rank_stride : list;
  if (stride < list) return invalid_argument("merge_select: rank_stride below rows * top_k");
  std::vector<Candidate> packed;
  const Candidate* gathered = p.gathered;
  if (stride != list && p.world > 1) {
    packed.resize(static_cast<size_t>(p.world) * list);
    for (int r = 0; r < p.world; ++r) std::copy_n(p.gathered + r * stride, list, packed.begin() + r * list);
    gathered = packed.data();
  }
  std::vector<Candidate> own;
  Candidate* merged = p.merged;
  if (!merged) {
    own.resize(static_cast<size_t>(list));
    merged = own.data();
  }
  merge_candidates(gathered, p.world, p.rows, p.top_k, merged);
  const std::vector<int64_t> recall = select_recall(merged, p.rows, p.top_k, p.max_recall);
  std::copy(recall.begin(), recall.end(), p.recall);
  *p.recall_count = static_cast<int64_t>(recall.size());
  return Status::ok();
}

}  // namespace reattn
