#include "run/run_inputs.h"

namespace reattn {

Expected<RunInputs> load_file_inputs(const std::string& kv_path, const std::string& q_path, const ModelConfig& model,
                                     float max_abs) {
  RunInputs in;
  REATTN_ASSIGN_OR_RETURN(SafetensorsFile kv_file, SafetensorsFile::open(kv_path));
  REATTN_ASSIGN_OR_RETURN(SafetensorsKvSource kv, SafetensorsKvSource::make(std::move(kv_file), model));
  REATTN_RETURN_IF_ERROR(check_storable(kv.tensors().k, max_abs));
  REATTN_RETURN_IF_ERROR(check_storable(kv.tensors().v, max_abs));
  in.kv = std::make_unique<SafetensorsKvSource>(std::move(kv));

  REATTN_ASSIGN_OR_RETURN(SafetensorsFile q_file, SafetensorsFile::open(q_path));
  REATTN_ASSIGN_OR_RETURN(TensorView q, q_file.get("q"));
  if (Status s = check_shape(q, {{"qlen"}, {"q_heads", model.q_heads}, {"head_dim", model.head_dim}}); !s.is_ok()) {
    return invalid_argument(q_path + ": " + s.message());
  }
  if (q.shape[0] < 1) return invalid_argument(q_path + ": tensor 'q': holds no rows");
  REATTN_RETURN_IF_ERROR(check_storable(q, max_abs));
  in.qlen = q.shape[0];
  in.q = q.to_f32();
  return in;
}

Expected<RunInputs> make_synthetic_inputs(int64_t tokens, uint64_t seed, const std::vector<int64_t>& needles,
                                          int64_t qlen, int layer, const ModelConfig& model) {
  if (tokens < 1) return invalid_argument("--synthetic-tokens: must be >= 1, got " + std::to_string(tokens));
  if (qlen < 1) return invalid_argument("--qlen: must be >= 1, got " + std::to_string(qlen));
  REATTN_RETURN_IF_ERROR(validate_needles(needles, tokens));
  RunInputs in;
  in.synthetic = SyntheticSpec{seed, needles};
  in.kv = std::make_unique<SyntheticKvSource>(*in.synthetic, model, 0, tokens);
  in.qlen = qlen;
  in.q = synthetic_query(*in.synthetic, model, layer, qlen);
  return in;
}

}  // namespace reattn
