// A plain double-precision implementation of DESIGN.md section 2, written independently of
// common/semantics.cpp (no shared helpers), that every backend and rank count is checked
// against.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "common/config.h"

namespace reattn::ref {

// One layer of a context: k and v [Hkv][n][D] (pre-RoPE).
struct Context {
  ModelConfig model;
  ReattentionConfig rc;
  int64_t n = 0;
  std::vector<double> k;
  std::vector<double> v;
};

struct Result {
  std::vector<int64_t> recalled;   // ascending (chunk recall)
  std::vector<std::pair<int64_t, int64_t>> spans;  // span recall: [first, end) runs of recalled tokens
  std::vector<int64_t> kept;       // span recall: the kept tokens (after the cap), ascending
  std::vector<double> token_scores;  // span recall: [qlen][H][mid tokens] raw token scores
  std::vector<double> out;         // [qlen][H][D]
  std::vector<double> scores;      // [qlen][H][num_chunks] raw chunk scores
  int64_t num_chunks = 0;
};

// RoPE inverse frequency of dim pair d (with the model's rope_scaling), written from the
// llama3 rule as HF transformers states it.
double inv_freq(const ModelConfig& model, int d);

// The full ReAttention query (either recall mode, by ctx.rc.recall) (selection and windowed attention), q [qlen][H][D].
Result query(const Context& ctx, const std::vector<float>& q, int64_t qlen, QueryMode mode);

// Ordinary causal attention over all n tokens at their real positions (tail rows at
// n - qlen + i; detached rows at n, seeing everything).
std::vector<double> causal_attention(const Context& ctx, const std::vector<float>& q, int64_t qlen, QueryMode mode);

// Builds a context of one layer from the synthetic generator.
Context synthetic_context(const ModelConfig& model, const ReattentionConfig& rc, int64_t n, uint64_t seed,
                          const std::vector<int64_t>& needles, int layer);

// max |a-b| / max |b|, the relative error used by the tests.
double relative_error(const std::vector<float>& got, const std::vector<double>& want);

}  // namespace reattn::ref
