#include "worker/kv_source.h"

#include <vector>

namespace reattn {

void Fp32KvSource::read(int layer, int kv_head, int64_t offset, int64_t count, DType dtype, void* k, void* v) const {
  if (dtype == DType::kF32) return read_f32(layer, kv_head, offset, count, static_cast<float*>(k), static_cast<float*>(v));
  const size_t n = static_cast<size_t>(count) * head_dim_;
  std::vector<float> kf(n), vf(n);
  read_f32(layer, kv_head, offset, count, kf.data(), vf.data());
  convert_from_f32(dtype, kf.data(), n, k);
  convert_from_f32(dtype, vf.data(), n, v);
}

Expected<SafetensorsKvSource> SafetensorsKvSource::make(SafetensorsFile file, const ModelConfig& model) {
  REATTN_ASSIGN_OR_RETURN(KvTensors kv, kv_tensors(file, model));
  return SafetensorsKvSource(std::move(file), std::move(kv), model);
}

void SafetensorsKvSource::read(int layer, int kv_head, int64_t offset, int64_t count, DType dtype, void* k,
                               void* v) const {
  const int64_t first = ((static_cast<int64_t>(layer) * kv_heads_ + kv_head) * kv_.tokens + offset) * head_dim_;
  convert(kv_.k.dtype, kv_.k.data + first * dtype_size(kv_.k.dtype), count * head_dim_, dtype, k);
  convert(kv_.v.dtype, kv_.v.data + first * dtype_size(kv_.v.dtype), count * head_dim_, dtype, v);
}

void LayerStepKvSource::read(int, int kv_head, int64_t offset, int64_t count, DType dtype, void* k, void* v) const {
  const StepTensors& t = step_.tensors;
  const size_t first = (static_cast<size_t>(kv_head) * step_.qlen + offset) * head_dim_ * dtype_size(t.kv_dtype);
  const size_t n = static_cast<size_t>(count) * head_dim_;
  convert(t.kv_dtype, t.at(t.k_offset) + first, n, dtype, k);
  convert(t.kv_dtype, t.at(t.v_offset) + first, n, dtype, v);
}

void SyntheticKvSource::read_f32(int layer, int kv_head, int64_t offset, int64_t count, float* k, float* v) const {
  for (int64_t t = 0; t < count; ++t) {
    synthetic_kv(spec_, model_, layer, kv_head, first_token_ + offset + t, k + t * model_.head_dim,
                 v + t * model_.head_dim);
  }
}

}  // namespace reattn
