#include "worker/step.h"

#include <chrono>
#include <cstring>
#include <string>

#include "common/semantics.h"

namespace reattn {
namespace {

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// What one rank knows about one query of the step.
struct QueryState {
  const QueryPlan* plan = nullptr;
  const ContextShard* ctx = nullptr;
  Status status;
  Regions regions;
  std::vector<int64_t> recalled;
  Layout layout;
  int64_t rows = 0;              // qlen * H
  int64_t cand_offset = 0;       // candidates before this query's in a rank's send block
};

}  // namespace

StepRunner::StepRunner(Backend& backend, Communicator& comm, const Config& config, const KvStore& store)
    : backend_(backend), comm_(comm), config_(config), store_(store) {}

Status StepRunner::run(const StepPlan& plan, std::vector<QueryResult>* results, StepTiming* timing) {
  const auto t_start = std::chrono::steady_clock::now();
  const ModelConfig& m = config_.model;
  const ReattentionConfig& rc = config_.reattention;
  const int rank = comm_.rank();
  const int world = comm_.world();
  const int k = rc.top_k;
  const int dim = m.head_dim;
  const size_t nq = plan.queries.size();
  const size_t bb = store_.block_bytes();

  // 1. Check each query against what this rank holds.
  std::vector<QueryState> qs(nq);
  int64_t total_cands = 0;
  for (size_t i = 0; i < nq; ++i) {
    QueryState& s = qs[i];
    const QueryPlan& qp = plan.queries[i];
    s.plan = &qp;
    s.rows = qp.qlen * m.q_heads;
    s.cand_offset = total_cands;
    s.ctx = store_.find(qp.context_id);
    if (!s.ctx) {
      s.status = not_found("context " + std::to_string(qp.context_id) + " not found on rank " + std::to_string(rank));
    } else if (qp.layer < 0 || qp.layer >= m.layers || !s.ctx->resident[qp.layer]) {
      s.status = invalid_argument("layer " + std::to_string(qp.layer) + " is not held (model has " +
                                  std::to_string(m.layers) + " layers)");
    } else if (s.ctx->tokens != qp.tokens || s.ctx->owner_rank != qp.owner_rank) {
      s.status = internal_error("context " + std::to_string(qp.context_id) + " differs between ranks");
    } else if (qp.qlen < 1 || qp.q_offset < 0 ||
               static_cast<size_t>(qp.q_offset + s.rows * dim) > plan.q.size()) {
      s.status = internal_error("step plan: query rows outside the step's q");
    } else {
      s.status = validate_query(qp.tokens, qp.qlen, qp.mode, rc);
    }
    if (qp.qlen > 0) total_cands += s.rows * k;
  }

  // 2. Score this rank's mid chunks: per (row, head) local top-k, into the send block
  //    [nq flags (int64)][candidates].
  const size_t header_bytes = nq * sizeof(int64_t);
  const size_t send_bytes = header_bytes + total_cands * sizeof(Candidate);
  REATTN_RETURN_IF_ERROR(ensure_capacity(backend_, ws_.q, plan.q.size() * sizeof(float)));
  REATTN_RETURN_IF_ERROR(ensure_capacity(backend_, ws_.send, send_bytes));
  REATTN_RETURN_IF_ERROR(ensure_capacity(backend_, ws_.recv, send_bytes * world));
  REATTN_RETURN_IF_ERROR(backend_.upload(ws_.q.data(), plan.q.data(), plan.q.size() * sizeof(float)));
  const float* q_dev = ws_.q.as<float>();
  auto* cands = reinterpret_cast<Candidate*>(ws_.send.as<char>() + header_bytes);
  std::vector<int64_t> flags(nq);
  for (size_t i = 0; i < nq; ++i) {
    QueryState& s = qs[i];
    flags[i] = s.status.is_ok() ? 1 : 0;
    if (!s.status.is_ok()) continue;
    s.regions = compute_regions(s.plan->tokens, rc);
    const LayerShard& shard = s.ctx->layers[s.plan->layer];
    ScoreParams p;
    p.k_pages = shard.k_page_table.as<const void* const>();
    p.blocks_per_page = KvStore::kBlocksPerPage;
    p.block_count = mid_slots_on_rank(s.regions.num_chunks, rank, world);
    p.chunk_id_stride = world;
    p.chunk_id_offset = rank;
    p.q = q_dev + s.plan->q_offset;
    p.qlen = s.plan->qlen;
    p.q_heads = m.q_heads;
    p.kv_heads = m.kv_heads;
    p.head_dim = dim;
    p.chunk_tokens = rc.chunk_tokens;
    p.top_k = k;
    p.out = cands + s.cand_offset;
    REATTN_RETURN_IF_ERROR(backend_.score_chunks(p));
  }
  REATTN_RETURN_IF_ERROR(backend_.upload(ws_.send.data(), flags.data(), header_bytes));
  REATTN_RETURN_IF_ERROR(backend_.synchronize());
  const double score_ms = ms_since(t_start);

  // 3. One allgather of every rank's candidates; every rank then selects the same recall set.
  REATTN_RETURN_IF_ERROR(comm_.allgather(ws_.send.data(), ws_.recv.data(), send_bytes));
  std::string gathered(send_bytes * world, '\0');
  REATTN_RETURN_IF_ERROR(backend_.download(gathered.data(), ws_.recv.data(), gathered.size()));
  std::vector<Candidate> per_rank, topk;
  for (size_t i = 0; i < nq; ++i) {
    QueryState& s = qs[i];
    for (int r = 0; r < world && s.status.is_ok(); ++r) {
      int64_t flag;
      std::memcpy(&flag, gathered.data() + r * send_bytes + i * sizeof(int64_t), sizeof(flag));
      if (flag != 1) s.status = internal_error("query failed its checks on rank " + std::to_string(r));
    }
    if (!s.status.is_ok()) continue;
    per_rank.resize(static_cast<size_t>(world) * s.rows * k);
    for (int r = 0; r < world; ++r) {
      std::memcpy(&per_rank[static_cast<size_t>(r) * s.rows * k],
                  gathered.data() + r * send_bytes + header_bytes + s.cand_offset * sizeof(Candidate),
                  s.rows * k * sizeof(Candidate));
    }
    topk.resize(static_cast<size_t>(s.rows) * k);
    merge_candidates(per_rank.data(), world, s.rows, k, topk.data());
    s.recalled = select_recall(topk.data(), s.rows, k, rc.max_recall_chunks);
    s.layout = make_layout(s.regions, static_cast<int64_t>(s.recalled.size()));
  }
  const double candidates_ms = ms_since(t_start) - score_ms;

  // 4. Final attention. Per query, the owner ends with (out, max, sum) [rows] in `states`.
  const bool gather = plan.strategy == FinalAttention::kGather;
  const size_t state_floats_per_row = dim + 2;
  // Offsets (in floats) of each query's state package slots: slot 0 is this rank's own,
  // slots 1.. receive other ranks' (partial strategy, owner only).
  std::vector<size_t> state_offset(nq, 0);
  std::vector<std::vector<int>> partial_peers(nq);
  size_t state_floats = 0;
  // Gather: chunk K/V move as one message per (sender, owner) pair. Both sides walk the
  // queries in step order and each query's recalled chunks in U order, K then V, so rank r's
  // message to owner o is [queries owned by o][their chunks homed on r][K, V] blocks.
  // recv_first[r]: block slot in `staging` where rank r's message to this rank starts.
  std::vector<size_t> recv_blocks(world, 0), recv_first(world, 0);
  std::vector<std::vector<const void*>> send_src(world);  // per owner: the blocks to pack
  for (size_t i = 0; i < nq; ++i) {
    QueryState& s = qs[i];
    if (!s.status.is_ok()) continue;
    const int owner = s.plan->owner_rank;
    std::vector<bool> has_chunk(world, false);
    for (int64_t j : s.recalled) has_chunk[home_rank(j, world)] = true;
    if (!gather && rank == owner) {
      for (int r = 0; r < world; ++r) {
        if (r != owner && has_chunk[r]) partial_peers[i].push_back(r);
      }
    }
    state_offset[i] = state_floats;
    state_floats += (1 + partial_peers[i].size()) * s.rows * state_floats_per_row;
    if (!gather) continue;
    const LayerShard& shard = s.ctx->layers[s.plan->layer];
    for (int64_t j : s.recalled) {
      const int home = home_rank(j, world);
      if (home == owner) continue;
      if (rank == owner) recv_blocks[home] += 2;
      if (rank == home) {
        send_src[owner].push_back(store_.home_block(shard, false, j));
        send_src[owner].push_back(store_.home_block(shard, true, j));
      }
    }
  }
  size_t staging_blocks = 0;
  for (int r = 0; r < world; ++r) {
    recv_first[r] = staging_blocks;
    staging_blocks += recv_blocks[r];
  }
  REATTN_RETURN_IF_ERROR(ensure_capacity(backend_, ws_.states, state_floats * sizeof(float)));
  REATTN_RETURN_IF_ERROR(ensure_capacity(backend_, ws_.staging, staging_blocks * bb));

  // Chunk K/V to the owner (gather) before any attention runs: one pack of every block this
  // rank sends (owners in rank order), then one transfer per (sender, owner) pair.
  std::vector<Communicator::Transfer> sends, recvs;
  if (gather) {
    std::vector<const void*> pack_src;
    std::vector<size_t> send_first(world, 0);
    for (int o = 0; o < world; ++o) {
      send_first[o] = pack_src.size();
      pack_src.insert(pack_src.end(), send_src[o].begin(), send_src[o].end());
    }
    if (!pack_src.empty()) {
      REATTN_RETURN_IF_ERROR(ensure_capacity(backend_, ws_.pack_src, pack_src.size() * sizeof(void*)));
      REATTN_RETURN_IF_ERROR(ensure_capacity(backend_, ws_.pack, pack_src.size() * bb));
      REATTN_RETURN_IF_ERROR(backend_.upload(ws_.pack_src.data(), pack_src.data(), pack_src.size() * sizeof(void*)));
      PackParams pp;
      pp.src = ws_.pack_src.as<const void* const>();
      pp.count = static_cast<int64_t>(pack_src.size());
      pp.block_bytes = bb;
      pp.dst = ws_.pack.data();
      REATTN_RETURN_IF_ERROR(backend_.pack_blocks(pp));
    }
    for (int r = 0; r < world; ++r) {
      if (!send_src[r].empty()) {
        sends.push_back({r, ws_.pack.as<char>() + send_first[r] * bb, send_src[r].size() * bb});
      }
      if (recv_blocks[r] > 0) recvs.push_back({r, ws_.staging.as<char>() + recv_first[r] * bb, recv_blocks[r] * bb});
    }
    REATTN_RETURN_IF_ERROR(comm_.exchange(sends, recvs));
  }

  // Segments and row positions of every attention call of this step, packed in `meta`.
  struct Call {
    size_t query;
    size_t seg_first, seg_count;
  };
  std::vector<KeySegment> segments;
  std::vector<Call> calls;
  std::vector<size_t> recv_slot = recv_first;  // next block slot of each sender's message
  for (size_t i = 0; i < nq; ++i) {
    const QueryState& s = qs[i];
    if (!s.status.is_ok()) continue;
    const int owner = s.plan->owner_rank;
    const bool is_owner = rank == owner;
    const LayerShard& shard = s.ctx->layers[s.plan->layer];
    const size_t first = segments.size();
    const int64_t C = rc.chunk_tokens;
    if (is_owner && s.layout.sink_count > 0) {
      segments.push_back({shard.sink_k.data(), shard.sink_v.data(), s.layout.sink_count, rc.sink_tokens * dim, 0});
    }
    for (size_t u = 0; u < s.recalled.size(); ++u) {
      const int64_t j = s.recalled[u];
      const int home = home_rank(j, world);
      const int64_t position = s.layout.recalled_position(static_cast<int64_t>(u), C);
      if (home == rank && (is_owner || !gather)) {
        segments.push_back({store_.home_block(shard, false, j), store_.home_block(shard, true, j), C, C * dim, position});
      } else if (gather && is_owner && home != rank) {
        const size_t slot = recv_slot[home];
        recv_slot[home] += 2;
        segments.push_back({ws_.staging.as<char>() + slot * bb, ws_.staging.as<char>() + (slot + 1) * bb, C, C * dim,
                            position});
      }
    }
    if (is_owner) {
      // The local region [local_begin, n), block by block from the ring.
      const int64_t begin = s.regions.local_begin();
      for (int64_t t = begin; t < s.regions.tokens;) {
        const int64_t block = (t - rc.sink_tokens) / C;
        const int64_t block_first = rc.sink_tokens + block * C;
        const int64_t end = std::min(s.regions.tokens, block_first + C);
        const size_t esize = dtype_size(backend_.storage_dtype());
        const size_t skip = (t - block_first) * dim * esize;
        segments.push_back({static_cast<const char*>(store_.ring_block(shard, false, block)) + skip,
                            static_cast<const char*>(store_.ring_block(shard, true, block)) + skip, end - t, C * dim,
                            s.layout.local_position() + (t - begin)});
        t = end;
      }
    }
    if (segments.size() > first || is_owner) calls.push_back({i, first, segments.size() - first});
  }
  std::vector<int64_t> row_info;  // per call: [position][visible_end] of each row
  std::vector<size_t> row_info_first;
  for (const Call& c : calls) {
    const QueryState& s = qs[c.query];
    row_info_first.push_back(row_info.size());
    const QueryMode mode = s.plan->mode;
    for (int64_t r = 0; r < s.plan->qlen; ++r) row_info.push_back(row_position(s.regions, s.layout, mode, s.plan->qlen, r).position);
    for (int64_t r = 0; r < s.plan->qlen; ++r) row_info.push_back(row_position(s.regions, s.layout, mode, s.plan->qlen, r).visible_end);
  }
  const size_t seg_bytes = segments.size() * sizeof(KeySegment);
  REATTN_RETURN_IF_ERROR(ensure_capacity(backend_, ws_.meta, seg_bytes + row_info.size() * sizeof(int64_t)));
  REATTN_RETURN_IF_ERROR(backend_.upload(ws_.meta.data(), segments.data(), seg_bytes));
  REATTN_RETURN_IF_ERROR(backend_.upload(ws_.meta.as<char>() + seg_bytes, row_info.data(), row_info.size() * sizeof(int64_t)));
  const auto* seg_dev = ws_.meta.as<KeySegment>();
  const auto* rows_dev = reinterpret_cast<const int64_t*>(ws_.meta.as<char>() + seg_bytes);

  for (size_t c = 0; c < calls.size(); ++c) {
    const QueryState& s = qs[calls[c].query];
    float* state = ws_.states.as<float>() + state_offset[calls[c].query];
    AttendParams p;
    p.segments = seg_dev + calls[c].seg_first;
    p.segment_count = static_cast<int64_t>(calls[c].seg_count);
    p.q = q_dev + s.plan->q_offset;
    p.row_position = rows_dev + row_info_first[c];
    p.row_visible_end = rows_dev + row_info_first[c] + s.plan->qlen;
    p.qlen = s.plan->qlen;
    p.q_heads = m.q_heads;
    p.kv_heads = m.kv_heads;
    p.head_dim = dim;
    p.rope_theta = m.rope_theta;
    p.max_position = s.layout.length();
    p.out = state;
    p.row_max = state + s.rows * dim;
    p.row_sum = state + s.rows * (dim + 1);
    REATTN_RETURN_IF_ERROR(backend_.attend(p));
  }

  if (!gather) {
    // Partial states to the owner, merged there with its own.
    sends.clear();
    recvs.clear();
    for (size_t i = 0; i < nq; ++i) {
      const QueryState& s = qs[i];
      if (!s.status.is_ok()) continue;
      const int owner = s.plan->owner_rank;
      const size_t package = s.rows * state_floats_per_row * sizeof(float);
      float* own = ws_.states.as<float>() + state_offset[i];
      if (rank != owner) {
        bool mine = false;
        for (int64_t j : s.recalled) mine = mine || home_rank(j, world) == rank;
        if (mine) sends.push_back({owner, own, package});
      } else {
        for (size_t p = 0; p < partial_peers[i].size(); ++p) {
          recvs.push_back({partial_peers[i][p], own + (1 + p) * s.rows * state_floats_per_row, package});
        }
      }
    }
    REATTN_RETURN_IF_ERROR(backend_.synchronize());
    REATTN_RETURN_IF_ERROR(comm_.exchange(sends, recvs));
    for (size_t i = 0; i < nq; ++i) {
      const QueryState& s = qs[i];
      if (!s.status.is_ok() || rank != s.plan->owner_rank) continue;
      float* own = ws_.states.as<float>() + state_offset[i];
      for (size_t p = 0; p < partial_peers[i].size(); ++p) {
        const float* other = own + (1 + p) * s.rows * state_floats_per_row;
        MergeParams mp;
        mp.partial_out = other;
        mp.partial_max = other + s.rows * dim;
        mp.partial_sum = other + s.rows * (dim + 1);
        mp.count = 1;
        mp.rows = s.rows;
        mp.head_dim = dim;
        mp.out = own;
        mp.row_max = own + s.rows * dim;
        mp.row_sum = own + s.rows * (dim + 1);
        REATTN_RETURN_IF_ERROR(backend_.merge_states(mp));
      }
    }
  }

  // 5. Outputs from each owner to the reply rank.
  REATTN_RETURN_IF_ERROR(backend_.synchronize());
  sends.clear();
  recvs.clear();
  const bool replying = rank == plan.reply_rank;
  if (replying) results->assign(nq, QueryResult{});
  for (size_t i = 0; i < nq; ++i) {
    const QueryState& s = qs[i];
    if (!s.status.is_ok()) continue;
    const int owner = s.plan->owner_rank;
    float* own = ws_.states.as<float>() + state_offset[i];
    if (replying) (*results)[i].out.resize(s.rows * dim);
    if (owner == plan.reply_rank) continue;
    if (rank == owner) sends.push_back({plan.reply_rank, own, s.rows * dim * sizeof(float)});
  }
  // The reply rank receives other owners' outputs in backend memory, then downloads.
  size_t reply_floats = 0;
  std::vector<size_t> reply_offset(nq, 0);
  if (replying) {
    for (size_t i = 0; i < nq; ++i) {
      if (!qs[i].status.is_ok() || qs[i].plan->owner_rank == rank) continue;
      reply_offset[i] = reply_floats;
      reply_floats += qs[i].rows * dim;
    }
  }
  Buffer& reply = ws_.reply;
  if (reply_floats > 0) {
    REATTN_RETURN_IF_ERROR(ensure_capacity(backend_, reply, reply_floats * sizeof(float)));
    for (size_t i = 0; i < nq; ++i) {
      if (!qs[i].status.is_ok() || qs[i].plan->owner_rank == rank) continue;
      recvs.push_back({qs[i].plan->owner_rank, reply.as<float>() + reply_offset[i], qs[i].rows * dim * sizeof(float)});
    }
  }
  REATTN_RETURN_IF_ERROR(comm_.exchange(sends, recvs));
  if (replying) {
    for (size_t i = 0; i < nq; ++i) {
      QueryResult& r = (*results)[i];
      const QueryState& s = qs[i];
      r.status = s.status;
      if (!s.status.is_ok()) continue;
      r.recalled = s.recalled;
      const void* src = s.plan->owner_rank == rank ? static_cast<const void*>(ws_.states.as<float>() + state_offset[i])
                                                   : static_cast<const void*>(reply.as<float>() + reply_offset[i]);
      REATTN_RETURN_IF_ERROR(backend_.download(r.out.data(), src, r.out.size() * sizeof(float)));
    }
  }
  if (timing) {
    timing->score_ms = score_ms;
    timing->candidates_ms = candidates_ms;
    timing->total_ms = ms_since(t_start);
    timing->attention_ms = timing->total_ms - score_ms - candidates_ms;
  }
  return Status::ok();
}

}  // namespace reattn
