#include "worker/step.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>

#include "common/semantics.h"

namespace reattn {
namespace {

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

StepRunner::StepRunner(Backend& backend, Communicator& comm, const Config& config, const KvStore& store,
                       StepOptions options)
    : backend_(backend), comm_(comm), config_(config), store_(store), options_(options) {}

Status StepRunner::run(const StepPlan& plan, std::vector<QueryResult>* results, StepTiming* timing) {
  const auto t_start = std::chrono::steady_clock::now();
  std::vector<BlockQuery> block_queries;
  for (const QueryPlan& qp : plan.queries) block_queries.push_back({qp.context_id, qp.layer, qp.qlen});
  const ScoreLayout sl = plan_score_blocks(block_queries, config_.reattention.local_window, config_.model.q_heads,
                                           config_.model.head_dim, config_.reattention.top_k,
                                           config_.reattention.recall == RecallMode::kSpan
                                               ? INT64_MAX  // span selection runs on the host
                                               : options_.device_select_rows);
  std::vector<QueryState> qs = check(plan, sl);
  const size_t send_bytes = plan.queries.size() * sizeof(int64_t) + sl.total_candidates * sizeof(Candidate);
  REATTN_RETURN_IF_ERROR(score(plan, sl, qs, send_bytes));
  const double score_ms = ms_since(t_start);

  REATTN_RETURN_IF_ERROR(exchange_candidates(send_bytes));
  REATTN_RETURN_IF_ERROR(select(sl, send_bytes, qs));
  const double candidates_ms = ms_since(t_start) - score_ms;

  std::vector<SelectedQuery> selected;
  for (const QueryState& s : qs) selected.push_back(s.selected);
  const RankPlan rp = plan_rank(selected, plan.strategy, comm_.rank(), comm_.world(), plan.reply_rank,
                                config_.model.q_heads, config_.model.head_dim, config_.reattention);
  if (plan.strategy == FinalAttention::kGather) REATTN_RETURN_IF_ERROR(exchange_chunks(rp, qs));
  REATTN_RETURN_IF_ERROR(attend(rp, qs));
  if (plan.strategy == FinalAttention::kPartial) REATTN_RETURN_IF_ERROR(merge_partial_states(rp, qs));
  REATTN_RETURN_IF_ERROR(reply(plan, rp, qs, results));
  if (timing) {
    timing->score_ms = score_ms;
    timing->candidates_ms = candidates_ms;
    timing->total_ms = ms_since(t_start);
    timing->attention_ms = timing->total_ms - score_ms - candidates_ms;
  }
  return Status::ok();
}

// Checks each query against what this rank holds.
std::vector<StepRunner::QueryState> StepRunner::check(const StepPlan& plan, const ScoreLayout& sl) const {
  const ModelConfig& m = config_.model;
  const int rank = comm_.rank();
  std::vector<QueryState> qs(plan.queries.size());
  for (size_t i = 0; i < qs.size(); ++i) {
    QueryState& s = qs[i];
    const QueryPlan& qp = plan.queries[i];
    s.plan = &qp;
    s.rows = qp.qlen * m.q_heads;
    s.cand_offset = sl.cand_offset[i];
    s.q_offset = sl.q_offset[i];
    s.ctx = store_.find(qp.context_id);
    if (!s.ctx) {
      s.status = not_found("context " + std::to_string(qp.context_id) + " not found on rank " + std::to_string(rank));
    } else if (qp.layer < 0 || qp.layer >= m.layers || !s.ctx->resident[qp.layer]) {
      s.status = invalid_argument("layer " + std::to_string(qp.layer) + " is not held (model has " +
                                  std::to_string(m.layers) + " layers)");
    } else if (s.ctx->layer_tokens[qp.layer] != qp.tokens || s.ctx->owner_rank != qp.owner_rank) {
      s.status = internal_error("context " + std::to_string(qp.context_id) + " differs between ranks");
    } else if (qp.qlen < 1 || qp.q_offset < 0 ||
               static_cast<size_t>(qp.q_offset + s.rows * m.head_dim) > plan.q.size()) {
      s.status = internal_error("step plan: query rows outside the step's q");
    } else {
      s.status = validate_query(qp.tokens, qp.qlen, qp.mode, config_.reattention);
    }
    // Only queries in a block are scored (validate_query holds qlen to the same bound).
    if (s.status.is_ok() && s.cand_offset < 0) s.status = internal_error("step plan: query outside every score block");
    s.selected.owner_rank = qp.owner_rank;
    s.selected.qlen = qp.qlen;
    s.selected.mode = qp.mode;
  }
  return qs;
}

// Scores this rank's mid chunks, one kernel call per block of queries (score_blocks.h): per
// (row, head) local top-k, into the send block [queries flags (int64)][candidates].
Status StepRunner::score(const StepPlan& plan, const ScoreLayout& sl, std::vector<QueryState>& qs,
                         size_t send_bytes) {
  const ModelConfig& m = config_.model;
  const ReattentionConfig& rc = config_.reattention;
  const int rank = comm_.rank();
  const int world = comm_.world();
  const size_t header_bytes = qs.size() * sizeof(int64_t);
  REATTN_RETURN_IF_ERROR(ensure_capacity(backend_, ws_.q, sl.q_floats * sizeof(float)));
  REATTN_RETURN_IF_ERROR(ensure_capacity(backend_, ws_.send, send_bytes));
  REATTN_RETURN_IF_ERROR(ensure_capacity(backend_, ws_.recv, send_bytes * world));
  // The queries' rows in block order; runs contiguous in both places go up as one copy.
  int64_t run_src = 0, run_dst = 0, run_floats = 0;
  const auto upload_run = [&]() {
    if (run_floats == 0) return Status::ok();
    return backend_.upload(ws_.q.as<float>() + run_dst, plan.q.data() + run_src, run_floats * sizeof(float));
  };
  for (const QueryState& s : qs) {
    if (!s.status.is_ok()) continue;
    const int64_t src = s.plan->q_offset, dst = s.q_offset, floats = s.rows * m.head_dim;
    if (run_floats > 0 && src == run_src + run_floats && dst == run_dst + run_floats) {
      run_floats += floats;
      continue;
    }
    REATTN_RETURN_IF_ERROR(upload_run());
    run_src = src;
    run_dst = dst;
    run_floats = floats;
  }
  REATTN_RETURN_IF_ERROR(upload_run());
  auto* cands = reinterpret_cast<Candidate*>(ws_.send.as<char>() + header_bytes);
  std::vector<int64_t> flags(qs.size());
  for (size_t i = 0; i < qs.size(); ++i) {
    flags[i] = qs[i].status.is_ok() ? 1 : 0;
    if (qs[i].status.is_ok()) qs[i].selected.regions = compute_regions(qs[i].plan->tokens, rc);
  }
  for (const ScoreBlock& block : sl.blocks) {
    // Every query of the block that passed its checks holds the same context, layer and n;
    // rows of the others are scored too (harmlessly: their flags are 0).
    const QueryState* lead = nullptr;
    for (size_t i : block.queries) {
      if (!lead && qs[i].status.is_ok()) lead = &qs[i];
    }
    if (!lead) continue;
    const LayerShard& shard = lead->ctx->layers[lead->plan->layer];
    ScoreParams p;
    p.k_pages = shard.k_page_table.as<const void* const>();
    p.blocks_per_page = KvStore::kBlocksPerPage;
    p.block_count = mid_slots_on_rank(lead->selected.regions.num_chunks, rank, world);
    p.chunk_id_stride = world;
    p.chunk_id_offset = rank;
    p.q = ws_.q.as<float>() + block.q_offset;
    p.qlen = block.qlen;
    p.q_heads = m.q_heads;
    p.kv_heads = m.kv_heads;
    p.head_dim = m.head_dim;
    p.chunk_tokens = rc.chunk_tokens;
    p.top_k = rc.top_k;
    p.out = cands + block.cand_offset;
    p.first_token = rc.sink_tokens;
    REATTN_RETURN_IF_ERROR(rc.recall == RecallMode::kSpan ? backend_.score_tokens(p) : backend_.score_chunks(p));
  }
  REATTN_RETURN_IF_ERROR(backend_.upload(ws_.send.data(), flags.data(), header_bytes));
  return backend_.synchronize();
}

// One allgather of every rank's send block into ws_.recv.
Status StepRunner::exchange_candidates(size_t send_bytes) {
  return comm_.allgather(ws_.send.data(), ws_.recv.data(), send_bytes);
}

// Every rank computes the same recall set U and layout of each query from the gathered
// candidates; a query that failed its checks on any rank fails here on all. One download per
// rank fetches the flags and the host-selected blocks' lists; big blocks stay in backend memory.
Status StepRunner::select(const ScoreLayout& sl, size_t send_bytes, std::vector<QueryState>& qs) {
  const int world = comm_.world();
  const size_t host_bytes = qs.size() * sizeof(int64_t) + sl.host_candidates * sizeof(Candidate);
  std::string host(host_bytes * world, '\0');
  for (int r = 0; r < world; ++r) {
    REATTN_RETURN_IF_ERROR(backend_.download(host.data() + r * host_bytes, ws_.recv.as<char>() + r * send_bytes, host_bytes));
  }
  for (size_t i = 0; i < qs.size(); ++i) {
    QueryState& s = qs[i];
    for (int r = 0; r < world && s.status.is_ok(); ++r) {
      int64_t flag;
      std::memcpy(&flag, host.data() + r * host_bytes + i * sizeof(int64_t), sizeof(flag));
      if (flag != 1) s.status = internal_error("query failed its checks on rank " + std::to_string(r));
    }
  }
  select_on_host(sl, host, host_bytes, qs);
  REATTN_RETURN_IF_ERROR(select_on_device(sl, send_bytes, qs));
  for (QueryState& s : qs) {
    if (!s.status.is_ok()) continue;
    s.selected.layout = config_.reattention.recall == RecallMode::kSpan
                            ? make_span_layout(s.selected.regions, s.selected.spans)
                            : make_layout(s.selected.regions, static_cast<int64_t>(s.selected.recalled.size()));
    s.selected.ok = true;
  }
  return Status::ok();
}

// merge_candidates + select_recall over the downloaded lists ([world] blocks of host_bytes).
void StepRunner::select_on_host(const ScoreLayout& sl, const std::string& host, size_t host_bytes,
                                std::vector<QueryState>& qs) const {
  const int world = comm_.world();
  const int k = config_.reattention.top_k;
  const size_t header_bytes = qs.size() * sizeof(int64_t);
  std::vector<Candidate> per_rank, topk;
  for (const ScoreBlock& block : sl.blocks) {
    if (block.device_select) continue;
    for (size_t i : block.queries) {
      QueryState& s = qs[i];
      if (!s.status.is_ok()) continue;
      per_rank.resize(static_cast<size_t>(world) * s.rows * k);
      for (int r = 0; r < world; ++r) {
        std::memcpy(&per_rank[static_cast<size_t>(r) * s.rows * k],
                    host.data() + r * host_bytes + header_bytes + s.cand_offset * sizeof(Candidate),
                    s.rows * k * sizeof(Candidate));
      }
      topk.resize(static_cast<size_t>(s.rows) * k);
      merge_candidates(per_rank.data(), world, s.rows, k, topk.data());
      if (config_.reattention.recall == RecallMode::kSpan) {
        s.selected.spans = select_spans(topk.data(), s.rows, k, s.selected.regions, config_.reattention);
      } else {
        s.selected.recalled = select_recall(topk.data(), s.rows, k, config_.reattention.max_recall_chunks);
      }
    }
  }
}

// Backend::merge_select per query of the big blocks, straight from the receive buffer; one
// download of every such query's |U| and U.
Status StepRunner::select_on_device(const ScoreLayout& sl, size_t send_bytes, std::vector<QueryState>& qs) {
  const int64_t R = config_.reattention.max_recall_chunks;
  const size_t header_bytes = qs.size() * sizeof(int64_t);
  std::vector<size_t> queries;
  for (const ScoreBlock& block : sl.blocks) {
    if (!block.device_select) continue;
    for (size_t i : block.queries) {
      if (qs[i].status.is_ok()) queries.push_back(i);
    }
  }
  if (queries.empty()) return Status::ok();
  const size_t slot = static_cast<size_t>(R) + 1;
  REATTN_RETURN_IF_ERROR(ensure_capacity(backend_, ws_.select, queries.size() * slot * sizeof(int64_t)));
  const auto* gathered = reinterpret_cast<const Candidate*>(ws_.recv.as<char>() + header_bytes);
  for (size_t n = 0; n < queries.size(); ++n) {
    const QueryState& s = qs[queries[n]];
    MergeSelectParams p;
    p.gathered = gathered + s.cand_offset;
    p.world = comm_.world();
    p.rank_stride = static_cast<int64_t>(send_bytes / sizeof(Candidate));
    p.rows = s.rows;
    p.top_k = config_.reattention.top_k;
    p.num_chunks = s.selected.regions.num_chunks;
    p.max_recall = R;
    p.recall_count = ws_.select.as<int64_t>() + n * slot;
    p.recall = p.recall_count + 1;
    REATTN_RETURN_IF_ERROR(backend_.merge_select(p));
  }
  std::vector<int64_t> out(queries.size() * slot);
  REATTN_RETURN_IF_ERROR(backend_.download(out.data(), ws_.select.data(), out.size() * sizeof(int64_t)));
  for (size_t n = 0; n < queries.size(); ++n) {
    const int64_t* result = out.data() + n * slot;
    if (result[0] < 0 || result[0] > R) return internal_error("merge_select: recall count out of range");
    qs[queries[n]].selected.recalled.assign(result + 1, result + 1 + result[0]);
  }
  return Status::ok();
}

// gather: chunk K/V to their owners before any attention runs: one pack of every block this
// rank sends (owners in rank order), then one transfer per (sender, owner) pair.
Status StepRunner::exchange_chunks(const RankPlan& rp, const std::vector<QueryState>& qs) {
  if (config_.reattention.recall == RecallMode::kSpan) return exchange_spans(rp, qs);
  const int world = comm_.world();
  const size_t bb = store_.block_bytes();
  REATTN_RETURN_IF_ERROR(ensure_capacity(backend_, ws_.staging, rp.staging_blocks * bb));
  std::vector<const void*> pack_src;
  std::vector<size_t> send_first(world, 0);
  for (int o = 0; o < world; ++o) {
    send_first[o] = pack_src.size();
    for (const auto& [query, chunk] : rp.send_chunks[o]) {
      const LayerShard& shard = qs[query].ctx->layers[qs[query].plan->layer];
      pack_src.push_back(store_.home_block(shard, false, chunk));
      pack_src.push_back(store_.home_block(shard, true, chunk));
    }
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
  std::vector<Communicator::Transfer> sends, recvs;
  for (int r = 0; r < world; ++r) {
    if (!rp.send_chunks[r].empty()) {
      sends.push_back({r, ws_.pack.as<char>() + send_first[r] * bb, 2 * rp.send_chunks[r].size() * bb});
    }
    if (rp.recv_blocks[r] > 0) {
      recvs.push_back({r, ws_.staging.as<char>() + rp.recv_first[r] * bb, rp.recv_blocks[r] * bb});
    }
  }
  return comm_.exchange(sends, recvs);
}

// gather, span recall: the recalled token ranges this rank holds to their owners, per owner
// one message of pieces (K [Hkv, tokens, D] then V), packed by one copy_ranges.
Status StepRunner::exchange_spans(const RankPlan& rp, const std::vector<QueryState>& qs) {
  const int world = comm_.world();
  const int64_t dim = config_.model.head_dim;
  const int64_t C = config_.reattention.chunk_tokens;
  const int64_t elt = static_cast<int64_t>(dtype_size(backend_.storage_dtype()));
  const size_t row_bytes = static_cast<size_t>(config_.model.kv_heads) * dim * elt;
  REATTN_RETURN_IF_ERROR(ensure_capacity(backend_, ws_.staging, rp.staging_blocks * row_bytes));
  std::vector<CopyRange> ranges;
  std::vector<size_t> send_first(world + 1, 0);
  int64_t offset = 0;
  int64_t max_range_bytes = 0;
  for (int o = 0; o < world; ++o) {
    send_first[o] = static_cast<size_t>(offset);
    std::vector<SpanPiece> pieces;
    size_t pieces_query = SIZE_MAX;
    for (const auto& [query, index] : rp.send_chunks[o]) {
      if (query != pieces_query) pieces = span_pieces(qs[query].selected, config_.reattention);
      pieces_query = query;
      const SpanPiece& piece = pieces[index];
      const LayerShard& shard = qs[query].ctx->layers[qs[query].plan->layer];
      for (bool is_v : {false, true}) {
        const auto* block = static_cast<const char*>(store_.home_block(shard, is_v, piece.block));
        for (int64_t g = 0; g < config_.model.kv_heads; ++g) {
          ranges.push_back({block + (g * C + piece.skip) * dim * elt, offset, piece.tokens * dim * elt});
          offset += piece.tokens * dim * elt;
          max_range_bytes = std::max(max_range_bytes, piece.tokens * dim * elt);
        }
      }
    }
  }
  send_first[world] = static_cast<size_t>(offset);
  if (!ranges.empty()) {
    REATTN_RETURN_IF_ERROR(ensure_capacity(backend_, ws_.pack_src, ranges.size() * sizeof(CopyRange)));
    REATTN_RETURN_IF_ERROR(ensure_capacity(backend_, ws_.pack, static_cast<size_t>(offset)));
    REATTN_RETURN_IF_ERROR(backend_.upload(ws_.pack_src.data(), ranges.data(), ranges.size() * sizeof(CopyRange)));
    CopyRangesParams cp;
    cp.ranges = ws_.pack_src.as<const CopyRange>();
    cp.count = static_cast<int64_t>(ranges.size());
    cp.max_range_bytes = max_range_bytes;
    cp.dst = ws_.pack.data();
    REATTN_RETURN_IF_ERROR(backend_.copy_ranges(cp));
  }
  std::vector<Communicator::Transfer> sends, recvs;
  for (int r = 0; r < world; ++r) {
    if (send_first[r + 1] > send_first[r]) {
      sends.push_back({r, ws_.pack.as<char>() + send_first[r], send_first[r + 1] - send_first[r]});
    }
    if (rp.recv_blocks[r] > 0) {
      recvs.push_back({r, ws_.staging.as<char>() + rp.recv_first[r] * row_bytes, rp.recv_blocks[r] * row_bytes});
    }
  }
  return comm_.exchange(sends, recvs);
}

KeySegment StepRunner::resolve(const SegmentSource& src, const LayerShard& shard) const {
  const int64_t dim = config_.model.head_dim;
  const int64_t C = config_.reattention.chunk_tokens;
  const size_t bb = store_.block_bytes();
  switch (src.kind) {
    case SegmentSource::Kind::kSinks:
      return {shard.sink_k.data(), shard.sink_v.data(), src.tokens, config_.reattention.sink_tokens * dim,
              src.position};
    case SegmentSource::Kind::kHomeBlock: {
      const size_t skip = src.skip * dim * dtype_size(backend_.storage_dtype());
      return {static_cast<const char*>(store_.home_block(shard, false, src.block)) + skip,
              static_cast<const char*>(store_.home_block(shard, true, src.block)) + skip, src.tokens, C * dim,
              src.position};
    }
    case SegmentSource::Kind::kStagedRange: {
      const size_t row_bytes = config_.model.kv_heads * dim * dtype_size(backend_.storage_dtype());
      const char* k = ws_.staging.as<char>() + src.block * row_bytes;
      return {k, k + src.tokens * row_bytes, src.tokens, src.tokens * dim, src.position};
    }
    case SegmentSource::Kind::kStaging:
      return {ws_.staging.as<char>() + src.block * bb, ws_.staging.as<char>() + (src.block + 1) * bb, src.tokens,
              C * dim, src.position};
    case SegmentSource::Kind::kRing: {
      const size_t skip = src.skip * dim * dtype_size(backend_.storage_dtype());
      return {static_cast<const char*>(store_.ring_block(shard, false, src.block)) + skip,
              static_cast<const char*>(store_.ring_block(shard, true, src.block)) + skip, src.tokens, C * dim,
              src.position};
    }
  }
  return {};
}

// The windowed attention of every planned call; per query, this rank's (out, max, sum)
// [rows] lands in its state slot 0.
Status StepRunner::attend(const RankPlan& rp, const std::vector<QueryState>& qs) {
  const ModelConfig& m = config_.model;
  const int dim = m.head_dim;
  REATTN_RETURN_IF_ERROR(ensure_capacity(backend_, ws_.states, rp.state_floats * sizeof(float)));
  std::vector<KeySegment> segments;
  for (const AttentionCall& c : rp.calls) {
    const QueryState& s = qs[c.query];
    const LayerShard& shard = s.ctx->layers[s.plan->layer];
    for (size_t g = 0; g < c.segment_count; ++g) segments.push_back(resolve(rp.segments[c.segment_first + g], shard));
  }
  const size_t seg_bytes = segments.size() * sizeof(KeySegment);
  REATTN_RETURN_IF_ERROR(ensure_capacity(backend_, ws_.meta, seg_bytes + rp.row_info.size() * sizeof(int64_t)));
  REATTN_RETURN_IF_ERROR(backend_.upload(ws_.meta.data(), segments.data(), seg_bytes));
  REATTN_RETURN_IF_ERROR(
      backend_.upload(ws_.meta.as<char>() + seg_bytes, rp.row_info.data(), rp.row_info.size() * sizeof(int64_t)));
  const auto* rows_dev = reinterpret_cast<const int64_t*>(ws_.meta.as<char>() + seg_bytes);
  for (const AttentionCall& c : rp.calls) {
    const QueryState& s = qs[c.query];
    float* state = ws_.states.as<float>() + rp.state_offset[c.query];
    AttendParams p;
    p.segments = ws_.meta.as<KeySegment>() + c.segment_first;
    p.segment_count = static_cast<int64_t>(c.segment_count);
    p.q = ws_.q.as<float>() + s.q_offset;
    p.row_position = rows_dev + c.rows_first;
    p.row_visible_end = rows_dev + c.rows_first + s.plan->qlen;
    p.qlen = s.plan->qlen;
    p.q_heads = m.q_heads;
    p.kv_heads = m.kv_heads;
    p.head_dim = dim;
    p.rope_theta = m.rope_theta;
    p.rope_scaling = m.rope_scaling;
    p.max_position = s.selected.layout.length();
    p.out = state;
    p.row_max = state + s.rows * dim;
    p.row_sum = state + s.rows * (dim + 1);
    REATTN_RETURN_IF_ERROR(backend_.attend(p));
  }
  return Status::ok();
}

// partial: each rank's states to the owner, merged there with its own (merge_state).
Status StepRunner::merge_partial_states(const RankPlan& rp, const std::vector<QueryState>& qs) {
  const int dim = config_.model.head_dim;
  const size_t per_row = static_cast<size_t>(dim) + 2;
  std::vector<Communicator::Transfer> sends, recvs;
  for (size_t i = 0; i < qs.size(); ++i) {
    const QueryState& s = qs[i];
    if (!s.selected.ok) continue;
    const size_t package = s.rows * per_row * sizeof(float);
    float* own = ws_.states.as<float>() + rp.state_offset[i];
    if (rp.sends_state[i]) sends.push_back({s.plan->owner_rank, own, package});
    for (size_t p = 0; p < rp.partial_peers[i].size(); ++p) {
      recvs.push_back({rp.partial_peers[i][p], own + (1 + p) * s.rows * per_row, package});
    }
  }
  REATTN_RETURN_IF_ERROR(backend_.synchronize());
  REATTN_RETURN_IF_ERROR(comm_.exchange(sends, recvs));
  for (size_t i = 0; i < qs.size(); ++i) {
    const QueryState& s = qs[i];
    float* own = ws_.states.as<float>() + rp.state_offset[i];
    for (size_t p = 0; p < rp.partial_peers[i].size(); ++p) {
      const float* other = own + (1 + p) * s.rows * per_row;
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
  return Status::ok();
}

// Outputs from each owner to the reply rank, which fills `results`.
Status StepRunner::reply(const StepPlan& plan, const RankPlan& rp, const std::vector<QueryState>& qs,
                         std::vector<QueryResult>* results) {
  const int rank = comm_.rank();
  const int dim = config_.model.head_dim;
  REATTN_RETURN_IF_ERROR(backend_.synchronize());
  const bool replying = rank == plan.reply_rank;
  if (rp.reply_floats > 0) REATTN_RETURN_IF_ERROR(ensure_capacity(backend_, ws_.reply, rp.reply_floats * sizeof(float)));
  std::vector<Communicator::Transfer> sends, recvs;
  for (size_t i = 0; i < qs.size(); ++i) {
    const QueryState& s = qs[i];
    if (!s.selected.ok || s.plan->owner_rank == plan.reply_rank) continue;
    const size_t bytes = s.rows * dim * sizeof(float);
    if (rank == s.plan->owner_rank) sends.push_back({plan.reply_rank, ws_.states.as<float>() + rp.state_offset[i], bytes});
    if (replying) recvs.push_back({s.plan->owner_rank, ws_.reply.as<float>() + rp.reply_offset[i], bytes});
  }
  REATTN_RETURN_IF_ERROR(comm_.exchange(sends, recvs));
  if (!replying) return Status::ok();
  results->assign(qs.size(), QueryResult{});
  for (size_t i = 0; i < qs.size(); ++i) {
    QueryResult& r = (*results)[i];
    const QueryState& s = qs[i];
    r.status = s.status;
    if (!s.status.is_ok()) continue;
    r.recalled = s.selected.recalled;
    for (const TokenRange& t : s.selected.spans) r.recalled_spans.push_back({t.first, t.end});
    r.out.resize(s.rows * dim);
    const void* src = s.plan->owner_rank == rank ? static_cast<const void*>(ws_.states.as<float>() + rp.state_offset[i])
                                                 : static_cast<const void*>(ws_.reply.as<float>() + rp.reply_offset[i]);
    REATTN_RETURN_IF_ERROR(backend_.download(r.out.data(), src, r.out.size() * sizeof(float)));
  }
  return Status::ok();
}

}  // namespace reattn
